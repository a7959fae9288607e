package server

import (
	"context"
	"errors"
	"strings"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/internal/store"
	"beacon.dev/beacon/server/audit"
)

// auditor writes the audit log (--audit-log): every write call, allowed
// or failed, and every call refused for its token, with the token's
// accessor, the client's address, the operation and the resource. Reads
// and heartbeats that succeed are not written: they are the bulk of the
// traffic and change nothing.
//
// A line that cannot be written fails open — the call goes on — and is
// counted in beacon_audit_errors_total and logged: an audit log that
// stops the registry would make a full disk an outage.
type auditor struct {
	log    *audit.Log
	errors prometheus.Counter
	warn   *logLimiter
	s      *Server
}

func (a *auditor) record(ctx context.Context, procedure string, msg, resp any, err error) {
	if a == nil {
		return
	}
	code := connect.CodeOf(err)
	denial := code == connect.CodePermissionDenied || code == connect.CodeUnauthenticated
	if !denial && !writeProcedures[procedure] {
		return
	}
	id := identityOf(ctx)
	e := audit.Event{
		Accessor:  id.Accessor,
		Source:    connOf(ctx).addr,
		Operation: strings.TrimPrefix(procedure, "/"),
		Resource:  resourceOf(msg),
		Outcome:   audit.OutcomeAllowed,
	}
	e.Detail = map[string]string{}
	if id.Session != 0 {
		e.Detail["session_credential"] = store.FormatSessionID(id.Session)
	}
	// A token made (Bootstrap, CreateToken): who made which one.
	if t, ok := resp.(interface{ GetToken() *beaconv1.AclToken }); ok && t.GetToken().GetAccessorId() != "" {
		e.Detail["made_token"] = t.GetToken().GetAccessorId()
	}
	if len(e.Detail) == 0 {
		e.Detail = nil
	}
	switch {
	case denial:
		e.Outcome, e.Reason = audit.OutcomeDenied, errorText(err)
	case err != nil:
		e.Outcome, e.Reason = audit.OutcomeError, errorText(err)
	}
	a.write(e)
}

func (a *auditor) write(e audit.Event) {
	if err := a.log.Record(e); err != nil {
		a.errors.Inc()
		if a.warn.allow() {
			a.s.log.Error("audit log: a line could not be written (counted in beacon_audit_errors_total)", "err", err)
		}
	}
}

func errorText(err error) string {
	var ce *connect.Error
	if errors.As(err, &ce) {
		return ce.Message()
	}
	return err.Error()
}

// resourceOf names what a request is about: service:NS/SERVICE[/ID],
// session:ID, or the ACL record.
func resourceOf(msg any) string {
	type named interface{ GetName() string }
	var parts []string
	switch m := msg.(type) {
	case interface {
		GetInstance() *beaconv1.Instance
	}:
		in := m.GetInstance()
		parts = append(parts, "service:"+nsOr(in.GetNamespace())+"/"+in.GetService()+"/"+in.GetId())
	case interface {
		GetNamespace() string
		GetService() string
	}:
		r := "service:" + nsOr(m.GetNamespace()) + "/" + m.GetService()
		if withID, ok := msg.(interface{ GetId() string }); ok && withID.GetId() != "" {
			r += "/" + withID.GetId()
		}
		parts = append(parts, r)
	case interface {
		GetNamespace() string
		GetKey() string
	}:
		parts = append(parts, "key:"+nsOr(m.GetNamespace())+"/"+m.GetKey())
	case interface {
		GetNamespace() string
		GetName() string
		GetSessionId() int64
	}:
		parts = append(parts, "lock:"+nsOr(m.GetNamespace())+"/"+m.GetName())
	case *beaconv1.KVTxnRequest:
		for _, op := range m.GetOps() {
			parts = append(parts, "key:"+nsOr(m.GetNamespace())+"/"+op.GetKey())
		}
	case interface{ GetAccessorId() string }:
		parts = append(parts, "acl-token:"+m.GetAccessorId())
	case interface{ GetToken() *beaconv1.AclToken }:
		parts = append(parts, "acl-token:"+m.GetToken().GetAccessorId())
	case interface{ GetPolicy() *beaconv1.AclPolicy }:
		parts = append(parts, "acl-policy:"+m.GetPolicy().GetName())
	case interface{ GetRole() *beaconv1.AclRole }:
		parts = append(parts, "acl-role:"+m.GetRole().GetName())
	case named:
		parts = append(parts, "acl:"+m.GetName())
	}
	if s, ok := msg.(interface{ GetSessionId() int64 }); ok && s.GetSessionId() != 0 {
		parts = append(parts, "session:"+store.FormatSessionID(s.GetSessionId()))
	}
	return strings.Join(parts, " ")
}

func nsOr(ns string) string {
	if ns == "" {
		return "default"
	}
	return ns
}

// auditInterceptor records unary calls; streams are recorded where they
// are refused (guardAPI, subscribe) since their writes are heartbeats.
type auditInterceptor struct{ a *auditor }

func (i auditInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		resp, err := next(ctx, req)
		var msg any
		if err == nil {
			msg = resp.Any()
		}
		i.a.record(ctx, req.Spec().Procedure, req.Any(), msg, err)
		return resp, err
	}
}

func (auditInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (i auditInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		err := next(ctx, conn)
		i.a.record(ctx, conn.Spec().Procedure, nil, nil, err)
		return err
	}
}

// auditUnauthenticated records a call refused before it reached a handler.
func (a *auditor) auditUnauthenticated(source, path string, err error) {
	if a == nil {
		return
	}
	a.write(audit.Event{Accessor: "", Source: source, Operation: strings.TrimPrefix(path, "/"), Outcome: audit.OutcomeDenied, Reason: errorText(err)})
}

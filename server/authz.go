package server

import (
	"context"
	"crypto/subtle"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

	"beacon.dev/beacon/internal/store"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/internal/acl"
)

// Access control (docs/security.md): guardAPI resolves each call's token
// into an acl.Identity kept in the call's context; every handler asks the
// identity's authorizer for what the call needs, here. Without --acl every
// call has the identity everyone, which may do everything.

type identityKey struct{}

// everyone is the identity of every call when ACLs are off.
var everyone = acl.Identity{Accessor: "", Authz: acl.All}

func identityOf(ctx context.Context) acl.Identity {
	if id, ok := ctx.Value(identityKey{}).(acl.Identity); ok {
		return id
	}
	return everyone
}

// secretOf reads the token a request presents: "Authorization: Bearer
// SECRET" (what gRPC and HTTP clients send) or "X-Beacon-Token: SECRET".
func secretOf(h http.Header) string {
	if v := h.Get("Authorization"); v != "" {
		if s, ok := strings.CutPrefix(v, "Bearer "); ok {
			return strings.TrimSpace(s)
		}
		return v // not a bearer token: ParseSecret says why
	}
	return strings.TrimSpace(h.Get("X-Beacon-Token"))
}

type recheckKey struct{}

// stillValid says whether the credential a call began with is still good:
// streams (watches, keepalive streams) ask before each message, so that a
// deleted or expired token, or a session credential whose session or
// parent token is gone, stops the streams it opened too. What the
// credential may read is not re-evaluated: a narrowed policy applies to
// the streams opened after it.
func stillValid(ctx context.Context) error { return recheck(ctx)() }

// recheck is stillValid for a stream to call before each message: the
// context's values are looked up once.
func recheck(ctx context.Context) func() error {
	if f, ok := ctx.Value(recheckKey{}).(func() error); ok {
		return f
	}
	return func() error { return nil }
}

// withRecheck keeps in ctx how to resolve the call's credential again.
func (s *Server) withRecheck(ctx context.Context, r *http.Request) context.Context {
	if s.acl == nil {
		return ctx
	}
	secret := secretOf(r.Header)
	cn := ""
	if secret == "" && r.TLS != nil && len(r.TLS.VerifiedChains) > 0 {
		cn = r.TLS.VerifiedChains[0][0].Subject.CommonName
	}
	role := identityOf(ctx).Accessor
	return context.WithValue(ctx, recheckKey{}, func() error {
		if cn != "" && strings.HasPrefix(role, acl.RoleAccessorPrefix) {
			if _, ok := s.acl.IdentifyRole(cn); !ok {
				return connect.NewError(connect.CodeUnauthenticated, fmt.Errorf("acl: role %s is gone", cn))
			}
			return nil
		}
		if _, err := s.acl.Identify(secret); err != nil {
			return connect.NewError(connect.CodeUnauthenticated, err)
		}
		return nil
	})
}

// authenticate resolves the request's identity. A token unknown here may
// have been made on another server a moment ago: the ACL records catch up
// with etcd once before the token is refused.
func (s *Server) authenticate(r *http.Request) (acl.Identity, error) {
	return s.identify(secretOf(r.Header), r.TLS)
}

// identify resolves a secret, or without one a verified client
// certificate (cs, nil without TLS), into an identity.
func (s *Server) identify(secret string, cs *tls.ConnectionState) (acl.Identity, error) {
	if s.acl == nil {
		return everyone, nil
	}
	if secret == "" && cs != nil && len(cs.VerifiedChains) > 0 {
		// mTLS without a token: the certificate's common name names a role.
		if id, ok := s.acl.IdentifyRole(cs.VerifiedChains[0][0].Subject.CommonName); ok {
			return id, nil
		}
	}
	id, err := s.acl.Identify(secret)
	if errors.Is(err, acl.ErrUnknownToken) {
		// Callers with unknown tokens share one catch-up at a time, so
		// that a flood of made-up secrets costs etcd one read, not one
		// each.
		_, _, _ = s.catchUps.Do("", func() (any, error) {
			ctx, cancel := context.WithTimeout(s.runCtx, readTimeout)
			defer cancel()
			return nil, s.acl.CatchUp(ctx)
		})
		id, err = s.acl.Identify(secret)
	}
	if err != nil {
		return acl.Identity{}, connect.NewError(connect.CodeUnauthenticated, err)
	}
	return id, nil
}

// deny answers a call its identity may not make, naming the permission.
func deny(id acl.Identity, perm, on, why string) error {
	acc := id.Accessor
	if id.Session != 0 {
		acc += ", session credential of " + store.FormatSessionID(id.Session)
	}
	return connect.NewError(connect.CodePermissionDenied, &acl.DeniedError{Permission: perm, On: on, Accessor: acc, Why: why})
}

func needService(ctx context.Context, ns, svc string, need acl.Access) error {
	id := identityOf(ctx)
	if id.Authz.Service(ns, svc) >= need {
		return nil
	}
	return deny(id, "service:"+need.String(), ns+"/"+svc, "")
}

// needGlobal: operator and ACL rights; a session credential has none of
// them, whatever its parent token has.
func needGlobal(ctx context.Context, r acl.Resource, need acl.Access) error {
	id := identityOf(ctx)
	if id.Session == 0 && id.Authz.Global(r) >= need {
		return nil
	}
	why := ""
	if id.Session != 0 {
		why = "a session credential acts only on its session; use a token"
	}
	return deny(id, r.String()+":"+need.String(), "", why)
}

// actsForAnySession: session:write acts on every session — for a token,
// never for a session credential, which is bound to its own.
func actsForAnySession(id acl.Identity) bool {
	return id.Session == 0 && id.Authz.Global(acl.Session) >= acl.Write
}

// sessionName names another session in an error: its id only to callers
// that may read session ids.
func sessionName(id acl.Identity, session int64) string {
	if mayReadSessions(id) {
		return store.FormatSessionID(session)
	}
	return "another session"
}

// needSession allows acting on a session (closing it, registering into
// it): its own credential, or session:write.
func needSession(ctx context.Context, session int64) error {
	id := identityOf(ctx)
	if id.Session == session || actsForAnySession(id) {
		return nil
	}
	return deny(id, "session:write", store.FormatSessionID(session), "or that session's own credential (the session_token CreateSession returned)")
}

// needKeepAlive allows renewing a session: its credential, the token that
// made it, or session:write. Renewing changes no record.
func (a api) needKeepAlive(ctx context.Context, session int64) error {
	id := identityOf(ctx)
	if id.Session == session || actsForAnySession(id) || a.s.acl == nil {
		return nil
	}
	if id.Session == 0 && id.Accessor == a.s.acl.SessionParent(session) {
		return nil
	}
	return deny(id, "session:write", store.FormatSessionID(session), "or that session's credential, or the token that made the session")
}

// needInstanceWrite allows changing an existing instance in place
// (status, checks): service:write, and it must be the caller's — bound to
// the caller's session for a session credential, bound to no session for
// a token — unless the caller has session:write.
func (a api) needInstanceWrite(ctx context.Context, k registry.InstanceKey) error {
	if err := needService(ctx, k.Namespace, k.Service, acl.Write); err != nil {
		return err
	}
	id := identityOf(ctx)
	if actsForAnySession(id) {
		return nil
	}
	in := a.s.view.Instance(k)
	if in == nil {
		a.catchUp(ctx)
		if in = a.s.view.Instance(k); in == nil {
			return nil // nothing to protect: the call finds no instance
		}
	}
	return ownedBy(id, in)
}

// mayChange checks ownership on the record etcd holds, inside the
// store's compare-and-swap: the view needInstanceWrite read may lag.
func mayChange(ctx context.Context, in *registry.Instance) error {
	id := identityOf(ctx)
	if actsForAnySession(id) {
		return nil
	}
	return ownedBy(id, in)
}

func ownedBy(id acl.Identity, in *registry.Instance) error {
	switch {
	case in.SessionID == id.Session:
		return nil
	case in.SessionID == 0:
		return deny(id, "service:write", in.Namespace+"/"+in.Service, "a session credential acts only on its session's instances; this one is persistent (use a token)")
	default:
		return deny(id, "session:write", sessionName(id, in.SessionID), fmt.Sprintf("instance %s belongs to that session: only its credential may change it", in.ID))
	}
}

// needRegister allows a registration: service:write; into a session only
// with that session's credential (or session:write). It returns the guard
// the store applies to the record etcd holds (nil: none), see takeover.
func (a api) needRegister(ctx context.Context, in *registry.Instance) (store.Guard, error) {
	if err := needService(ctx, in.Namespace, in.Service, acl.Write); err != nil {
		return nil, err
	}
	id := identityOf(ctx)
	if actsForAnySession(id) {
		return nil, nil
	}
	if in.SessionID != id.Session {
		if in.SessionID == 0 {
			return nil, deny(id, "service:write", in.Namespace+"/"+in.Service, "a session credential registers only into its own session")
		}
		return nil, needSession(ctx, in.SessionID)
	}
	return func(cur *registry.Instance) error { return takeover(id, cur, in) }, nil
}

// takeover decides whether in may replace cur, the record etcd holds:
// only a record of the same owner — the same session, or no session for
// a token. An instance another session holds (its record exists, so its
// lease does) is not taken over, not even at the same address: nothing
// tells a restarted process from a sibling holding the same service
// token. A restarted process waits for its old session to expire
// (errHeld, which the SDK retries), at most that session's TTL. Decided
// inside the store's write, on the record the write compares against, so
// no registration can slip in between the check and the write.
func takeover(id acl.Identity, cur, in *registry.Instance) error {
	switch {
	case cur == nil || cur.SessionID == in.SessionID:
		return nil
	case cur.SessionID == 0:
		return deny(id, "session:write", in.Namespace+"/"+in.Service,
			fmt.Sprintf("instance %s is persistent: a session may not take it over (deregister it with a token first)", in.ID))
	case in.SessionID == 0:
		return deny(id, "session:write", in.Namespace+"/"+in.Service,
			fmt.Sprintf("instance %s belongs to %s: a token may not turn it persistent", in.ID, sessionName(id, cur.SessionID)))
	}
	err := connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("%w: instance %s belongs to %s until it ends or expires (at most its TTL); with ACLs no other session takes it over", ErrHeld, in.ID, sessionName(id, cur.SessionID)))
	err.Meta().Set(HeldHeader, "1")
	return err
}

// HeldHeader marks the error of a registration refused because another
// live session holds the instance: retrying succeeds once it has ended.
const HeldHeader = "Beacon-Held"

// ErrHeld: the instance belongs to another live session; registering it
// again succeeds once that session has ended. The SDK waits and retries.
var ErrHeld = errors.New("acl: instance held by another live session")

// mayReadSessions: session ids are shown only to session:read.
func mayReadSessions(id acl.Identity) bool { return id.Authz.Global(acl.Session) >= acl.Read }

// redactSessions blanks the session ids of a snapshot's instances (a copy).
func redactSessions(snap *registry.Snapshot) *registry.Snapshot {
	out := *snap
	out.Instances = make([]*registry.Instance, len(snap.Instances))
	for i, in := range snap.Instances {
		c := *in
		c.SessionID = 0
		out.Instances[i] = &c
	}
	return &out
}

// breakGlass is the server's one-time key for a new management token: kept
// in a file only the server's user reads, replaced at every start and
// after every use.
type breakGlass struct {
	path string
	mu   sync.Mutex
	hash acl.Hash // guarded by mu
}

func newBreakGlass(path string) (*breakGlass, error) {
	b := &breakGlass{path: path}
	return b, b.rotate()
}

func (b *breakGlass) rotate() error {
	secret, h := acl.NewSecret(acl.TokenPrefix)
	if err := os.MkdirAll(filepath.Dir(b.path), 0o700); err != nil {
		return fmt.Errorf("server: --acl-break-glass-file: %w", err)
	}
	tmp := b.path + ".tmp"
	if err := os.WriteFile(tmp, []byte(secret+"\n"), 0o600); err != nil {
		return fmt.Errorf("server: --acl-break-glass-file: %w", err)
	}
	if err := os.Rename(tmp, b.path); err != nil {
		return fmt.Errorf("server: --acl-break-glass-file: %w", err)
	}
	b.mu.Lock()
	b.hash = h
	b.mu.Unlock()
	return nil
}

// use reports whether key is the current key, and if so replaces it: a key
// works once.
func (b *breakGlass) use(key string) (bool, error) {
	_, h, err := acl.ParseSecret(strings.TrimSpace(key))
	if err != nil {
		return false, nil
	}
	b.mu.Lock()
	ok := subtle.ConstantTimeCompare(h[:], b.hash[:]) == 1
	if ok {
		b.hash = acl.Hash{} // no secret hashes to zero
	}
	b.mu.Unlock()
	if !ok {
		return false, nil
	}
	return true, b.rotate()
}

// aclWaitTimeout bounds how long an ACL write waits for this server's
// records to hold it.
const aclWaitTimeout = 5 * time.Second

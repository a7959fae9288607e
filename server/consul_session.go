package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"connectrpc.com/connect"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/types/known/durationpb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/internal/store"
	"beacon.dev/beacon/registry"
)

// Sessions.

type consulSessionEntry struct {
	ID, Name, Node, Behavior, TTL string
	LockDelay                     time.Duration
	Checks, NodeChecks            []string
	CreateIndex, ModifyIndex      int64
	Namespace                     string `json:",omitempty"`
}

func (s *Server) consulSessionCreate(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	var body struct {
		Name, Node, Behavior, TTL string
		LockDelay                 json.RawMessage
		Checks, NodeChecks        []string
		ServiceChecks             []any
	}
	if err := s.consulBody(w, r, &body); err != nil && !errors.Is(err, io.EOF) && !strings.Contains(err.Error(), "EOF") {
		consulError(w, err)
		return
	}
	settings := consulSession{Name: body.Name, Behavior: "release", LockDelay: consulDefaultLockDelay}
	switch body.Behavior {
	case "", "release":
	case "delete":
		settings.Behavior = "delete"
	default:
		consulError(w, refused("Behavior", "must be release or delete"))
		return
	}
	for _, c := range append(body.Checks, body.NodeChecks...) {
		if c != "serfHealth" {
			consulError(w, refused("Checks", fmt.Sprintf("%q: beacon sessions end with their TTL, not with checks (only serfHealth is accepted)", c)))
			return
		}
	}
	if len(body.ServiceChecks) > 0 {
		consulError(w, refused("ServiceChecks", "beacon sessions end with their TTL, not with checks"))
		return
	}
	if body.TTL == "" {
		consulError(w, refused("TTL", "beacon sessions need a TTL (e.g. \"15s\"): a session without one would never end if its owner vanished"))
		return
	}
	ttl, err := time.ParseDuration(body.TTL)
	if err != nil {
		consulError(w, refused("TTL", fmt.Sprintf("%q is not a duration such as 15s", body.TTL)))
		return
	}
	ttl = ttl.Round(time.Second)
	settings.TTL = ttl
	if len(body.LockDelay) > 0 {
		var text string
		var num float64
		switch {
		case json.Unmarshal(body.LockDelay, &text) == nil:
			settings.LockDelay, err = time.ParseDuration(text)
		case json.Unmarshal(body.LockDelay, &num) == nil:
			// Consul: a number under 1000 is seconds, else nanoseconds.
			settings.LockDelay = time.Duration(num)
			if num < 1000 {
				settings.LockDelay = time.Duration(num * float64(time.Second))
			}
		default:
			err = errors.New("bad")
		}
		if err != nil || settings.LockDelay < 0 || settings.LockDelay > consulMaxLockDelay {
			consulError(w, refused("LockDelay", fmt.Sprintf("must be a duration of at most %v", consulMaxLockDelay)))
			return
		}
	}
	resp, err := consulCall(s, r.Context(), beaconv1connect.RegistryServiceCreateSessionProcedure,
		&beaconv1.CreateSessionRequest{Ttl: durationpb.New(ttl), Name: consulSessionName(body.Name)}, api{s}.CreateSession)
	if err != nil {
		consulError(w, err)
		return
	}
	rec, _ := json.Marshal(settings)
	if _, err := s.cli.Put(r.Context(), s.consulSessionKey(resp.SessionId), string(rec), clientv3.WithLease(clientv3.LeaseID(resp.SessionId))); err != nil {
		_ = s.store.CloseSession(context.WithoutCancel(r.Context()), resp.SessionId)
		consulError(w, toConnectError(err))
		return
	}
	consulJSON(w, -1, map[string]string{"ID": store.FormatSessionID(resp.SessionId)})
}

// consulSessionName keeps a Consul session name that beacon accepts, and
// drops one it does not (the name is a label; Consul's are free text).
func consulSessionName(name string) string {
	if registry.ValidateSessionName(name) != nil {
		return ""
	}
	return name
}

func (s *Server) consulSessionOf(w http.ResponseWriter, r *http.Request) (int64, bool) {
	id, err := store.ParseSessionID(r.PathValue("id"))
	if err != nil || id == 0 {
		consulError(w, refused("session", fmt.Sprintf("%q is not a session id", r.PathValue("id"))))
		return 0, false
	}
	return id, true
}

// consulSessionEntries reads a session as Consul shows it: [] when it
// does not exist.
func (s *Server) consulSessionEntries(ctx context.Context, id int64) ([]consulSessionEntry, error) {
	resp, err := s.cli.Txn(ctx).Then(clientv3.OpGet(s.store.SessionKey(id)), clientv3.OpGet(s.consulSessionKey(id))).Commit()
	if err != nil {
		return nil, err
	}
	sess := resp.Responses[0].GetResponseRange().Kvs
	if len(sess) == 0 {
		return []consulSessionEntry{}, nil
	}
	settings := consulSession{Behavior: "release", LockDelay: consulDefaultLockDelay}
	if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) > 0 {
		_ = json.Unmarshal(kvs[0].Value, &settings)
	}
	e := consulSessionEntry{ID: store.FormatSessionID(id), Name: settings.Name, Node: s.cfg.Name, Behavior: settings.Behavior,
		LockDelay: settings.LockDelay, Checks: []string{"serfHealth"}, NodeChecks: []string{"serfHealth"},
		CreateIndex: sess[0].CreateRevision, ModifyIndex: sess[0].ModRevision}
	if settings.TTL > 0 {
		e.TTL = settings.TTL.String()
	}
	return []consulSessionEntry{e}, nil
}

func (s *Server) consulSessionRenew(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	id, ok := s.consulSessionOf(w, r)
	if !ok {
		return
	}
	_, err := consulCall(s, r.Context(), beaconv1connect.RegistryServiceKeepAliveProcedure,
		&beaconv1.KeepAliveRequest{SessionId: id}, api{s}.KeepAlive)
	if connect.CodeOf(err) == connect.CodeNotFound {
		consulError(w, connect.NewError(connect.CodeNotFound, fmt.Errorf("Session id '%s' not found", r.PathValue("id"))))
		return
	}
	if err != nil {
		consulError(w, err)
		return
	}
	entries, err := s.consulSessionEntries(r.Context(), id)
	if err != nil {
		consulError(w, toConnectError(err))
		return
	}
	consulJSON(w, -1, entries)
}

// consulSessionDestroy ends a session: its credential, the token that
// made it or session:write may (consul/api's Lock destroys the session it
// made with the same token).
func (s *Server) consulSessionDestroy(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	id, ok := s.consulSessionOf(w, r)
	if !ok {
		return
	}
	ctx := r.Context()
	msg := &beaconv1.CloseSessionRequest{SessionId: id}
	err := api{s}.needKeepAlive(ctx, id)
	if err == nil {
		err = s.spendWrites(ctx, connOf(ctx), 1, time.Now())
	}
	if err == nil {
		err = toConnectError(s.store.CloseSession(ctx, id))
		if errors.Is(err, store.ErrSessionNotFound) || connect.CodeOf(err) == connect.CodeNotFound {
			err = nil // Consul: destroying a gone session succeeds
		}
	}
	s.audit.record(ctx, beaconv1connect.RegistryServiceCloseSessionProcedure, msg, &beaconv1.CloseSessionResponse{}, err)
	if err != nil {
		consulError(w, err)
		return
	}
	consulJSON(w, -1, true)
}

func (s *Server) consulSessionInfo(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	id, ok := s.consulSessionOf(w, r)
	if !ok {
		return
	}
	if !mayReadSessions(identityOf(r.Context())) {
		if err := api.needKeepAlive(api{s}, r.Context(), id); err != nil {
			consulError(w, err)
			return
		}
	}
	entries, err := s.consulSessionEntries(r.Context(), id)
	if err != nil {
		consulError(w, toConnectError(err))
		return
	}
	consulJSON(w, -1, entries) // no index: session reads do not block
}

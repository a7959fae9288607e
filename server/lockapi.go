package server

import (
	"context"
	"errors"
	"fmt"
	"time"

	"connectrpc.com/connect"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/internal/acl"
	"beacon.dev/beacon/server/internal/kv"
	"beacon.dev/beacon/server/internal/lock"
)

// MaxLockValueBytes bounds the value a session keeps with its place in a
// lock's queue (an election candidate's address, say).
const MaxLockValueBytes = 4 << 10

// DefaultLockDelay is how long a lock lost with its holder's session
// stays free before the next holder gets it (--lock-delay).
const DefaultLockDelay = 5 * time.Second

// lockAPI serves the lock API (docs/locks.md). A lock's name is a key
// name: locking it needs key:write on it, reading its state key:read.
type lockAPI struct{ s *Server }

var _ beaconv1connect.LockServiceHandler = lockAPI{}

func lockError(err error) error {
	switch {
	case errors.Is(err, lock.ErrSessionNotFound):
		return connect.NewError(connect.CodeNotFound, err)
	case errors.Is(err, lock.ErrLost):
		return connect.NewError(connect.CodeAborted, err)
	case errors.Is(err, lock.ErrNotHolder):
		cerr := connect.NewError(connect.CodeFailedPrecondition, err)
		cerr.Meta().Set(FencedHeader, "true")
		return cerr
	}
	return toConnectError(err)
}

// lockTarget validates the namespace, lock name and session of a request
// and checks that the caller may lock the name for the session.
func (l lockAPI) lockTarget(ctx context.Context, namespace, name string, session int64) (string, error) {
	ns, err := namespaceOf(namespace)
	if err == nil {
		err = registry.ValidateKey("name", name)
	}
	if err == nil && session == 0 {
		err = &registry.FieldError{Field: "session_id", Reason: "must name the session that holds the lock"}
	}
	if err != nil {
		return "", toConnectError(err)
	}
	if err := needKey(ctx, ns, name, acl.Write); err != nil {
		return "", err
	}
	return ns, (api{l.s}).needKeepAlive(ctx, session)
}

// readable starts a call that reads a lock's state: the server is
// ready, the name is valid, and the caller may read it.
func (l lockAPI) readable(ctx context.Context, namespace, name string) (string, error) {
	if err := (api{l.s}).ready(); err != nil {
		return "", err
	}
	ns, err := kvKey(namespace, "name", name)
	if err != nil {
		return "", err
	}
	return ns, needKey(ctx, ns, name, acl.Read)
}

func (l lockAPI) Acquire(ctx context.Context, req *connect.Request[beaconv1.AcquireLockRequest]) (*connect.Response[beaconv1.AcquireLockResponse], error) {
	if err := (api{l.s}).ready(); err != nil {
		return nil, err
	}
	m := req.Msg
	ns, err := l.lockTarget(ctx, m.GetNamespace(), m.GetName(), m.GetSessionId())
	if err != nil {
		return nil, err
	}
	wait, lim := time.Duration(0), l.s.cfg.Limits
	if d := m.GetWait(); d != nil {
		if err := d.CheckValid(); err != nil {
			return nil, toConnectError(&registry.FieldError{Field: "wait", Reason: err.Error()})
		}
		if wait = d.AsDuration(); wait < 0 {
			return nil, toConnectError(&registry.FieldError{Field: "wait", Reason: fmt.Sprintf("%v, must be 0 (try once) or more", wait)})
		}
		wait = min(wait, lim.MaxLockWait) // as Consul cuts a blocking query's wait
	}
	if wait > 0 {
		if !take(&l.s.lockWaits, lim.MaxLockWaits) {
			return nil, l.s.limitError("max-lock-waits", "%d lock Acquire calls waiting on this server", lim.MaxLockWaits)
		}
		defer l.s.lockWaits.Add(-1)
	}
	start := time.Now()
	if n := len(m.GetValue()); n > MaxLockValueBytes {
		return nil, toConnectError(&registry.FieldError{Field: "value", Reason: fmt.Sprintf("is %d bytes, at most %d", n, MaxLockValueBytes)})
	}
	acquired, token, err := l.s.locks.Acquire(ctx, ns, m.GetName(), m.GetSessionId(), m.GetValue(), wait, m.GetKeepPlace())
	switch {
	case err != nil:
		l.s.metrics.lockAcquires.WithLabelValues("error").Inc()
		return nil, lockError(err)
	case acquired:
		l.s.metrics.lockAcquires.WithLabelValues("acquired").Inc()
		l.s.metrics.lockWait.Observe(time.Since(start).Seconds())
	default:
		l.s.metrics.lockAcquires.WithLabelValues("busy").Inc()
	}
	if acquired { // the caller holds it: no need to read the queue again
		return connect.NewResponse(&beaconv1.AcquireLockResponse{Acquired: true, FencingToken: token, Lock: &beaconv1.LockState{
			Name: m.GetName(), Holder: &beaconv1.LockHolder{SessionId: m.GetSessionId(), FencingToken: token, Value: m.GetValue()},
		}}), nil
	}
	st, err := l.s.locks.Describe(ctx, ns, m.GetName())
	if err != nil {
		return nil, lockError(err)
	}
	return connect.NewResponse(&beaconv1.AcquireLockResponse{FencingToken: st.GetHolder().GetFencingToken(), Lock: st}), nil
}

func (l lockAPI) Release(ctx context.Context, req *connect.Request[beaconv1.ReleaseLockRequest]) (*connect.Response[beaconv1.ReleaseLockResponse], error) {
	if err := (api{l.s}).ready(); err != nil {
		return nil, err
	}
	m := req.Msg
	ns, err := l.lockTarget(ctx, m.GetNamespace(), m.GetName(), m.GetSessionId())
	if err != nil {
		return nil, err
	}
	released, rev, err := l.s.locks.Release(ctx, ns, m.GetName(), m.GetSessionId())
	if err != nil {
		return nil, lockError(err)
	}
	return connect.NewResponse(&beaconv1.ReleaseLockResponse{Released: released, Revision: rev}), nil
}

func (l lockAPI) Describe(ctx context.Context, req *connect.Request[beaconv1.DescribeLockRequest]) (*connect.Response[beaconv1.DescribeLockResponse], error) {
	ns, err := l.readable(ctx, req.Msg.GetNamespace(), req.Msg.GetName())
	if err != nil {
		return nil, err
	}
	st, err := l.s.locks.Describe(ctx, ns, req.Msg.GetName())
	if err != nil {
		return nil, lockError(err)
	}
	return connect.NewResponse(&beaconv1.DescribeLockResponse{Lock: st}), nil
}

func (l lockAPI) List(ctx context.Context, req *connect.Request[beaconv1.ListLocksRequest]) (*connect.Response[beaconv1.ListLocksResponse], error) {
	if err := (api{l.s}).ready(); err != nil {
		return nil, err
	}
	ns, err := namespaceOf(req.Msg.GetNamespace())
	if err == nil {
		err = registry.ValidateKeyPrefix("prefix", req.Msg.GetPrefix())
	}
	if err != nil {
		return nil, toConnectError(err)
	}
	all, err := l.s.locks.List(ctx, ns, req.Msg.GetPrefix())
	if err != nil {
		return nil, lockError(err)
	}
	resp := &beaconv1.ListLocksResponse{}
	authz := identityOf(ctx).Authz
	for _, st := range all {
		if authz.Key(ns, st.GetName()) < acl.Read {
			resp.ResultsFiltered = true
			continue
		}
		resp.Locks = append(resp.Locks, st)
	}
	return connect.NewResponse(resp), nil
}

func (l lockAPI) Proclaim(ctx context.Context, req *connect.Request[beaconv1.ProclaimRequest]) (*connect.Response[beaconv1.ProclaimResponse], error) {
	if err := (api{l.s}).ready(); err != nil {
		return nil, err
	}
	m := req.Msg
	ns, err := l.lockTarget(ctx, m.GetNamespace(), m.GetName(), m.GetSessionId())
	if err != nil {
		return nil, err
	}
	if n := len(m.GetValue()); n > MaxLockValueBytes {
		return nil, toConnectError(&registry.FieldError{Field: "value", Reason: fmt.Sprintf("is %d bytes, at most %d", n, MaxLockValueBytes)})
	}
	if m.GetFencingToken() <= 0 {
		return nil, toConnectError(&registry.FieldError{Field: "fencing_token", Reason: "must be the holder's (from Acquire)"})
	}
	rev, err := l.s.locks.Proclaim(ctx, ns, m.GetName(), m.GetSessionId(), m.GetFencingToken(), m.GetValue())
	if err != nil {
		return nil, lockError(err)
	}
	return connect.NewResponse(&beaconv1.ProclaimResponse{Revision: rev}), nil
}

func (l lockAPI) Observe(ctx context.Context, req *connect.Request[beaconv1.ObserveLockRequest], stream *connect.ServerStream[beaconv1.ObserveLockResponse]) error {
	ns, err := l.readable(ctx, req.Msg.GetNamespace(), req.Msg.GetName())
	if err != nil {
		return err
	}
	heartbeat, err := heartbeatOf(req.Msg.GetHeartbeat())
	if err != nil {
		return err
	}
	giveBack, err := l.s.openWatchStream(ctx)
	if err != nil {
		return err
	}
	defer giveBack()
	valid := recheck(ctx)
	err = l.s.locks.Observe(ctx, ns, req.Msg.GetName(), heartbeat, func(st *beaconv1.LockState, rev int64) error {
		if err := valid(); err != nil {
			return err
		}
		return stream.Send(&beaconv1.ObserveLockResponse{Lock: st, Revision: rev})
	})
	var ce *connect.Error
	if errors.As(err, &ce) && ce.Code() == connect.CodeUnauthenticated {
		return err // the credential is gone
	}
	return nil // the client went away, or the server is stopping
}

// fenceOf validates a KV write's fence and returns the store's form of it
// (nil: no fence).
func (s *Server) fenceOf(ns string, f *beaconv1.Fence) (*kv.Fence, error) {
	if f == nil {
		return nil, nil
	}
	if err := registry.ValidateKey("fence.lock", f.GetLock()); err != nil {
		return nil, toConnectError(err)
	}
	if f.GetSessionId() == 0 || f.GetFencingToken() <= 0 {
		return nil, toConnectError(&registry.FieldError{Field: "fence", Reason: "needs the holder's session_id and fencing_token (from Acquire)"})
	}
	return &kv.Fence{
		Lock: f.GetLock(), Queue: s.store.LockQueue(ns, f.GetLock()),
		HolderKey: s.store.LockKey(ns, f.GetLock(), f.GetSessionId()), Token: f.GetFencingToken(),
	}, nil
}

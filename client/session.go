package client

import (
	"context"
	"errors"
	"fmt"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/internal/backoff"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/session"
)

// Session is one lease held by this process (package session): instances
// registered through it live as long as it does. It keeps itself alive,
// and when the registry lets it expire it opens a new one and registers
// its instances again by itself.
type Session = session.Session

// The session's events and options, from package session.
type (
	SessionEvent     = session.Event
	SessionEventKind = session.EventKind
	SessionOption    = session.Option
)

// What happened to a session.
const (
	SessionDisconnected = session.Disconnected
	SessionResumed      = session.Resumed
	SessionExpired      = session.Expired
	SessionRecovered    = session.Recovered
)

// WithTTL sets the session TTL (default 10s, between 2s and 1h). Keepalives
// are sent every TTL/3.
func WithTTL(ttl time.Duration) SessionOption { return session.WithTTL(ttl) }

// WithSessionName labels the session for operators (e.g. host and pid).
func WithSessionName(name string) SessionOption { return session.WithName(name) }

// WithEvents calls f for every session event, in order, from the session's
// own goroutine, with no lock held (f may call the session).
func WithEvents(f func(SessionEvent)) SessionOption { return session.WithEvents(f) }

// NewSession grants a session and starts keeping it alive. Client.Close
// closes it.
func (c *Client) NewSession(ctx context.Context, opts ...SessionOption) (*Session, error) {
	opts = append([]SessionOption{session.WithNamespace(c.namespace), session.WithLogger(c.log)}, opts...)
	s, err := session.New(ctx, serverLease{c}, opts...)
	if err != nil {
		return nil, err
	}
	if !c.own(s) {
		s.Close(ctx)
		return nil, ErrClosed
	}
	return s, nil
}

// serverLease is a session's lease on beacon servers.
type serverLease struct{ c *Client }

func (l serverLease) Grant(ctx context.Context, ttl time.Duration, name string) (int64, time.Duration, error) {
	req := &beaconv1.CreateSessionRequest{Ttl: durationpb.New(ttl), Name: name}
	type granted struct {
		id   int64
		ttl  time.Duration
		cred string
	}
	g, err := call(ctx, l.c, func(ctx context.Context, r beaconv1connect.RegistryServiceClient) (granted, error) {
		resp, err := r.CreateSession(ctx, connect.NewRequest(req))
		if err != nil {
			return granted{}, err
		}
		return granted{resp.Msg.GetSessionId(), resp.Msg.GetTtl().AsDuration(), resp.Msg.GetSessionToken()}, nil
	})
	if err == nil && g.cred != "" {
		l.c.mu.Lock()
		l.c.creds[g.id] = g.cred
		l.c.mu.Unlock()
	}
	return g.id, g.ttl, err
}

// KeepAlive renews the lease over the client's shared stream if its server
// answers within half of ctx's time (at most the attempt timeout), else by
// the unary call, which moves to another server.
func (l serverLease) KeepAlive(ctx context.Context, id int64) error {
	c := l.c
	budget := c.attemptTimeout
	if dl, ok := ctx.Deadline(); ok {
		budget = min(budget, time.Until(dl)/2)
	}
	sctx, cancel := context.WithTimeout(ctx, budget)
	resp, err := c.ka.keepAlive(sctx, id)
	stalled := sctx.Err() != nil && ctx.Err() == nil
	cancel()
	switch {
	case err == nil && resp.GetExpired():
		c.forgetCredential(id)
		return fmt.Errorf("beacon: session %d: %w", id, ErrSessionExpired)
	case err == nil && resp.GetTtl() != nil:
		return nil
	case ctx.Err() != nil:
		return err
	case stalled:
		// The stream's server accepted the heartbeat but did not answer:
		// treat it as dead rather than wait for the connection's pings.
		c.ka.abandon()
	}
	// The stream is broken, stalled or etcd did not answer: the unary call
	// reports why, and moves to another server if this one is unreachable
	// or does not answer in time.
	req := &beaconv1.KeepAliveRequest{SessionId: id}
	_, err = call(ctx, c, func(ctx context.Context, r beaconv1connect.RegistryServiceClient) (struct{}, error) {
		_, err := r.KeepAlive(ctx, connect.NewRequest(req))
		return struct{}{}, err
	})
	return err
}

// Put registers an instance into the session. With ACLs, an instance a
// previous incarnation of this process still holds (it crashed and
// restarted before its session expired) is not taken over: the server
// says so (Beacon-Held), and Put waits and tries again until that
// session has expired, at most its TTL, or ctx ends.
func (l serverLease) Put(ctx context.Context, id int64, in registry.Instance) (int64, error) {
	in.SessionID = id
	ctx = l.c.withSessionCredential(ctx, id)
	retry := backoff.New(backoff.Config{Base: 200 * time.Millisecond, Max: time.Second})
	for {
		rev, err := l.c.register(ctx, in)
		var ce *connect.Error
		if err == nil || !errors.As(err, &ce) || ce.Meta().Get(heldHeader) == "" {
			return rev, err
		}
		l.c.log.Info("instance held by another live session (an earlier run of this process?): waiting for it to expire", "service", in.Service, "id", in.ID)
		if backoff.Sleep(ctx, retry.Next()) != nil {
			return 0, err
		}
	}
}

// PutMany registers several instances into the session in one request
// (session.BatchLease). Those another live session holds are put again,
// as Put does, until that session has expired or ctx ends.
func (l serverLease) PutMany(ctx context.Context, id int64, ins []registry.Instance) (revs []int64, errs []error, err error) {
	ctx = l.c.withSessionCredential(ctx, id)
	revs, errs = make([]int64, len(ins)), make([]error, len(ins))
	todo := make([]int, len(ins)) // indexes of ins still to put
	batch := make([]registry.Instance, len(ins))
	for i := range ins {
		todo[i] = i
		in, perr := l.c.prepare(ins[i])
		in.SessionID = id
		batch[i], errs[i] = in, perr
	}
	retry := backoff.New(backoff.Config{Base: 200 * time.Millisecond, Max: time.Second})
	for {
		send := make([]registry.Instance, 0, len(todo))
		sent := make([]int, 0, len(todo))
		for _, i := range todo {
			if errs[i] == nil || errors.Is(errs[i], errHeld) {
				send, sent = append(send, batch[i]), append(sent, i)
			}
		}
		if len(send) == 0 {
			return revs, errs, nil
		}
		r, e, held, err := l.c.registerBatch(ctx, id, send)
		if err != nil {
			return nil, nil, err
		}
		todo = todo[:0]
		for j, i := range sent {
			revs[i], errs[i] = r[j], e[j]
			if held[j] {
				errs[i] = fmt.Errorf("%w: %w", errHeld, e[j])
				todo = append(todo, i)
			}
		}
		if len(todo) == 0 {
			return revs, errs, nil
		}
		l.c.log.Info("instances held by another live session (an earlier run of this process?): waiting for it to expire", "held", len(todo))
		if backoff.Sleep(ctx, retry.Next()) != nil {
			return revs, errs, nil
		}
	}
}

// errHeld marks an instance of PutMany still held by another session.
var errHeld = errors.New("held by another live session")

// heldHeader is the server's mark of a registration refused because
// another live session holds the instance (server.HeldHeader).
const heldHeader = "Beacon-Held"

func (l serverLease) Delete(ctx context.Context, id int64, k registry.InstanceKey) (bool, error) {
	return l.c.deregister(l.c.withSessionCredential(ctx, id), k.Namespace, k.Service, k.ID, id)
}

// Revoke closes the session: the registry revokes its lease, which
// removes only the keys still bound to it.
func (l serverLease) Revoke(ctx context.Context, id int64) error {
	req := &beaconv1.CloseSessionRequest{SessionId: id}
	_, err := call(l.c.withSessionCredential(ctx, id), l.c, func(ctx context.Context, r beaconv1connect.RegistryServiceClient) (struct{}, error) {
		_, err := r.CloseSession(ctx, connect.NewRequest(req))
		return struct{}{}, err
	})
	if err == nil || errors.Is(err, ErrSessionExpired) {
		l.c.forgetCredential(id)
	}
	return err
}

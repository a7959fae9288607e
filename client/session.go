package client

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/registry"
)

// SessionEventKind says what happened to a session.
type SessionEventKind int

const (
	// SessionDisconnected: keepalives fail; the session may still be alive.
	SessionDisconnected SessionEventKind = iota + 1
	// SessionResumed: keepalives succeed again on the same session.
	SessionResumed
	// SessionExpired: the lease is gone; its ephemeral instances were removed.
	SessionExpired
	// SessionRecovered: a new session was granted and every instance
	// registered through the old one was registered again.
	SessionRecovered
)

func (k SessionEventKind) String() string {
	switch k {
	case SessionDisconnected:
		return "disconnected"
	case SessionResumed:
		return "resumed"
	case SessionExpired:
		return "expired"
	case SessionRecovered:
		return "recovered"
	}
	return fmt.Sprintf("SessionEventKind(%d)", int(k))
}

// SessionEvent reports a change in a session's life.
type SessionEvent struct {
	Kind         SessionEventKind
	SessionID    int64 // the session in force after the event
	OldSessionID int64 // for SessionRecovered: the expired one
	Reregistered int   // for SessionRecovered: instances registered again
	Err          error // for SessionDisconnected: the last error
}

// SessionOption configures a session.
type SessionOption func(*Session)

// WithTTL sets the session TTL (default 10s, between 2s and 1h). Keepalives
// are sent every TTL/3.
func WithTTL(ttl time.Duration) SessionOption { return func(s *Session) { s.ttl = ttl } }

// WithSessionName labels the session for operators (e.g. host and pid).
func WithSessionName(name string) SessionOption { return func(s *Session) { s.name = name } }

// WithEvents calls f for every session event, in order, from the session's
// own goroutine; f must not block for long.
func WithEvents(f func(SessionEvent)) SessionOption { return func(s *Session) { s.onEvent = f } }

// Session is one lease held by this process. Instances registered through it
// live as long as it does. It keeps itself alive, and when the registry lets
// it expire (the process was frozen, the network was cut for longer than the
// TTL) it opens a new one and registers its instances again by itself.
type Session struct {
	c       *Client
	ttl     time.Duration
	name    string
	onEvent func(SessionEvent)

	// recoverMu serialises recovery with registration so that an instance
	// is never registered under a session that is being replaced.
	recoverMu sync.Mutex
	mu        sync.Mutex
	id        int64                                      // guarded by mu
	instances map[registry.InstanceKey]registry.Instance // guarded by mu

	stop   context.CancelFunc
	done   chan struct{}
	closed sync.Once
}

// NewSession grants a session and starts keeping it alive.
func (c *Client) NewSession(ctx context.Context, opts ...SessionOption) (*Session, error) {
	s := &Session{c: c, ttl: registry.DefaultSessionTTL, instances: make(map[registry.InstanceKey]registry.Instance), done: make(chan struct{})}
	for _, o := range opts {
		o(s)
	}
	if err := registry.ValidateSessionTTL(s.ttl); err != nil {
		return nil, fmt.Errorf("beacon: %w", err)
	}
	id, ttl, err := s.grant(ctx)
	if err != nil {
		return nil, err
	}
	s.id, s.ttl = id, ttl
	runCtx, stop := context.WithCancel(context.Background())
	s.stop = stop
	go s.run(runCtx)
	return s, nil
}

func (s *Session) grant(ctx context.Context) (int64, time.Duration, error) {
	req := &beaconv1.CreateSessionRequest{Ttl: durationpb.New(s.ttl), Name: s.name}
	type granted struct {
		id  int64
		ttl time.Duration
	}
	g, err := call(ctx, s.c, func(ctx context.Context, r beaconv1connect.RegistryServiceClient) (granted, error) {
		resp, err := r.CreateSession(ctx, connect.NewRequest(req))
		if err != nil {
			return granted{}, err
		}
		return granted{resp.Msg.GetSessionId(), resp.Msg.GetTtl().AsDuration()}, nil
	})
	return g.id, g.ttl, err
}

// ID returns the current session id (it changes after recovery).
func (s *Session) ID() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.id
}

// TTL returns the granted TTL.
func (s *Session) TTL() time.Duration { return s.ttl }

// Done is closed when the session has been closed.
func (s *Session) Done() <-chan struct{} { return s.done }

// Register registers an ephemeral instance bound to the session. It is
// registered again automatically if the session has to be replaced.
func (s *Session) Register(ctx context.Context, in registry.Instance) (revision int64, err error) {
	in, err = s.c.prepare(in)
	if err != nil {
		return 0, err
	}
	for attempt := 0; ; attempt++ {
		s.recoverMu.Lock()
		s.mu.Lock()
		if s.instances == nil {
			s.mu.Unlock()
			s.recoverMu.Unlock()
			return 0, ErrClosed
		}
		in.SessionID = s.id
		s.instances[in.Key()] = in
		s.mu.Unlock()
		rev, err := s.c.register(ctx, in)
		s.recoverMu.Unlock()
		if errors.Is(err, ErrSessionExpired) && attempt == 0 {
			// The lease went away under us: replace it, then try once more.
			if rerr := s.recover(ctx); rerr != nil {
				return 0, rerr
			}
			continue
		}
		if err != nil && errors.Is(err, registry.ErrInvalid) {
			s.forget(in.Key())
		}
		return rev, err
	}
}

func (s *Session) forget(k registry.InstanceKey) {
	s.mu.Lock()
	delete(s.instances, k)
	s.mu.Unlock()
}

// Deregister removes an instance registered through the session, if it is
// still the session's: an instance registered again since by someone else
// (persistently, or on another session) is left alone and found is false.
// Client.Deregister removes an instance whoever owns it.
func (s *Session) Deregister(ctx context.Context, service, id string) (found bool, err error) {
	return s.DeregisterKey(ctx, registry.InstanceKey{Service: service, ID: id})
}

// DeregisterKey is Deregister for an instance in another namespace.
func (s *Session) DeregisterKey(ctx context.Context, k registry.InstanceKey) (found bool, err error) {
	k.Namespace = s.c.ns(k.Namespace)
	s.mu.Lock()
	id := s.id
	delete(s.instances, k)
	s.mu.Unlock()
	return s.c.deregister(ctx, k.Namespace, k.Service, k.ID, id)
}

// Close stops the keepalives and ends the session: its instances disappear
// at once. It revokes the session's lease, which removes only the keys
// still bound to it, so an instance someone else registered again since is
// left alone. If the registry is unreachable they expire after the TTL.
func (s *Session) Close(ctx context.Context) error {
	var err error
	s.closed.Do(func() {
		s.stop()
		<-s.done
		s.mu.Lock()
		id := s.id
		s.instances = nil
		s.mu.Unlock()
		req := &beaconv1.CloseSessionRequest{SessionId: id}
		_, err = call(ctx, s.c, func(ctx context.Context, r beaconv1connect.RegistryServiceClient) (struct{}, error) {
			_, err := r.CloseSession(ctx, connect.NewRequest(req))
			return struct{}{}, err
		})
	})
	return err
}

func (s *Session) emit(ev SessionEvent) {
	s.c.log.Info("beacon: session "+ev.Kind.String(), "session", ev.SessionID, "old_session", ev.OldSessionID, "reregistered", ev.Reregistered, "err", ev.Err)
	if s.onEvent != nil {
		s.onEvent(ev)
	}
}

// run sends a keepalive every TTL/3 and recovers an expired session.
func (s *Session) run(ctx context.Context) {
	defer close(s.done)
	interval := s.ttl / 3
	retry := 250 * time.Millisecond
	disconnected := false
	wait := interval
	for {
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		kctx, cancel := context.WithTimeout(ctx, min(interval, 5*time.Second))
		err := s.keepAlive(kctx)
		cancel()
		switch {
		case err == nil:
			if disconnected {
				disconnected = false
				s.emit(SessionEvent{Kind: SessionResumed, SessionID: s.ID()})
			}
			wait, retry = interval, 250*time.Millisecond
		case errors.Is(err, ErrSessionExpired):
			if err := s.recover(ctx); err != nil {
				if ctx.Err() != nil {
					return
				}
				wait = retry
				retry = min(2*retry, interval)
				continue
			}
			disconnected = false
			wait, retry = interval, 250*time.Millisecond
		default:
			if ctx.Err() != nil {
				return
			}
			if !disconnected {
				disconnected = true
				s.emit(SessionEvent{Kind: SessionDisconnected, SessionID: s.ID(), Err: err})
			}
			// Retry quickly: the lease still runs down on the registry.
			wait = retry
			retry = min(2*retry, interval)
		}
	}
}

// keepAlive renews the lease once within ctx: over the shared stream if
// its server answers within half of ctx's time (at most the attempt
// timeout), else by the unary call, which moves to another server.
func (s *Session) keepAlive(ctx context.Context) error {
	id := s.ID()
	budget := s.c.attemptTimeout
	if dl, ok := ctx.Deadline(); ok {
		budget = min(budget, time.Until(dl)/2)
	}
	sctx, cancel := context.WithTimeout(ctx, budget)
	resp, err := s.c.ka.keepAlive(sctx, id)
	stalled := sctx.Err() != nil && ctx.Err() == nil
	cancel()
	switch {
	case err == nil && resp.GetExpired():
		return fmt.Errorf("beacon: session %x: %w", id, ErrSessionExpired)
	case err == nil && resp.GetTtl() != nil:
		return nil
	case ctx.Err() != nil:
		return err
	case stalled:
		// The stream's server accepted the heartbeat but did not answer:
		// treat it as dead rather than wait for the connection's pings.
		s.c.ka.abandon()
	}
	// The stream is broken, stalled or etcd did not answer: the unary call
	// reports why, and moves to another server if this one is unreachable
	// or does not answer in time.
	req := &beaconv1.KeepAliveRequest{SessionId: id}
	_, err = call(ctx, s.c, func(ctx context.Context, r beaconv1connect.RegistryServiceClient) (struct{}, error) {
		_, err := r.KeepAlive(ctx, connect.NewRequest(req))
		return struct{}{}, err
	})
	return err
}

// recover grants a new session and registers every instance again. Only
// one recovery runs at a time; a caller that finds the session already
// replaced returns at once.
func (s *Session) recover(ctx context.Context) error {
	s.mu.Lock()
	old := s.id
	s.mu.Unlock()
	s.recoverMu.Lock()
	defer s.recoverMu.Unlock()
	s.mu.Lock()
	if s.id != old {
		s.mu.Unlock()
		return nil // someone else recovered already
	}
	s.mu.Unlock()
	s.emit(SessionEvent{Kind: SessionExpired, SessionID: old})

	id, _, err := s.grant(ctx)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.id = id
	insts := make([]registry.Instance, 0, len(s.instances))
	for k, in := range s.instances {
		in.SessionID = id
		s.instances[k] = in
		insts = append(insts, in)
	}
	s.mu.Unlock()
	n := 0
	for _, in := range insts {
		if _, err := s.c.register(ctx, in); err != nil {
			// The new session stays; the next keepalive failure or
			// recovery tries again. Report what happened.
			s.emit(SessionEvent{Kind: SessionDisconnected, SessionID: id, Err: fmt.Errorf("re-registering %s/%s: %w", in.Service, in.ID, err)})
			s.mu.Lock()
			s.id = old // force another recovery attempt on the next tick
			s.mu.Unlock()
			return err
		}
		n++
	}
	s.emit(SessionEvent{Kind: SessionRecovered, SessionID: id, OldSessionID: old, Reregistered: n})
	return nil
}

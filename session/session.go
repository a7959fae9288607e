// Package session is the SDK's one session: a lease held by this process,
// kept alive in the background, with the instances registered under it.
// When the registry lets the lease expire (the process was frozen, the
// network cut for longer than the TTL) the session grants a new one and
// puts every instance again by itself, unless WithoutRecovery asks it to
// end instead.
//
// Every registry the SDK runs on (a beacon server, etcd, Consul, memory)
// implements the small Lease interface; the state machine, the backoff
// and the events are here, once.
//
// A Session is safe for concurrent use. Events are delivered in order, one
// at a time, from a goroutine of the session's own, with no lock held: a
// callback may call Register, Deregister or Close.
package session

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"beacon.dev/beacon/internal/backoff"
	"beacon.dev/beacon/registry"
)

var (
	// ErrLost: the lease is gone. Lease methods return errors matching it;
	// a session made WithoutRecovery ends with it.
	ErrLost = errors.New("beacon: session expired")
	// ErrClosed: the session was closed (or the client it came from).
	ErrClosed = errors.New("beacon: closed")
)

// Lease is what a registry provides for sessions. Each method is one
// attempt bounded by ctx; the session retries.
type Lease interface {
	// Grant opens a lease of ttl and returns its id and the TTL granted.
	Grant(ctx context.Context, ttl time.Duration, name string) (id int64, granted time.Duration, err error)
	// KeepAlive renews lease id once. An error matching ErrLost says the
	// lease is gone; a *ReleasedError that it lives but has let some
	// instances go.
	KeepAlive(ctx context.Context, id int64) error
	// Put writes in (SessionID set to id) bound to lease id; an error
	// matching ErrLost if the lease is gone, registry.ErrInvalid if the
	// registry refuses the instance.
	Put(ctx context.Context, id int64, in registry.Instance) (revision int64, err error)
	// Delete removes an instance if it is still bound to lease id.
	Delete(ctx context.Context, id int64, key registry.InstanceKey) (found bool, err error)
	// Revoke ends lease id: its instances go at once.
	Revoke(ctx context.Context, id int64) error
}

// BatchLease is a Lease that also puts several instances in one request
// (beacon servers). RegisterMany uses it where the lease has it, and puts
// one by one where not.
type BatchLease interface {
	Lease
	// PutMany puts each of ins bound to lease id: revs[i] and errs[i] are
	// ins[i]'s outcome, as Put's. err is the call's failure (matching
	// ErrLost if the lease is gone), when nothing is known of any.
	PutMany(ctx context.Context, id int64, ins []registry.Instance) (revs []int64, errs []error, err error)
}

// ReleasedError is KeepAlive's answer when the lease is alive but no
// longer holds some of its instances: someone else registered them since
// (Consul cannot bind an instance to a lease). The session forgets them.
type ReleasedError struct{ Keys []registry.InstanceKey }

func (e *ReleasedError) Error() string {
	return fmt.Sprintf("beacon: %d instances registered again by someone else", len(e.Keys))
}

// EventKind says what happened to a session.
type EventKind int

const (
	// Disconnected: keepalives fail; the lease may still be alive.
	Disconnected EventKind = iota + 1
	// Resumed: keepalives succeed again on the same lease.
	Resumed
	// Expired: the lease is gone; its ephemeral instances were removed.
	Expired
	// Recovered: a new lease was granted and every instance put again.
	Recovered
)

func (k EventKind) String() string {
	switch k {
	case Disconnected:
		return "disconnected"
	case Resumed:
		return "resumed"
	case Expired:
		return "expired"
	case Recovered:
		return "recovered"
	}
	return fmt.Sprintf("EventKind(%d)", int(k))
}

// Event reports a change in a session's life.
type Event struct {
	Kind         EventKind
	SessionID    int64 // the lease in force after the event
	OldSessionID int64 // for Recovered: the expired one
	Reregistered int   // for Recovered: instances put again
	Err          error // for Disconnected: the last error
}

// Option configures a session.
type Option func(*config)

type config struct {
	ttl       time.Duration
	name      string
	namespace string
	onEvent   func(Event)
	recover   bool
	log       *slog.Logger
}

// WithTTL sets the TTL (default 10s, between 2s and 1h). Keepalives go
// every TTL/3.
func WithTTL(ttl time.Duration) Option { return func(c *config) { c.ttl = ttl } }

// WithName labels the session for operators (e.g. host and pid).
func WithName(name string) Option { return func(c *config) { c.name = name } }

// WithNamespace sets the namespace of instances registered without one.
func WithNamespace(ns string) Option { return func(c *config) { c.namespace = ns } }

// WithEvents calls f for every event, in order, from the session's own
// goroutine, with no lock held. f may call the session; while it runs,
// later events wait.
func WithEvents(f func(Event)) Option { return func(c *config) { c.onEvent = f } }

// WithoutRecovery makes a lost lease end the session (Done closes, Err
// matches ErrLost) instead of being replaced: for locks and leadership,
// where a new lease must not silently take the old one's place.
func WithoutRecovery() Option { return func(c *config) { c.recover = false } }

// WithLogger logs the session's events (default: discard).
func WithLogger(l *slog.Logger) Option { return func(c *config) { c.log = l } }

// heartbeatTimeout bounds one keepalive, whatever the TTL.
const heartbeatTimeout = 5 * time.Second

// Session is a lease kept alive, with the instances put under it.
type Session struct {
	lease  Lease
	cfg    config
	stop   context.CancelFunc
	done   chan struct{} // closed when the session has ended
	ended  chan struct{} // closed when run has returned
	kick   chan struct{} // size 1: heartbeat now (a Put found the lease gone)
	events *eventQueue

	mu         sync.Mutex
	id         int64                                      // guarded by mu
	ttl        time.Duration                              // guarded by mu
	instances  map[registry.InstanceKey]registry.Instance // guarded by mu
	recovering bool                                       // guarded by mu; Register and Deregister wait meanwhile
	changed    chan struct{}                              // guarded by mu; closed when id, recovering or beats changes
	beats      int                                        // guarded by mu; keepalives that found the lease alive
	validUntil time.Time                                  // guarded by mu; the lease lives at least until then
	err        error                                      // guarded by mu; why the session ended
	closing    bool                                       // guarded by mu
}

// New grants a lease and starts keeping it alive.
func New(ctx context.Context, lease Lease, opts ...Option) (*Session, error) {
	cfg := config{ttl: registry.DefaultSessionTTL, namespace: registry.DefaultNamespace, recover: true}
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.log == nil {
		cfg.log = slog.New(slog.DiscardHandler)
	}
	if err := registry.ValidateSessionTTL(cfg.ttl); err != nil {
		return nil, fmt.Errorf("beacon: %w", err)
	}
	if err := registry.ValidateNamespace(cfg.namespace); err != nil {
		return nil, fmt.Errorf("beacon: %w", err)
	}
	sent := time.Now()
	id, granted, err := lease.Grant(ctx, cfg.ttl, cfg.name)
	if err != nil {
		return nil, err
	}
	runCtx, stop := context.WithCancel(context.Background())
	s := &Session{
		lease: lease, cfg: cfg, stop: stop,
		done: make(chan struct{}), ended: make(chan struct{}), kick: make(chan struct{}, 1),
		events: newEventQueue(cfg.onEvent),
		id:     id, ttl: cmp.Or(granted, cfg.ttl), validUntil: sent.Add(cmp.Or(granted, cfg.ttl)),
		instances: make(map[registry.InstanceKey]registry.Instance), changed: make(chan struct{}),
	}
	go s.run(runCtx) // owned: ends with Close or a final loss
	return s, nil
}

// ID returns the current lease id (it changes after recovery).
func (s *Session) ID() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.id
}

// Lease returns the current lease id and a time before which the
// registry cannot have let it expire: when its last successful renewal
// (or its grant) was sent, plus the TTL. Holders of locks on the session
// stop before then (client.Mutex).
func (s *Session) Lease() (id int64, validUntil time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.id, s.validUntil
}

// TTL returns the granted TTL.
func (s *Session) TTL() time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ttl
}

// Done is closed when the session has ended: closed, or its lease lost
// for good (WithoutRecovery). Err says why.
func (s *Session) Done() <-chan struct{} { return s.done }

// Err returns nil while the session lives, then why it ended: an error
// matching ErrClosed or ErrLost.
func (s *Session) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Instances returns the instances registered through the session.
func (s *Session) Instances() []registry.Instance {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]registry.Instance, 0, len(s.instances))
	for _, in := range s.instances {
		out = append(out, in.Clone())
	}
	slices.SortFunc(out, func(a, b registry.Instance) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Service, b.Service), cmp.Compare(a.ID, b.ID))
	})
	return out
}

// current waits until no recovery is in progress and returns the lease in
// force, or why the session ended.
func (s *Session) current(ctx context.Context) (int64, error) {
	for {
		s.mu.Lock()
		id, recovering, changed, err := s.id, s.recovering, s.changed, s.err
		if err == nil && s.closing {
			err = ErrClosed
		}
		s.mu.Unlock()
		if err != nil {
			return 0, err
		}
		if !recovering {
			return id, nil
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-s.done:
		case <-changed:
		}
	}
}

// Register puts an ephemeral instance under the session's lease; it is put
// again by itself if the lease has to be replaced.
func (s *Session) Register(ctx context.Context, in registry.Instance) (revision int64, err error) {
	in = in.Clone()
	in.Namespace = cmp.Or(in.Namespace, s.cfg.namespace)
	in.Revision = 0
	in.ApplyDefaults()
	if err := in.Validate(); err != nil {
		return 0, fmt.Errorf("beacon: %w", err)
	}
	k := in.Key()
	for attempt := 0; ; attempt++ {
		id, err := s.current(ctx)
		if err != nil {
			return 0, err
		}
		in.SessionID = id
		s.mu.Lock()
		if s.id != id || s.recovering {
			s.mu.Unlock()
			continue
		}
		s.instances[k] = in
		s.mu.Unlock()
		rev, err := s.lease.Put(ctx, id, in)
		switch {
		case errors.Is(err, ErrLost) && attempt < 2:
			// The lease went away under us: have it replaced (which puts
			// this instance too), then put it once more for its revision.
			s.lostLease(ctx, id)
			continue
		case errors.Is(err, registry.ErrInvalid):
			s.forget(k, in)
		}
		return rev, err
	}
}

// RegisterMany registers several instances into the session, in one
// request where the registry takes batches (a beacon server; with other
// backends one by one), each put again by itself if the lease has to be
// replaced. revisions[i] is ins[i]'s revision, 0 if it was refused; err
// joins the refusals, each naming its instance and matching what Register
// would have returned (errors.Is works on it).
func (s *Session) RegisterMany(ctx context.Context, ins []registry.Instance) (revisions []int64, err error) {
	revisions = make([]int64, len(ins))
	errs := make([]error, len(ins))
	var ok []int // indexes of the valid instances
	prepared := make([]registry.Instance, len(ins))
	first := make(map[registry.InstanceKey]int, len(ins))
	for i, in := range ins {
		in = in.Clone()
		in.Namespace = cmp.Or(in.Namespace, s.cfg.namespace)
		in.Revision = 0
		in.ApplyDefaults()
		errs[i] = in.Validate()
		if j, dup := first[in.Key()]; dup && errs[i] == nil {
			errs[i] = &registry.FieldError{Field: fmt.Sprintf("instances[%d]", i), Reason: fmt.Sprintf("registers %s/%s again (already instances[%d]): each instance at most once per call", in.Service, in.ID, j)}
		}
		if errs[i] == nil {
			first[in.Key()] = i
			ok = append(ok, i)
		}
		prepared[i] = in
	}
	for attempt := 0; len(ok) > 0; attempt++ {
		id, err := s.current(ctx)
		if err != nil {
			return nil, err
		}
		s.mu.Lock()
		if s.id != id || s.recovering {
			s.mu.Unlock()
			continue
		}
		batch := make([]registry.Instance, len(ok))
		for j, i := range ok {
			prepared[i].SessionID = id
			s.instances[prepared[i].Key()] = prepared[i]
			batch[j] = prepared[i]
		}
		s.mu.Unlock()
		revs, perrs, err := s.putMany(ctx, id, batch)
		lost := errors.Is(err, ErrLost)
		for _, e := range perrs {
			lost = lost || errors.Is(e, ErrLost)
		}
		if lost && attempt < 2 {
			s.lostLease(ctx, id) // as Register: have it replaced, then put once more
			continue
		}
		if err != nil {
			return nil, err
		}
		for j, i := range ok {
			revisions[i], errs[i] = revs[j], perrs[j]
			if errors.Is(perrs[j], registry.ErrInvalid) {
				s.forget(prepared[i].Key(), prepared[i])
			}
		}
		break
	}
	var refused []error
	for i, e := range errs {
		if e != nil {
			refused = append(refused, fmt.Errorf("beacon: instance %d (%s/%s): %w", i, ins[i].Service, ins[i].ID, e))
		}
	}
	return revisions, errors.Join(refused...)
}

// putMany puts batch under lease id in one request if the lease can, else
// one by one.
func (s *Session) putMany(ctx context.Context, id int64, batch []registry.Instance) ([]int64, []error, error) {
	if bl, ok := s.lease.(BatchLease); ok {
		return bl.PutMany(ctx, id, batch)
	}
	revs, errs := make([]int64, len(batch)), make([]error, len(batch))
	for i, in := range batch {
		revs[i], errs[i] = s.lease.Put(ctx, id, in)
		if ctx.Err() != nil {
			return nil, nil, ctx.Err()
		}
	}
	return revs, errs, nil
}

// lostLease asks run to check lease id now and waits until it has been
// replaced, found alive after all, or the session ends.
func (s *Session) lostLease(ctx context.Context, id int64) {
	s.mu.Lock()
	beats := s.beats
	s.mu.Unlock()
	select {
	case s.kick <- struct{}{}:
	default:
	}
	for {
		s.mu.Lock()
		moved := (s.id != id || s.beats != beats) && !s.recovering
		changed := s.changed
		s.mu.Unlock()
		if moved {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-s.done:
			return
		case <-changed:
		}
	}
}

// forget drops k if it is still the instance in.
func (s *Session) forget(k registry.InstanceKey, in registry.Instance) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if cur, ok := s.instances[k]; ok && cur.SessionID == in.SessionID {
		delete(s.instances, k)
	}
}

// Deregister removes an instance registered through the session, if it is
// still the session's: one registered again since by someone else is left
// alone and found is false. An empty namespace means the session's.
func (s *Session) Deregister(ctx context.Context, service, id string) (found bool, err error) {
	return s.DeregisterKey(ctx, registry.InstanceKey{Service: service, ID: id})
}

// DeregisterKey is Deregister for an instance in another namespace.
func (s *Session) DeregisterKey(ctx context.Context, k registry.InstanceKey) (found bool, err error) {
	k.Namespace = cmp.Or(k.Namespace, s.cfg.namespace)
	if err := registry.ValidateName("service", k.Service); err != nil {
		return false, fmt.Errorf("beacon: %w", err)
	}
	lease, err := s.current(ctx)
	if err != nil {
		return false, err
	}
	s.mu.Lock()
	delete(s.instances, k)
	s.mu.Unlock()
	return s.lease.Delete(ctx, lease, k)
}

// Close stops the keepalives and revokes the lease: its instances go at
// once, except any registered again since by someone else. If the
// registry cannot be told (ctx done, registry unreachable) they expire
// after the TTL, as a crashed process's do. Close may be called from an
// event callback.
func (s *Session) Close(ctx context.Context) error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		<-s.ended
		return nil
	}
	s.closing = true
	s.mu.Unlock()
	s.stop()
	<-s.ended
	s.mu.Lock()
	id, lost := s.id, s.err != nil
	s.instances = map[registry.InstanceKey]registry.Instance{}
	s.mu.Unlock()
	s.finish(ErrClosed)
	if lost {
		return nil // nothing to revoke
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return s.lease.Revoke(ctx, id)
}

// finish ends the session with err, once.
func (s *Session) finish(err error) {
	s.mu.Lock()
	first := s.err == nil
	if first {
		s.err = err
	}
	s.mu.Unlock()
	if first {
		close(s.done)
		s.events.close()
	}
}

func (s *Session) emit(ev Event) {
	s.cfg.log.Info("beacon: session "+ev.Kind.String(), "session", ev.SessionID, "old_session", ev.OldSessionID, "reregistered", ev.Reregistered, "err", ev.Err)
	s.events.push(ev)
}

// setState changes the lease in force and wakes those waiting on it.
func (s *Session) setState(id int64, recovering bool) {
	s.mu.Lock()
	s.id, s.recovering = id, recovering
	s.changedLocked()
	s.mu.Unlock()
}

func (s *Session) changedLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// run sends a keepalive every TTL/3 and replaces a lost lease.
func (s *Session) run(ctx context.Context) {
	defer close(s.ended)
	interval := s.TTL() / 3
	retry := backoff.New(backoff.Config{Base: 250 * time.Millisecond, Max: interval})
	wait := interval
	disconnected := false
	for {
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		case <-s.kick:
			t.Stop()
		}
		id := s.ID()
		sent := time.Now()
		kctx, cancel := context.WithTimeout(ctx, min(interval, heartbeatTimeout))
		err := s.lease.KeepAlive(kctx, id)
		cancel()
		var released *ReleasedError
		if errors.As(err, &released) {
			s.release(released.Keys)
			err = nil
		}
		switch {
		case ctx.Err() != nil:
			return
		case err == nil:
			s.mu.Lock()
			s.beats++
			if s.id == id {
				s.validUntil = sent.Add(s.ttl)
			}
			s.changedLocked()
			s.mu.Unlock()
			if disconnected {
				disconnected = false
				s.emit(Event{Kind: Resumed, SessionID: id})
			}
			wait = interval
			retry.Reset()
		case errors.Is(err, ErrLost):
			s.emit(Event{Kind: Expired, SessionID: id})
			if !s.cfg.recover {
				s.finish(fmt.Errorf("beacon: session %d: %w", id, ErrLost))
				return
			}
			if !s.replace(ctx, id) {
				return
			}
			disconnected = false
			wait = interval
			retry.Reset()
		default:
			if !disconnected {
				disconnected = true
				s.emit(Event{Kind: Disconnected, SessionID: id, Err: err})
			}
			// Retry soon: the lease runs down on the registry meanwhile.
			wait = retry.Next()
		}
	}
}

func (s *Session) release(keys []registry.InstanceKey) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, k := range keys {
		delete(s.instances, k)
	}
}

// replace grants a new lease and puts every instance under it. Register
// and Deregister wait meanwhile, so nothing is put under the new lease
// before the instances held are, and nothing deregistered comes back. It
// returns false when ctx ended first.
func (s *Session) replace(ctx context.Context, old int64) bool {
	s.setState(old, true)
	retry := backoff.New(backoff.Config{Base: 250 * time.Millisecond, Max: max(s.TTL()/3, time.Second)})
	for {
		sent := time.Now()
		id, granted, err := s.lease.Grant(ctx, s.cfg.ttl, s.cfg.name)
		if err != nil {
			if ctx.Err() != nil || retry.Wait(ctx) != nil {
				return false
			}
			continue
		}
		s.mu.Lock()
		insts := make([]registry.Instance, 0, len(s.instances))
		for k, in := range s.instances {
			in.SessionID = id
			s.instances[k] = in
			insts = append(insts, in)
		}
		s.ttl = cmp.Or(granted, s.cfg.ttl) // the new lease's, not the old one's
		s.id, s.validUntil = id, sent.Add(s.ttl)
		s.mu.Unlock()
		n, lost := s.putAll(ctx, id, insts, retry)
		if ctx.Err() != nil {
			return false
		}
		if lost {
			s.emit(Event{Kind: Expired, SessionID: id})
			continue
		}
		s.setState(id, false)
		s.emit(Event{Kind: Recovered, SessionID: id, OldSessionID: old, Reregistered: n})
		return true
	}
}

// putAll puts insts under lease id, retrying each until it is in, refused
// or the lease is lost.
func (s *Session) putAll(ctx context.Context, id int64, insts []registry.Instance, retry *backoff.Backoff) (n int, lost bool) {
	for _, in := range insts {
		for {
			_, err := s.lease.Put(ctx, id, in)
			if err == nil {
				n++
				break
			}
			if errors.Is(err, ErrLost) {
				return n, true
			}
			if errors.Is(err, registry.ErrInvalid) {
				s.forget(in.Key(), in)
				break
			}
			s.emit(Event{Kind: Disconnected, SessionID: id, Err: fmt.Errorf("registering %s/%s/%s again: %w", in.Namespace, in.Service, in.ID, err)})
			if retry.Wait(ctx) != nil {
				return n, false
			}
		}
	}
	return n, false
}

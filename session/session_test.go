package session_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/session"
)

// registryLease is a small registry of its own behind the Lease interface,
// with switches to lose a lease or cut the network.
type registryLease struct {
	mu        sync.Mutex
	next      int64
	alive     map[int64]bool
	instances map[registry.InstanceKey]registry.Instance
	cut       bool // every call fails as if the registry were unreachable
	revoked   []int64
	released  []registry.InstanceKey
	putGate   chan struct{} // when set, Put waits for it
}

var errCut = errors.New("registry unreachable")

func newRegistryLease() *registryLease {
	return &registryLease{alive: map[int64]bool{}, instances: map[registry.InstanceKey]registry.Instance{}}
}

func (l *registryLease) Grant(ctx context.Context, ttl time.Duration, name string) (int64, time.Duration, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cut {
		return 0, 0, errCut
	}
	l.next++
	l.alive[l.next] = true
	return l.next, ttl, nil
}

func (l *registryLease) KeepAlive(ctx context.Context, id int64) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case l.cut:
		return errCut
	case !l.alive[id]:
		return session.ErrLost
	case len(l.released) > 0:
		keys := l.released
		l.released = nil
		return &session.ReleasedError{Keys: keys}
	}
	return nil
}

func (l *registryLease) Put(ctx context.Context, id int64, in registry.Instance) (int64, error) {
	l.mu.Lock()
	gate := l.putGate
	l.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cut {
		return 0, errCut
	}
	if !l.alive[id] {
		return 0, session.ErrLost
	}
	in.SessionID = id
	l.instances[in.Key()] = in
	return int64(len(l.instances)), nil
}

func (l *registryLease) Delete(ctx context.Context, id int64, k registry.InstanceKey) (bool, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if in, ok := l.instances[k]; ok && in.SessionID == id {
		delete(l.instances, k)
		return true, nil
	}
	return false, nil
}

func (l *registryLease) Revoke(ctx context.Context, id int64) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cut {
		return errCut
	}
	l.revoked = append(l.revoked, id)
	l.expireLocked(id)
	return nil
}

// expire ends lease id as a registry does when its TTL runs out.
func (l *registryLease) expire(id int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.expireLocked(id)
}

func (l *registryLease) expireLocked(id int64) {
	delete(l.alive, id)
	for k, in := range l.instances {
		if in.SessionID == id {
			delete(l.instances, k)
		}
	}
}

// held returns the ids of the instances held, with their lease.
func (l *registryLease) held() map[string]int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := map[string]int64{}
	for k, in := range l.instances {
		out[k.ID] = in.SessionID
	}
	return out
}

func (l *registryLease) setCut(cut bool) {
	l.mu.Lock()
	l.cut = cut
	l.mu.Unlock()
}

func instance(id string) registry.Instance {
	return registry.Instance{Service: "orders", ID: id, Address: "127.0.0.1", Port: 9000}
}

// eventLog records events as they are delivered.
type eventLog struct {
	mu     sync.Mutex
	events []session.Event
}

func (e *eventLog) add(ev session.Event) {
	e.mu.Lock()
	e.events = append(e.events, ev)
	e.mu.Unlock()
}

func (e *eventLog) kinds() []session.EventKind {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []session.EventKind
	for _, ev := range e.events {
		out = append(out, ev.Kind)
	}
	return out
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within 30s: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// newSession starts a session on l, closed when the test ends, with the
// given instances registered.
func newSession(ctx context.Context, t *testing.T, l session.Lease, ids []string, opts ...session.Option) *session.Session {
	t.Helper()
	s, err := session.New(ctx, l, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close(context.Background()) })
	for _, id := range ids {
		if _, err := s.Register(ctx, instance(id)); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

// A lost lease is replaced and every instance put again under the new
// one; the events say so, in order.
func TestLostLeaseIsReplaced(t *testing.T) {
	ctx := testCtx(t)
	l := newRegistryLease()
	var log eventLog
	s := newSession(ctx, t, l, []string{"a", "b"}, session.WithTTL(2*time.Second), session.WithEvents(log.add))
	first := s.ID()
	l.expire(first)
	eventually(t, "the instances are back under a new lease", func() bool {
		h := l.held()
		return len(h) == 2 && h["a"] == s.ID() && h["b"] == s.ID() && s.ID() != first
	})
	eventually(t, "expired then recovered", func() bool {
		return slices.Equal(log.kinds(), []session.EventKind{session.Expired, session.Recovered})
	})
	log.mu.Lock()
	rec := log.events[1]
	log.mu.Unlock()
	if rec.OldSessionID != first || rec.SessionID != s.ID() || rec.Reregistered != 2 {
		t.Errorf("Recovered event = %+v, want old %d, new %d, 2 registered again", rec, first, s.ID())
	}
}

// A callback may call the session: registering from the Expired and
// Recovered events neither deadlocks nor loses the instance.
func TestCallbackMayRegister(t *testing.T) {
	ctx := testCtx(t)
	l := newRegistryLease()
	var s *session.Session
	ready := make(chan struct{})
	var mu sync.Mutex
	var errs []error
	s, err := session.New(ctx, l, session.WithTTL(2*time.Second), session.WithEvents(func(ev session.Event) {
		<-ready
		_, err := s.Register(ctx, instance(fmt.Sprint("from-", ev.Kind)))
		mu.Lock()
		errs = append(errs, err)
		mu.Unlock()
	}))
	if err != nil {
		t.Fatal(err)
	}
	close(ready)
	defer s.Close(ctx)
	if _, err := s.Register(ctx, instance("a")); err != nil {
		t.Fatal(err)
	}
	l.expire(s.ID())
	eventually(t, "both callbacks registered, under the new lease", func() bool {
		h := l.held()
		return len(h) == 3 && h["from-expired"] == s.ID() && h["from-recovered"] == s.ID() && h["a"] == s.ID()
	})
	mu.Lock()
	defer mu.Unlock()
	for _, err := range errs {
		if err != nil {
			t.Errorf("Register from a callback: %v", err)
		}
	}
}

// A Register that finds the lease gone waits for the replacement and
// succeeds under the new lease.
func TestRegisterOnALostLeaseLandsOnTheNewOne(t *testing.T) {
	ctx := testCtx(t)
	l := newRegistryLease()
	s := newSession(ctx, t, l, nil, session.WithTTL(time.Hour))
	old := s.ID()
	l.expire(old)
	// The next heartbeat is 20 minutes away: only the Put's discovery can
	// trigger the replacement.
	if _, err := s.Register(ctx, instance("a")); err != nil {
		t.Fatalf("Register on a lost lease: %v", err)
	}
	if h := l.held(); h["a"] != s.ID() || s.ID() == old {
		t.Errorf("held %v, session %d (old %d)", h, s.ID(), old)
	}
}

// Without recovery a lost lease ends the session.
func TestWithoutRecoveryEndsOnLoss(t *testing.T) {
	ctx := testCtx(t)
	l := newRegistryLease()
	s := newSession(ctx, t, l, []string{"a"}, session.WithTTL(2*time.Second), session.WithoutRecovery())
	l.expire(s.ID())
	select {
	case <-s.Done():
	case <-ctx.Done():
		t.Fatal("Done not closed after the lease was lost")
	}
	if !errors.Is(s.Err(), session.ErrLost) {
		t.Errorf("Err() = %v, want ErrLost", s.Err())
	}
	if _, err := s.Register(ctx, instance("b")); !errors.Is(err, session.ErrLost) {
		t.Errorf("Register after the loss = %v, want ErrLost", err)
	}
	if l.next != 1 {
		t.Errorf("%d leases granted, want no replacement", l.next)
	}
}

// Close revokes the lease, ends the session and refuses later calls; it
// may be called from a callback.
func TestCloseEndsTheSession(t *testing.T) {
	ctx := testCtx(t)
	l := newRegistryLease()
	var s *session.Session
	closed := make(chan error, 1)
	ready := make(chan struct{})
	s, err := session.New(ctx, l, session.WithTTL(2*time.Second), session.WithEvents(func(ev session.Event) {
		<-ready
		if ev.Kind == session.Disconnected {
			closed <- s.Close(ctx)
		}
	}))
	if err != nil {
		t.Fatal(err)
	}
	close(ready)
	if _, err := s.Register(ctx, instance("a")); err != nil {
		t.Fatal(err)
	}
	l.setCut(true)
	var cerr error
	select {
	case cerr = <-closed:
	case <-ctx.Done():
		t.Fatal("the callback's Close did not return")
	}
	if !errors.Is(cerr, errCut) {
		t.Errorf("Close with the registry cut = %v, want its error", cerr)
	}
	if !errors.Is(s.Err(), session.ErrClosed) {
		t.Errorf("Err() = %v, want ErrClosed", s.Err())
	}
	if _, err := s.Register(ctx, instance("b")); !errors.Is(err, session.ErrClosed) {
		t.Errorf("Register after Close = %v, want ErrClosed", err)
	}
	l.setCut(false)
	if err := s.Close(ctx); err != nil {
		t.Errorf("second Close = %v", err)
	}
}

// A registry unreachable for a while: Disconnected, then Resumed on the
// same lease.
func TestDisconnectedThenResumed(t *testing.T) {
	ctx := testCtx(t)
	l := newRegistryLease()
	var log eventLog
	s := newSession(ctx, t, l, nil, session.WithTTL(2*time.Second), session.WithEvents(log.add))
	id := s.ID()
	l.setCut(true)
	eventually(t, "disconnected", func() bool { return slices.Contains(log.kinds(), session.Disconnected) })
	l.setCut(false)
	eventually(t, "resumed", func() bool {
		return slices.Equal(log.kinds(), []session.EventKind{session.Disconnected, session.Resumed})
	})
	if s.ID() != id {
		t.Errorf("lease changed %d → %d", id, s.ID())
	}
}

// Instances the lease let go are forgotten: not put again on recovery.
func TestReleasedInstancesAreForgotten(t *testing.T) {
	ctx := testCtx(t)
	l := newRegistryLease()
	s := newSession(ctx, t, l, []string{"a", "b"}, session.WithTTL(2*time.Second))
	l.mu.Lock()
	l.released = []registry.InstanceKey{{Namespace: registry.DefaultNamespace, Service: "orders", ID: "b"}}
	l.mu.Unlock()
	eventually(t, "b forgotten", func() bool { return len(s.Instances()) == 1 })
	if got := s.Instances()[0].ID; got != "a" {
		t.Errorf("instances held = %v", got)
	}
}

// A Deregister issued while the lease is being replaced waits, so the
// replacement does not bring the instance back.
func TestDeregisterDuringRecoveryStays(t *testing.T) {
	ctx := testCtx(t)
	l := newRegistryLease()
	s := newSession(ctx, t, l, []string{"a"}, session.WithTTL(2*time.Second))
	gate := make(chan struct{})
	l.mu.Lock()
	l.putGate = gate
	l.mu.Unlock()
	old := s.ID()
	l.expire(old)
	eventually(t, "the replacement is under way", func() bool { return s.ID() != old })
	done := make(chan error, 1)
	go func() {
		_, err := s.Deregister(ctx, "orders", "a")
		done <- err
	}()
	close(gate) // the replacement puts a again, then the Deregister runs
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if h := l.held(); len(h) != 0 {
		t.Errorf("held after Deregister: %v", h)
	}
	if n := len(s.Instances()); n != 0 {
		t.Errorf("session holds %d instances", n)
	}
}

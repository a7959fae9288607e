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

// Lock errors.
var (
	// ErrLockHeld: TryLock found the lock held by another session.
	ErrLockHeld = errors.New("beacon: lock held by another session")
	// ErrLockLost is the cause (context.Cause) of a Held's context ending
	// because the lock may no longer be held: its session ended, or was
	// not renewed in time to be sure.
	ErrLockLost = errors.New("beacon: lock lost")
	// ErrFenced is matched (errors.Is) by a fenced KV write refused by the
	// store: the lock is no longer held with the write's token.
	ErrFenced = errors.New("beacon: fenced")
)

// Mutex is a distributed lock (docs/locks.md) held by a session: it is
// released when the session ends. Waiters get it in the order they came.
// Each acquisition has a fencing token, larger than every earlier one,
// that KV writes carry (Fenced) so that the store refuses a holder that
// lost the lock.
type Mutex struct {
	c     *Client
	s     *Session
	name  string
	ns    string
	value []byte // kept with the session's place in the queue (elections)
}

// Mutex returns the lock name (a key name: locking it needs key:write on
// it) held by session s.
func (c *Client) Mutex(s *Session, name string, opts ...CallOption) *Mutex {
	return &Mutex{c: c, s: s, name: name, ns: c.options(opts).namespace}
}

// LockWaitPerCall is how long one Acquire call waits on the server; Lock
// calls again (keeping its place in the queue) until its context ends.
const LockWaitPerCall = 30 * time.Second

// turn is the process-local side of a lock: the server queues sessions,
// so goroutines sharing a session take turns here first (two of them
// would otherwise both find the session's place at the head of the queue
// and both believe they hold the lock).
func (m *Mutex) turn() chan struct{} {
	id, _ := m.s.Lease()
	t, _ := m.c.turns.LoadOrStore(fmt.Sprintf("%d/%s/%s", id, m.ns, m.name), make(chan struct{}, 1))
	return t.(chan struct{})
}

// Lock waits until the session holds the lock, or ctx ends (then the
// session leaves the queue). Goroutines locking the same name on the
// same session take turns.
func (m *Mutex) Lock(ctx context.Context) (*Held, error) {
	if err := registry.ValidateKey("lock name", m.name); err != nil {
		return nil, err
	}
	turn := m.turn()
	select {
	case turn <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	h, err := m.lock(ctx)
	if err != nil {
		<-turn
		return nil, err
	}
	h.turn = turn
	return h, nil
}

func (m *Mutex) lock(ctx context.Context) (*Held, error) {
	for {
		wait := LockWaitPerCall
		if dl, ok := ctx.Deadline(); ok {
			wait = min(wait, max(time.Until(dl), 0))
		}
		h, err := m.acquire(ctx, wait)
		if err == nil || !errors.Is(err, ErrLockHeld) {
			return h, err
		}
		if ctx.Err() != nil {
			id, _ := m.s.Lease()
			m.leave(id) // its place was kept for the next call
			return nil, ctx.Err()
		}
	}
}

// TryLock takes the lock if it is free, or returns ErrLockHeld.
func (m *Mutex) TryLock(ctx context.Context) (*Held, error) {
	if err := registry.ValidateKey("lock name", m.name); err != nil {
		return nil, err
	}
	turn := m.turn()
	select {
	case turn <- struct{}{}:
	default:
		return nil, fmt.Errorf("%w: %q, by this session in this process", ErrLockHeld, m.name)
	}
	h, err := m.acquire(ctx, 0)
	if err != nil {
		<-turn
		return nil, err
	}
	h.turn = turn
	return h, nil
}

func (m *Mutex) acquire(ctx context.Context, wait time.Duration) (*Held, error) {
	for {
		h, session, err := m.tryAcquire(ctx, wait)
		if err != nil && !errors.Is(err, ErrLockHeld) && !errors.Is(err, ErrNotFound) {
			// Given up, or no server answered for sure: the session may be
			// in the queue (a lost answer); leave it, or it would hold up
			// the lock until the session ends.
			m.leave(session)
		}
		if !errors.Is(err, ErrNotFound) {
			return h, err
		}
		// The session's lease is gone (it expired while this process was
		// paused, say): the session replaces it by itself; lock on the new
		// one, never the old.
		if err := m.newLease(ctx, session); err != nil {
			return nil, err
		}
	}
}

// newLease waits until the session has a lease other than old.
func (m *Mutex) newLease(ctx context.Context, old int64) error {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		if id, _ := m.s.Lease(); id != old {
			return nil
		}
		select {
		case <-t.C:
		case <-m.s.Done():
			return fmt.Errorf("beacon: the lock's session ended: %w", m.s.Err())
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (m *Mutex) tryAcquire(ctx context.Context, wait time.Duration) (*Held, int64, error) {
	session, _ := m.s.Lease()
	// Waiting calls keep the session's place in the queue between them
	// (FIFO across calls); the session leaves when Lock gives up.
	req := &beaconv1.AcquireLockRequest{Namespace: m.ns, Name: m.name, SessionId: session, Wait: durationpb.New(wait), Value: m.value, KeepPlace: wait > 0}
	// An Acquire may be repeated: the server finds the session's place in
	// the queue. The attempt timeout covers the wait.
	resp, err := failoverWithin(ctx, m.c, m.c.locks, repeatable, m.c.attemptTimeout+wait, func(ctx context.Context, l beaconv1connect.LockServiceClient) (*beaconv1.AcquireLockResponse, error) {
		resp, err := l.Acquire(ctx, connect.NewRequest(req))
		if err != nil {
			return nil, err
		}
		return resp.Msg, nil
	})
	if err != nil {
		return nil, session, kvError(err)
	}
	if !resp.GetAcquired() {
		return nil, session, fmt.Errorf("%w: %q, by session %x with fencing token %d", ErrLockHeld, m.name, resp.GetLock().GetHolder().GetSessionId(), resp.GetFencingToken())
	}
	return m.hold(session, resp.GetFencingToken()), session, nil
}

// leave takes the session out of the queue after a Lock given up while
// its call was in flight.
func (m *Mutex) leave(session int64) {
	ctx, cancel := context.WithTimeout(context.Background(), m.c.attemptTimeout)
	defer cancel()
	_, _ = m.release(ctx, session)
}

func (m *Mutex) release(ctx context.Context, session int64) (bool, error) {
	req := &beaconv1.ReleaseLockRequest{Namespace: m.ns, Name: m.name, SessionId: session}
	return lockCall(ctx, m.c, m.c.locks, func(ctx context.Context, l beaconv1connect.LockServiceClient) (bool, error) {
		resp, err := l.Release(ctx, connect.NewRequest(req))
		if err != nil {
			return false, err
		}
		return resp.Msg.GetReleased(), nil
	})
}

func lockCall[S, T any](ctx context.Context, c *Client, stubs []S, f func(context.Context, S) (T, error)) (T, error) {
	v, err := failover(ctx, c, stubs, repeatable, f)
	return v, kvError(err)
}

// Held is one acquisition of a lock.
type Held struct {
	m       *Mutex
	session int64
	token   int64
	ctx     context.Context
	cancel  context.CancelCauseFunc
	stop    chan struct{} // closed by Unlock
	done    chan struct{} // closed when the watchdog has returned
	turn    chan struct{} // the process-local turn, given back by Unlock
	unlock  sync.Once
	err     error // Unlock's, set once
}

// Token is the acquisition's fencing token: larger than every earlier
// holder's.
func (h *Held) Token() int64 { return h.token }

// Context ends (context.Cause: ErrLockLost) when the lock may no longer
// be held — the session ended, or its last renewal is older than the TTL
// less a margin, so it ends before the registry could let the session
// expire and give the lock to someone else — and at Unlock. Do the
// critical section's work under it, and fence its writes (Fenced).
func (h *Held) Context() context.Context { return h.ctx }

// lockMargin is how long before the session could expire a holder stops.
func lockMargin(ttl time.Duration) time.Duration { return max(ttl/5, 500*time.Millisecond) }

func (m *Mutex) hold(session, token int64) *Held {
	ctx, cancel := context.WithCancelCause(context.Background())
	h := &Held{m: m, session: session, token: token, ctx: ctx, cancel: cancel, stop: make(chan struct{}), done: make(chan struct{})}
	go h.watch() // owned by the Held: Unlock stops it, or it ends the context itself
	return h
}

func (h *Held) watch() {
	defer close(h.done)
	s := h.m.s
	margin := lockMargin(s.TTL())
	for {
		id, until := s.Lease()
		if id != h.session {
			h.cancel(fmt.Errorf("%w: the session's lease was replaced (the old one expired)", ErrLockLost))
			return
		}
		d := time.Until(until.Add(-margin))
		if d <= 0 {
			h.cancel(fmt.Errorf("%w: the session was not renewed in time to be sure it still holds the lock", ErrLockLost))
			return
		}
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-s.Done():
			t.Stop()
			h.cancel(fmt.Errorf("%w: the session ended", ErrLockLost))
			return
		case <-h.stop:
			t.Stop()
			return
		}
	}
}

// Unlock releases the lock and ends the Held's context.
func (h *Held) Unlock(ctx context.Context) error {
	h.unlock.Do(func() {
		close(h.stop)
		<-h.done
		h.cancel(errors.New("beacon: unlocked"))
		_, h.err = h.m.release(ctx, h.session)
		if h.turn != nil {
			<-h.turn
		}
	})
	return h.err
}

// Fenced makes a KV write (Put, CompareAndSwap, Delete, CompareAndDelete,
// Txn) happen only while h still holds its lock: the store checks it in
// the write's own transaction, and refuses it with ErrFenced otherwise.
func Fenced(h *Held) CallOption {
	return func(c *callConfig) {
		c.fence = &beaconv1.Fence{Lock: h.m.name, SessionId: h.session, FencingToken: h.token}
	}
}

// Locks lists the locks whose names start with prefix, with their holders
// and waiters (those the token may read).
func (c *Client) Locks(ctx context.Context, prefix string, opts ...CallOption) ([]*beaconv1.LockState, error) {
	req := &beaconv1.ListLocksRequest{Namespace: c.options(opts).namespace, Prefix: prefix}
	return lockCall(ctx, c, c.locks, func(ctx context.Context, l beaconv1connect.LockServiceClient) ([]*beaconv1.LockState, error) {
		resp, err := l.List(ctx, connect.NewRequest(req))
		if err != nil {
			return nil, err
		}
		return resp.Msg.GetLocks(), nil
	})
}

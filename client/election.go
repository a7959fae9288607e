package client

import (
	"context"
	"errors"
	"sync"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/registry"
)

// Election is a leader election on a lock (docs/locks.md), as etcd's
// concurrency.Election: candidates campaign with a value (their address,
// say) and lead in the order they came; the leader proclaims new values
// and resigns by unlocking; anyone can read or observe the leader. The
// leader's Held has a fencing token and a context that ends before its
// session could expire, as a Mutex's.
type Election struct{ m *Mutex }

// Election returns the election name (a key name: campaigning needs
// key:write on it, observing key:read) for session s.
func (c *Client) Election(s *Session, name string, opts ...CallOption) *Election {
	return &Election{m: c.Mutex(s, name, opts...)}
}

// Campaign waits until the session leads with value (at most 4 KiB).
func (e *Election) Campaign(ctx context.Context, value []byte) (*Held, error) {
	m := *e.m
	m.value = value
	return m.Lock(ctx)
}

// Proclaim changes the leader's value, only while h still leads (else
// ErrFenced).
func (h *Held) Proclaim(ctx context.Context, value []byte) error {
	req := &beaconv1.ProclaimRequest{Namespace: h.m.ns, Name: h.m.name, SessionId: h.session, FencingToken: h.token, Value: value}
	_, err := lockCall(ctx, h.m.c, h.m.c.locks, func(ctx context.Context, l beaconv1connect.LockServiceClient) (int64, error) {
		resp, err := l.Proclaim(ctx, connect.NewRequest(req))
		if err != nil {
			return 0, err
		}
		return resp.Msg.GetRevision(), nil
	})
	return err
}

// Leader is an election's leader (or a lock's holder).
type Leader struct {
	SessionID, Token int64
	Value            []byte
}

func leaderOf(st *beaconv1.LockState) (Leader, bool) {
	h := st.GetHolder()
	if h == nil {
		return Leader{}, false
	}
	return Leader{SessionID: h.GetSessionId(), Token: h.GetFencingToken(), Value: h.GetValue()}, true
}

// Leader returns the current leader of election (or holder of lock)
// name; ok is false when there is none.
func (c *Client) Leader(ctx context.Context, name string, opts ...CallOption) (leader Leader, ok bool, err error) {
	req := &beaconv1.DescribeLockRequest{Namespace: c.options(opts).namespace, Name: name}
	st, err := lockCall(ctx, c, c.locks, func(ctx context.Context, l beaconv1connect.LockServiceClient) (*beaconv1.LockState, error) {
		resp, err := l.Describe(ctx, connect.NewRequest(req))
		if err != nil {
			return nil, err
		}
		return resp.Msg.GetLock(), nil
	})
	if err != nil {
		return Leader{}, false, err
	}
	leader, ok = leaderOf(st)
	return leader, ok, nil
}

// LeaderWatcher follows an election's leader, across broken streams and
// servers.
type LeaderWatcher struct {
	c       *Client
	req     *beaconv1.ObserveLockRequest
	cancel  context.CancelFunc
	done    chan struct{}
	changed chan struct{}

	mu     sync.Mutex
	leader Leader // guarded by mu
	ok     bool   // guarded by mu; there is a leader
	seq    int    // guarded by mu; changes seen
	given  int    // guarded by mu; the seq Next last returned
	err    error  // guarded by mu
}

// ObserveLeader follows the leader of election (or holder of lock) name.
// The first Next returns the current one.
func (c *Client) ObserveLeader(ctx context.Context, name string, opts ...CallOption) (*LeaderWatcher, error) {
	if err := registry.ValidateKey("name", name); err != nil {
		return nil, err
	}
	wctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	w := &LeaderWatcher{c: c, cancel: cancel, done: make(chan struct{}), changed: make(chan struct{}, 1),
		req: &beaconv1.ObserveLockRequest{Namespace: c.options(opts).namespace, Name: name, Heartbeat: durationpb.New(c.watchHeartbeat)}}
	if !c.ownStream(w) {
		cancel()
		return nil, ErrClosed
	}
	go w.run(wctx) // owned by the watcher: Close (or the client's) stops it
	return w, nil
}

// Next waits for a leader different from the one it last returned; ok is
// false when there is no leader.
func (w *LeaderWatcher) Next(ctx context.Context) (leader Leader, ok bool, err error) {
	for {
		w.mu.Lock()
		if w.seq > w.given {
			w.given = w.seq
			l, ok := w.leader, w.ok
			w.mu.Unlock()
			return l, ok, nil
		}
		err := w.err
		w.mu.Unlock()
		if err != nil {
			return Leader{}, false, err
		}
		select {
		case <-w.changed:
		case <-ctx.Done():
			return Leader{}, false, ctx.Err()
		}
	}
}

// Close stops the watcher.
func (w *LeaderWatcher) Close() {
	w.cancel()
	<-w.done
	w.c.disownStream(w)
}

func (w *LeaderWatcher) run(ctx context.Context) {
	defer close(w.done)
	w.finish(followStreams(ctx, w.c, w.stream))
}

func (w *LeaderWatcher) finish(err error) {
	w.mu.Lock()
	if w.err == nil {
		w.err = err
	}
	w.mu.Unlock()
	select {
	case w.changed <- struct{}{}:
	default:
	}
}

func (w *LeaderWatcher) stream(ctx context.Context) error {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	quiet := 3 * w.c.watchHeartbeat
	watchdog := time.AfterFunc(quiet, cancel) // a server that hangs is left
	defer watchdog.Stop()
	st, err := w.c.locks[w.c.current.Load()].Observe(sctx, connect.NewRequest(w.req))
	if err != nil {
		return err
	}
	defer st.Close()
	for st.Receive() {
		watchdog.Reset(quiet)
		l, ok := leaderOf(st.Msg().GetLock())
		w.mu.Lock()
		if ok != w.ok || l.SessionID != w.leader.SessionID || l.Token != w.leader.Token || string(l.Value) != string(w.leader.Value) || w.seq == 0 {
			w.leader, w.ok = l, ok
			w.seq++
			select {
			case w.changed <- struct{}{}:
			default:
			}
		}
		w.mu.Unlock()
	}
	if err := st.Err(); err != nil {
		return err
	}
	return errors.New("beacon: observe stream ended")
}

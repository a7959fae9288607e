// Package lock is the server's distributed locks: a queue of sessions per
// lock in etcd, one key per session on the session's lease, ordered by
// create revision (the etcd concurrency package's design). The oldest key
// holds the lock; its create revision is the holder's fencing token,
// which KV writes can carry (server/internal/kv, Fence). A holder lost
// with its session (not released) makes the next holder wait the lock
// delay, so that the lost holder's writes in flight land first — and its
// later fenced writes are refused by the store. docs/locks.md.
package lock

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/internal/store"
)

// ErrSessionNotFound: the session does not exist (or its lease ended).
var ErrSessionNotFound = errors.New("lock: session not found")

// ErrLost: the session's place in the queue vanished while it waited
// (its session ended).
var ErrLost = errors.New("lock: the session's place in the queue is gone (its session ended)")

// Locks acquires and releases locks in etcd.
type Locks struct {
	cli    *clientv3.Client
	layout store.Layout
	delay  time.Duration
	log    *slog.Logger
	lost   chan string // lock queues ("ns/name") whose key vanished with its session
}

// New returns locks on cli under layout, with a lock delay after a lost
// holder (0: none).
func New(cli *clientv3.Client, layout store.Layout, delay time.Duration, log *slog.Logger) *Locks {
	return &Locks{cli: cli, layout: layout, delay: delay, log: log, lost: make(chan string, 1024)}
}

// NoticeLost looks at a watch response's events (from the server's view, on
// its goroutine: it does not block) for queue keys deleted without a
// release in the same revision — lost with their sessions — and has Run
// put the lock delay's hold on their locks.
func (l *Locks) NoticeLost(events []*clientv3.Event) {
	if l.delay <= 0 {
		return
	}
	type release struct {
		lock string // "ns/name"
		rev  int64
	}
	var released map[release]bool // release markers put, by lock and revision
	for _, ev := range events {
		if k := string(ev.Kv.Key); ev.Type == mvccpb.PUT && strings.HasPrefix(k, l.layout.LockReleasedPrefix()) {
			if released == nil {
				released = map[release]bool{}
			}
			released[release{strings.TrimPrefix(k, l.layout.LockReleasedPrefix()), ev.Kv.ModRevision}] = true
		}
	}
	for _, ev := range events {
		k := string(ev.Kv.Key)
		if ev.Type != mvccpb.DELETE || !strings.HasPrefix(k, l.layout.LockPrefix()) {
			continue
		}
		rest := strings.TrimPrefix(k, l.layout.LockPrefix())
		at := strings.LastIndexByte(rest, '@')
		if at < 0 || released[release{rest[:at], ev.Kv.ModRevision}] {
			continue // released (or a waiter that gave up), in the same transaction
		}
		select {
		case l.lost <- rest[:at]:
		default:
			l.log.Warn("lock: too many lost lock holders at once; a lock delay was skipped", "lock", rest[:at])
		}
	}
}

// Run puts the lock delay's holds that NoticeLost asks for, until ctx ends.
func (l *Locks) Run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case q := <-l.lost:
			ns, name, _ := strings.Cut(q, "/")
			hctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			if err := l.hold(hctx, ns, name); err != nil && ctx.Err() == nil {
				l.log.Warn("lock: putting the lock delay's hold failed", "lock", q, "err", err)
			}
			cancel()
		}
	}
}

func (l *Locks) holdKey(ns, name string) string { return l.layout.LockHoldPrefix() + ns + "/" + name }

// hold makes the lock's hold key, on a lease of the lock delay, unless
// there is one: nobody gets the lock until it expires.
func (l *Locks) hold(ctx context.Context, ns, name string) error {
	ttl := int64((l.delay + time.Second - 1) / time.Second)
	lease, err := l.cli.Grant(ctx, ttl)
	if err != nil {
		return err
	}
	key := l.holdKey(ns, name)
	resp, err := l.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, "", clientv3.WithLease(lease.ID))).Commit()
	if err != nil || !resp.Succeeded {
		_, _ = l.cli.Revoke(ctx, lease.ID) // a hold is there already
	}
	return err
}

func (l *Locks) releasedKey(ns, name string) string {
	return l.layout.LockReleasedPrefix() + ns + "/" + name
}

// Acquire puts the session in the lock's queue (or finds it there) and
// waits up to wait until it holds the lock. If it does not get it in
// time, it leaves the queue. acquired is false then, and state says who
// holds it.
func (l *Locks) Acquire(ctx context.Context, ns, name string, session int64, value []byte, wait time.Duration, keepPlace bool) (acquired bool, token int64, err error) {
	key := l.layout.LockKey(ns, name, session)
	queue, hold := l.layout.LockQueue(ns, name), l.holdKey(ns, name)
	// Join (or find our place), and look at the head of the queue and the
	// lock delay's hold, in one transaction: an uncontended lock costs one
	// round trip.
	look := []clientv3.Op{
		clientv3.OpGet(queue, append([]clientv3.OpOption{clientv3.WithKeysOnly()}, clientv3.WithFirstCreate()...)...),
		clientv3.OpGet(hold, clientv3.WithKeysOnly()),
	}
	resp, err := l.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(append([]clientv3.Op{clientv3.OpPut(key, string(value), clientv3.WithLease(clientv3.LeaseID(session)))}, look...)...).
		Else(append([]clientv3.Op{clientv3.OpGet(key, clientv3.WithKeysOnly())}, look...)...).Commit()
	if err != nil {
		if errors.Is(err, rpctypes.ErrLeaseNotFound) || errors.Is(err, rpctypes.ErrGRPCLeaseNotFound) {
			return false, 0, fmt.Errorf("%w: %s", ErrSessionNotFound, store.FormatSessionID(session))
		}
		return false, 0, err
	}
	mine := resp.Header.Revision
	if !resp.Succeeded {
		mine = resp.Responses[0].GetResponseRange().Kvs[0].CreateRevision
	}
	first := resp.Responses[1].GetResponseRange().Kvs
	if len(first) > 0 && first[0].CreateRevision == mine && len(resp.Responses[2].GetResponseRange().Kvs) == 0 {
		return true, mine, nil
	}
	wctx, cancel := ctx, context.CancelFunc(func() {})
	if wait > 0 {
		wctx, cancel = context.WithTimeout(ctx, wait)
	}
	defer cancel()
	got, err := l.waitFirst(wctx, ns, name, key, mine, wait > 0)
	if got {
		return true, mine, nil
	}
	timedOut := errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil
	if timedOut {
		err = nil // waited the time asked: not acquired
	}
	if keepPlace && (timedOut || err == nil) {
		return false, 0, nil // the caller calls again, in its turn
	}
	// Not granted: leave the queue, saying the key left cleanly, so the
	// next in line does not wait a lock delay for it.
	lctx, lcancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer lcancel()
	if _, _, lerr := l.leave(lctx, ns, name, key); lerr != nil && err == nil {
		err = lerr
	}
	return false, 0, err
}

// leave deletes a queue key in one transaction with the lock's release
// marker: a deletion with a marker put at its revision left cleanly (a
// release, or a waiter giving up); one without was lost with its session.
// held says whether the key was the oldest (the holder).
//
// The marker is on the leaving session's lease, so that markers of lock
// names no longer used go with their sessions; it is read at the
// deletion's revision, so its later fate does not matter.
func (l *Locks) leave(ctx context.Context, ns, name, key string) (held bool, revision int64, err error) {
	var lease clientv3.LeaseID
	if id, err := store.ParseSessionID(key[strings.LastIndexByte(key, '@')+1:]); err == nil {
		lease = clientv3.LeaseID(id)
	}
	resp, err := l.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(key), ">", 0)).Then(
		clientv3.OpGet(l.layout.LockQueue(ns, name), append([]clientv3.OpOption{clientv3.WithKeysOnly()}, clientv3.WithFirstCreate()...)...),
		clientv3.OpDelete(key, clientv3.WithPrevKV()),
		clientv3.OpPut(l.releasedKey(ns, name), "", clientv3.WithLease(lease)),
	).Commit()
	if err != nil {
		return false, 0, err
	}
	if !resp.Succeeded {
		return false, resp.Header.Revision, nil // not in the queue
	}
	first := resp.Responses[0].GetResponseRange().Kvs
	prev := resp.Responses[1].GetResponseDeleteRange().PrevKvs
	held = len(first) > 0 && len(prev) > 0 && first[0].CreateRevision == prev[0].CreateRevision
	return held, resp.Header.Revision, nil
}

// waitFirst waits until the key (create revision mine) is the oldest of
// the queue, and the lock delay has passed if a holder before it was
// lost. With !queue it looks once.
func (l *Locks) waitFirst(ctx context.Context, ns, name, key string, mine int64, queue bool) (bool, error) {
	queuePrefix := l.layout.LockQueue(ns, name)
	holdKey := l.holdKey(ns, name)
	for {
		// The key just before mine, mine (still there?) and the lock
		// delay's hold, in one read.
		resp, err := l.cli.Txn(ctx).Then(
			clientv3.OpGet(queuePrefix, append([]clientv3.OpOption{clientv3.WithKeysOnly(), clientv3.WithMaxCreateRev(mine - 1)}, clientv3.WithLastCreate()...)...),
			clientv3.OpGet(key, clientv3.WithKeysOnly()),
			clientv3.OpGet(holdKey, clientv3.WithKeysOnly()),
		).Commit()
		if err != nil {
			return false, err
		}
		if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) == 0 || kvs[0].CreateRevision != mine {
			return false, ErrLost
		}
		before := resp.Responses[0].GetResponseRange().Kvs
		held := len(resp.Responses[2].GetResponseRange().Kvs) > 0
		if len(before) == 0 && !held {
			return true, nil
		}
		if !queue {
			return false, nil
		}
		if len(before) == 0 {
			// First in line, but a holder before us was lost with its
			// session: its writes in flight land before we start.
			if _, err := l.waitDeleted(ctx, holdKey, resp.Header.Revision); err != nil {
				return false, err
			}
			continue
		}
		pred := before[0]
		deleted, err := l.waitDeleted(ctx, string(pred.Key), resp.Header.Revision)
		if err != nil {
			return false, err
		}
		// Left cleanly (a release marker put at the deletion's revision),
		// or lost? The view's NoticeLost puts the hold too, but we may
		// look first.
		if l.delay > 0 && deleted > 0 {
			// The marker as it was at the deletion: later releases move it.
			rel, err := l.cli.Get(ctx, l.releasedKey(ns, name), clientv3.WithKeysOnly(), clientv3.WithRev(deleted))
			if err != nil && !errors.Is(err, rpctypes.ErrCompacted) {
				return false, err
			}
			if err != nil || len(rel.Kvs) == 0 || rel.Kvs[0].ModRevision != deleted {
				if err := l.hold(ctx, ns, name); err != nil {
					return false, err
				}
			}
		}
	}
}

// waitDeleted waits until key is deleted after revision rev, and returns
// the deletion's revision (0: the watch broke — compacted, no leader —
// and the caller looks again).
func (l *Locks) waitDeleted(ctx context.Context, key string, rev int64) (int64, error) {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	for resp := range l.cli.Watch(wctx, key, clientv3.WithRev(rev+1), clientv3.WithFilterPut()) {
		if resp.Err() != nil {
			return 0, nil
		}
		for _, ev := range resp.Events {
			if ev.Type == mvccpb.DELETE {
				return ev.Kv.ModRevision, nil
			}
		}
	}
	if ctx.Err() != nil {
		return 0, ctx.Err()
	}
	return 0, errors.New("lock: watch ended")
}

// Release takes the session out of the lock's queue. released says it
// held the lock.
func (l *Locks) Release(ctx context.Context, ns, name string, session int64) (released bool, revision int64, err error) {
	return l.leave(ctx, ns, name, l.layout.LockKey(ns, name, session))
}

// Describe returns a lock's holder and waiters (the holder is the oldest
// in the queue; after a lost holder it starts once the lock delay has
// passed).
func (l *Locks) Describe(ctx context.Context, ns, name string) (*beaconv1.LockState, error) {
	st, _, err := l.describe(ctx, ns, name)
	return st, err
}

func (l *Locks) describe(ctx context.Context, ns, name string) (*beaconv1.LockState, int64, error) {
	resp, err := l.cli.Txn(ctx).Then(
		clientv3.OpGet(l.layout.LockQueue(ns, name), clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByCreateRevision, clientv3.SortAscend)),
		clientv3.OpGet(l.holdKey(ns, name), clientv3.WithKeysOnly()),
	).Commit()
	if err != nil {
		return nil, 0, err
	}
	st := stateOf(name, resp.Responses[0].GetResponseRange().Kvs)
	st.LockDelay = len(resp.Responses[1].GetResponseRange().Kvs) > 0
	return st, resp.Header.Revision, nil
}

func stateOf(name string, kvs []*mvccpb.KeyValue) *beaconv1.LockState {
	st := &beaconv1.LockState{Name: name}
	for i, kv := range kvs {
		k := string(kv.Key)
		id, err := store.ParseSessionID(k[strings.LastIndexByte(k, '@')+1:])
		if err != nil {
			continue
		}
		h := &beaconv1.LockHolder{SessionId: id, FencingToken: kv.CreateRevision, Value: kv.Value}
		if i == 0 {
			st.Holder = h
		} else {
			st.Waiters = append(st.Waiters, h)
		}
	}
	return st
}

// List returns the locks of a namespace whose names start with prefix,
// with holders and waiters, in name order.
func (l *Locks) List(ctx context.Context, ns, prefix string) ([]*beaconv1.LockState, error) {
	base := l.layout.LockPrefix() + ns + "/"
	resp, err := l.cli.Get(ctx, base+prefix, clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
	if err != nil {
		return nil, err
	}
	byName := map[string][]*mvccpb.KeyValue{}
	var names []string
	for _, kv := range resp.Kvs {
		k := strings.TrimPrefix(string(kv.Key), base)
		at := strings.LastIndexByte(k, '@')
		if at < 0 {
			continue
		}
		name := k[:at]
		if _, ok := byName[name]; !ok {
			names = append(names, name)
		}
		byName[name] = append(byName[name], kv)
	}
	out := make([]*beaconv1.LockState, 0, len(names))
	for _, name := range names {
		kvs := byName[name]
		slices.SortFunc(kvs, func(a, b *mvccpb.KeyValue) int { return cmp.Compare(a.CreateRevision, b.CreateRevision) })
		out = append(out, stateOf(name, kvs))
	}
	return out, nil
}

// ErrNotHolder: a Proclaim by a session that does not hold the lock with
// the token it gives.
var ErrNotHolder = errors.New("lock: not the holder")

// Proclaim sets the holder's value, only while session holds the lock
// with token (the check is in the write's transaction).
func (l *Locks) Proclaim(ctx context.Context, ns, name string, session, token int64, value []byte) (int64, error) {
	key := l.layout.LockKey(ns, name, session)
	resp, err := l.cli.Txn(ctx).If(
		clientv3.Compare(clientv3.CreateRevision(key), "=", token),
		clientv3.Compare(clientv3.CreateRevision(l.layout.LockQueue(ns, name)), ">", token-1).WithPrefix(),
	).Then(clientv3.OpPut(key, string(value), clientv3.WithIgnoreLease())).Commit()
	if err != nil {
		return 0, err
	}
	if !resp.Succeeded {
		return 0, fmt.Errorf("%w: session %s does not hold lock %q with fencing token %d", ErrNotHolder, store.FormatSessionID(session), name, token)
	}
	return resp.Header.Revision, nil
}

// Observe sends the lock's state on start and whenever its holder or the
// holder's value changes, until ctx ends or send fails; with heartbeat,
// it sends the state again after that long without a change.
func (l *Locks) Observe(ctx context.Context, ns, name string, heartbeat time.Duration, send func(*beaconv1.LockState, int64) error) error {
	var last *beaconv1.LockHolder
	first := true
	for ctx.Err() == nil {
		st, rev, err := l.describe(ctx, ns, name)
		if err != nil {
			return err
		}
		if h := st.GetHolder(); first || !sameHolder(h, last) {
			if err := send(st, rev); err != nil {
				return err
			}
			last, first = h, false
		}
		if err := l.waitChange(ctx, l.layout.LockQueue(ns, name), rev, heartbeat); err != nil {
			if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
				first = true // quiet for a heartbeat: send the state again
				continue
			}
			return err
		}
	}
	return ctx.Err()
}

func sameHolder(a, b *beaconv1.LockHolder) bool {
	return a.GetSessionId() == b.GetSessionId() && a.GetFencingToken() == b.GetFencingToken() && string(a.GetValue()) == string(b.GetValue())
}

// waitChange waits for any change under prefix after rev, at most
// heartbeat (0: no bound).
func (l *Locks) waitChange(ctx context.Context, prefix string, rev int64, heartbeat time.Duration) error {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	if heartbeat > 0 {
		cancel()
		wctx, cancel = context.WithTimeout(clientv3.WithRequireLeader(ctx), heartbeat)
	}
	defer cancel()
	for resp := range l.cli.Watch(wctx, prefix, clientv3.WithPrefix(), clientv3.WithRev(rev+1)) {
		if err := resp.Err(); err != nil {
			return nil // compacted or no leader: look again
		}
		if len(resp.Events) > 0 {
			return nil
		}
	}
	if err := wctx.Err(); err != nil {
		return err
	}
	return nil
}

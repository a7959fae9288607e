package store

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"beacon.dev/beacon/internal/backoff"
	"beacon.dev/beacon/registry"
)

// Registrations are group-committed: writes that arrive while others are
// in flight are sent to etcd together, so a burst of registrations costs
// one Raft proposal and one fsync per batch rather than per instance.
//
// A registration that merges (Merge) is never a blind write. The batch
// takes the current record of each key from the Hint (the server's view
// of etcd) where it knows it, and reads the others from etcd (one
// read-only Txn of serializable Gets: answered from the member's applied
// state without a Raft round, which would wait behind the WAL fsync of
// the writes in flight). Either may be stale; the compare below catches
// it. A guard's refusal, which writes nothing and so compares nothing, is
// decided only on a linearizable read. It merges each into its caller's instance, and commits one Txn whose
// If compares every such key's ModRevision (CreateRevision == 0 for an
// absent key), with Gets of the same keys in its Else. If any key changed
// in between, the Else answers carry the new records: the keys that
// changed are merged again and the batch is committed again, each caller
// failing with ErrConflict after maxConflicts changes under it.
//
// A batch never holds the same key twice (etcd refuses that), and if it
// fails because one session is gone, its writes are retried one by one so
// only the right caller gets ErrSessionNotFound.
const (
	// maxBatch bounds a batch: its Txn holds maxBatch compares, maxBatch
	// puts and maxBatch Gets in its Else, within etcd's default
	// --max-txn-ops (128, checked per list) even if counted together for
	// compares and puts.
	maxBatch      = 64
	batchWorkers  = 4 // batches in flight at once
	batchQueueLen = 1024
	// maxConflicts is how often one registration's key may change between
	// its read and its write before it fails with ErrConflict.
	maxConflicts = 5
)

// Merge carries over into in, the record about to be written, what the
// registry (not the instance's owner) decides, from cur, the record etcd
// holds now. It is called only when a valid record exists, perhaps more
// than once (after a conflict), each time on a fresh copy of the caller's
// instance, and must not keep either pointer.
type Merge func(cur, in *registry.Instance)

// Guard decides, from the record etcd holds (nil if none), whether a
// registration may replace it; an error refuses the registration with
// that error and writes nothing. It is called where Merge is, with the
// same record, so the decision and the write see the same record.
type Guard func(cur *registry.Instance) error

// Hint answers what etcd probably holds at an instance's key, from a
// cache that follows etcd (the server's view): the record with its
// Revision set to the key's ModRevision, or nil if absent; known false
// when the cache cannot say (not yet loaded). The record is shared and
// never modified. A hint only saves a read: a write prepared from a stale
// one fails its compare and is prepared again from etcd's answer. A guard
// refusal is never decided on a hint: the record is read from etcd first.
type Hint func(k registry.InstanceKey) (cur *registry.Instance, known bool)

type putReq struct {
	key   string
	ikey  registry.InstanceKey
	in    *registry.Instance // as the caller gave it; never modified
	merge Merge              // nil: last write wins, nothing read
	guard Guard              // nil: nothing refused; only with merge
	lease clientv3.LeaseID
	done  chan putResult // size 1, answered once

	// Owned by the worker committing the request.
	value     string // the record to write (merged)
	modRev    int64  // ModRevision the write compares against; 0: absent
	conflicts int
	refused   error // what guard said of the record last read
	hinted    bool  // prepared from a hint, not from a record etcd returned
}

type putResult struct {
	rev int64
	err error
}

func (r *putReq) answer(rev int64, err error) { r.done <- putResult{rev: rev, err: err} }

var errClosed = errors.New("store: closed")

type batcher struct {
	cli    *clientv3.Client
	layout Layout
	hint   atomic.Pointer[Hint]
	kv     atomic.Pointer[clientv3.KV] // set: transactions go there, not to cli
	reqs   chan *putReq
	// ctx owns every etcd call of the batcher: close cancels it, which
	// also tells the workers to stop.
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	stopped chan struct{} // closed once every worker has returned
}

func newBatcher(cli *clientv3.Client, layout Layout) *batcher {
	ctx, cancel := context.WithCancel(context.Background())
	b := &batcher{cli: cli, layout: layout, reqs: make(chan *putReq, batchQueueLen), ctx: ctx, cancel: cancel, stopped: make(chan struct{})}
	for range batchWorkers {
		b.wg.Add(1)
		go b.work()
	}
	return b
}

// put queues one write and waits for its batch to commit. With merge nil
// the write replaces whatever is there without reading it.
func (b *batcher) put(ctx context.Context, key string, in *registry.Instance, merge Merge, guard Guard) (int64, error) {
	r := b.newReq(key, in, merge, guard)
	if err := b.enqueue(ctx, r); err != nil {
		return 0, err
	}
	return b.wait(ctx, r)
}

// putMany queues every write before waiting for any, so that they share
// batches, and returns each one's outcome.
func (b *batcher) putMany(ctx context.Context, reqs []*putReq) (revs []int64, errs []error) {
	revs, errs = make([]int64, len(reqs)), make([]error, len(reqs))
	queued := len(reqs)
	for i, r := range reqs {
		if errs[i] = b.enqueue(ctx, r); errs[i] != nil {
			queued = i
			break
		}
	}
	for i := range reqs {
		if i >= queued {
			errs[i] = errs[queued]
			continue
		}
		revs[i], errs[i] = b.wait(ctx, reqs[i])
	}
	return revs, errs
}

func (b *batcher) newReq(key string, in *registry.Instance, merge Merge, guard Guard) *putReq {
	r := &putReq{key: key, ikey: in.Key(), in: in, merge: merge, guard: guard, lease: clientv3.LeaseID(in.SessionID), done: make(chan putResult, 1)}
	if merge == nil {
		r.value = string(EncodeInstance(in)) // here, not on a worker
	}
	return r
}

func (b *batcher) enqueue(ctx context.Context, r *putReq) error {
	select {
	case b.reqs <- r:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-b.ctx.Done():
		return errClosed
	}
}

func (b *batcher) wait(ctx context.Context, r *putReq) (int64, error) {
	select {
	case res := <-r.done:
		return res.rev, res.err
	case <-ctx.Done():
		return 0, ctx.Err()
	case <-b.stopped:
		// Every worker has returned: r was answered, or never taken.
		select {
		case res := <-r.done:
			return res.rev, res.err
		default:
			return 0, errClosed
		}
	}
}

func (b *batcher) work() {
	defer b.wg.Done()
	var carry *putReq // taken from the queue but its key was already in the batch
	for {
		first := carry
		carry = nil
		if first == nil {
			select {
			case first = <-b.reqs:
			case <-b.ctx.Done():
				return
			}
		}
		batch := []*putReq{first}
		keys := map[string]bool{first.key: true}
	drain:
		for len(batch) < maxBatch {
			select {
			case r := <-b.reqs:
				if keys[r.key] {
					carry = r
					break drain
				}
				keys[r.key] = true
				batch = append(batch, r)
			default:
				break drain
			}
		}
		b.commit(batch)
	}
}

// commit writes a batch and answers every request in it. The callers'
// contexts do not cancel a batch others wait on: each etcd call is bounded
// by requestTimeout and by the batcher's own context, which close cancels.
func (b *batcher) commit(batch []*putReq) {
	rest, err := b.write(batch)
	// An election (a member frozen or gone) fails writes in flight with
	// "leader changed" or "no leader" for a second or two: write again
	// until a leader takes them, rather than fail registrations that a
	// moment later would pass. Safe: a merge compares revisions, so a
	// write that did land is merged again, and a plain put is idempotent.
	retry := backoff.New(backoff.Config{Base: 100 * time.Millisecond, Max: time.Second})
	for deadline := time.Now().Add(electionRetry); err != nil && electionError(err) && time.Now().Before(deadline); {
		if backoff.Sleep(b.ctx, retry.Next()) != nil {
			break
		}
		rest, err = b.write(rest)
	}
	if errors.Is(err, rpctypes.ErrLeaseNotFound) && len(rest) > 1 {
		for _, r := range rest {
			if _, err := b.write([]*putReq{r}); err != nil {
				r.answer(0, writeError(err))
			}
		}
		return
	}
	for _, r := range rest {
		r.answer(0, writeError(err))
	}
}

// electionRetry bounds how long a write is retried through an etcd
// election: several election timeouts (etcd's default is 1 s).
const electionRetry = 10 * time.Second

// electionError reports whether err is etcd losing or changing its leader,
// which passes by itself once a new leader is elected.
func electionError(err error) bool {
	return errors.Is(err, rpctypes.ErrLeaderChanged) || errors.Is(err, rpctypes.ErrNoLeader) ||
		errors.Is(err, rpctypes.ErrTimeoutDueToLeaderFail) || errors.Is(err, rpctypes.ErrTimeout)
}

func writeError(err error) error {
	if errors.Is(err, rpctypes.ErrLeaseNotFound) {
		return ErrSessionNotFound
	}
	return fmt.Errorf("store: writing instance: %w", err)
}

// write commits batch, merging where asked, and answers the requests it
// settles. On an etcd error it returns the requests still unanswered.
func (b *batcher) write(batch []*putReq) ([]*putReq, error) {
	var hint Hint
	if h := b.hint.Load(); h != nil {
		hint = *h
	}
	var reads []clientv3.Op
	var unread []*putReq
	merging := 0
	for _, r := range batch {
		if r.merge == nil {
			continue
		}
		merging++
		if hint != nil {
			if cur, known := hint(r.ikey); known {
				rev := int64(0)
				if cur != nil {
					rev = cur.Revision
				}
				b.prepareFrom(r, cur, rev)
				r.hinted = true
				if r.refused == nil {
					continue
				}
				r.refused = nil // decided on a hint: ask etcd
			}
		}
		r.hinted = false
		unread = append(unread, r)
		if r.guard != nil {
			// A refusal is answered without a write, so without a compare:
			// it must be decided on etcd's current record, not on what a
			// lagging member last applied.
			reads = append(reads, clientv3.OpGet(r.key))
		} else {
			reads = append(reads, clientv3.OpGet(r.key, clientv3.WithSerializable()))
		}
	}
	if len(reads) > 0 {
		resp, err := b.txn(nil, reads, nil)
		if err != nil {
			return batch, err
		}
		for i, r := range unread {
			b.prepare(r, resp.Responses[i].GetResponseRange().GetKvs())
		}
	}
	pending := answerRefused(batch)
	if len(pending) == 0 {
		return nil, nil
	}
	for {
		cmps := make([]clientv3.Cmp, 0, merging)
		puts := make([]clientv3.Op, 0, len(pending))
		gets := make([]clientv3.Op, 0, merging)
		for _, r := range pending {
			puts = append(puts, putOp(r))
			if r.merge != nil {
				if r.modRev == 0 {
					cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(r.key), "=", 0))
				} else {
					cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(r.key), "=", r.modRev))
				}
				gets = append(gets, clientv3.OpGet(r.key))
			}
		}
		resp, err := b.txn(cmps, puts, gets)
		if err != nil {
			return pending, err
		}
		if resp.Succeeded {
			for _, r := range pending {
				r.answer(resp.Header.Revision, nil)
			}
			return nil, nil
		}
		// Some key changed since it was read: the Else holds every merging
		// key's record as of this Txn. Merge again where it changed.
		changed, i := 0, 0
		for _, r := range pending {
			if r.merge == nil {
				continue
			}
			kvs := resp.Responses[i].GetResponseRange().GetKvs()
			i++
			if rev := modRevision(kvs); rev != r.modRev {
				changed++
				if !r.hinted {
					r.conflicts++
				}
				r.hinted = false
				if r.conflicts <= maxConflicts {
					b.prepare(r, kvs)
				}
			}
		}
		if changed == 0 { // cannot happen; never spin on it
			for _, r := range pending {
				r.conflicts = maxConflicts + 1
			}
		}
		kept := pending[:0:0]
		for _, r := range pending {
			if r.conflicts > maxConflicts {
				r.answer(0, fmt.Errorf("store: registering %s: %w", r.key, ErrConflict))
			} else {
				kept = append(kept, r)
			}
		}
		if pending = answerRefused(kept); len(pending) == 0 {
			return nil, nil
		}
	}
}

// prepare merges r's instance with the record etcd holds (kvs, empty if
// none) and notes the revision its write must compare against.
func (b *batcher) prepare(r *putReq, kvs []*mvccpb.KeyValue) {
	var cur *registry.Instance
	if len(kvs) > 0 {
		// A record that does not decode is replaced, as the view ignores it.
		cur, _ = b.layout.DecodeInstance(r.key, kvs[0].Value, kvs[0].ModRevision)
	}
	b.prepareFrom(r, cur, modRevision(kvs))
}

// prepareFrom merges r's instance with cur, the record at r's key (nil if
// none or unreadable) as of modRev (0 if the key is absent).
func (b *batcher) prepareFrom(r *putReq, cur *registry.Instance, modRev int64) {
	r.modRev = modRev
	in := r.in
	if cur != nil {
		merged := r.in.Clone()
		r.merge(cur, &merged)
		in = &merged
	}
	if r.guard != nil {
		if r.refused = r.guard(cur); r.refused != nil {
			return
		}
	}
	r.value = string(EncodeInstance(in))
}

// answerRefused answers the requests their guard refused and returns the
// others.
func answerRefused(batch []*putReq) []*putReq {
	kept := batch[:0:0]
	for _, r := range batch {
		if r.refused != nil {
			r.answer(0, r.refused)
		} else {
			kept = append(kept, r)
		}
	}
	return kept
}

func modRevision(kvs []*mvccpb.KeyValue) int64 {
	if len(kvs) == 0 {
		return 0
	}
	return kvs[0].ModRevision
}

// txn commits one Txn, bounded by requestTimeout and by close.
func (b *batcher) txn(cmps []clientv3.Cmp, then, els []clientv3.Op) (*clientv3.TxnResponse, error) {
	ctx, cancel := context.WithTimeout(b.ctx, requestTimeout)
	defer cancel()
	var kv clientv3.KV = b.cli
	if local := b.kv.Load(); local != nil {
		kv = *local
	}
	return kv.Txn(ctx).If(cmps...).Then(then...).Else(els...).Commit()
}

func putOp(r *putReq) clientv3.Op {
	if r.lease != 0 {
		return clientv3.OpPut(r.key, r.value, clientv3.WithLease(r.lease))
	}
	return clientv3.OpPut(r.key, r.value)
}

// close stops the workers, cancelling the commits in flight, and answers
// every caller still waiting. It does not wait for etcd.
func (b *batcher) close() {
	b.cancel()
	b.wg.Wait()
	close(b.stopped)
}

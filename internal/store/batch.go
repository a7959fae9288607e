package store

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Registrations are group-committed: writes that arrive while others are
// in flight are sent to etcd together as one transaction, so a burst of
// registrations costs one Raft proposal and one fsync per batch rather
// than per instance. A batch never holds the same key twice (etcd refuses
// that), and if a batch fails because one session is gone, its writes are
// retried one by one so only the right caller gets the error.
const (
	maxBatch      = 64 // well under etcd's default --max-txn-ops (128)
	batchWorkers  = 4  // batches in flight at once
	batchQueueLen = 1024
)

type putReq struct {
	key, value string
	lease      clientv3.LeaseID
	done       chan putResult // size 1
}

type putResult struct {
	rev int64
	err error
}

type batcher struct {
	cli  *clientv3.Client
	reqs chan *putReq
	stop chan struct{}
	wg   sync.WaitGroup
}

func newBatcher(cli *clientv3.Client) *batcher {
	b := &batcher{cli: cli, reqs: make(chan *putReq, batchQueueLen), stop: make(chan struct{})}
	for range batchWorkers {
		b.wg.Add(1)
		go b.work()
	}
	return b
}

// put queues one write and waits for its batch to commit.
func (b *batcher) put(ctx context.Context, key, value string, lease clientv3.LeaseID) (int64, error) {
	r := &putReq{key: key, value: value, lease: lease, done: make(chan putResult, 1)}
	select {
	case b.reqs <- r:
	case <-ctx.Done():
		return 0, ctx.Err()
	case <-b.stop:
		return 0, errors.New("store: closed")
	}
	select {
	case res := <-r.done:
		return res.rev, res.err
	case <-ctx.Done():
		return 0, ctx.Err()
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
			case <-b.stop:
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

func (b *batcher) commit(batch []*putReq) {
	// The callers' contexts do not cancel a batch others wait on; etcd's
	// own request timeout bounds it.
	ctx := context.Background()
	if len(batch) == 1 {
		b.commitOne(ctx, batch[0])
		return
	}
	ops := make([]clientv3.Op, len(batch))
	for i, r := range batch {
		ops[i] = putOp(r)
	}
	resp, err := b.cli.Txn(ctx).Then(ops...).Commit()
	if errors.Is(err, rpctypes.ErrLeaseNotFound) {
		for _, r := range batch {
			b.commitOne(ctx, r)
		}
		return
	}
	for _, r := range batch {
		if err != nil {
			r.done <- putResult{err: fmt.Errorf("store: writing instance: %w", err)}
		} else {
			r.done <- putResult{rev: resp.Header.Revision}
		}
	}
}

func (b *batcher) commitOne(ctx context.Context, r *putReq) {
	resp, err := b.cli.Do(ctx, putOp(r))
	switch {
	case errors.Is(err, rpctypes.ErrLeaseNotFound):
		r.done <- putResult{err: ErrSessionNotFound}
	case err != nil:
		r.done <- putResult{err: fmt.Errorf("store: writing instance: %w", err)}
	default:
		r.done <- putResult{rev: resp.Put().Header.Revision}
	}
}

func putOp(r *putReq) clientv3.Op {
	if r.lease != 0 {
		return clientv3.OpPut(r.key, r.value, clientv3.WithLease(r.lease))
	}
	return clientv3.OpPut(r.key, r.value)
}

func (b *batcher) close() {
	close(b.stop)
	b.wg.Wait()
}

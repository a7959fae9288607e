package store

import (
	"context"
	"errors"
	"fmt"
	"sync"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"beacon.dev/beacon/internal/waitq"
)

// keepAliver forwards one keepalive per client heartbeat to etcd over a
// single shared LeaseKeepAlive stream. clientv3's KeepAliveOnce opens a new
// stream per call and its KeepAlive renews forever on its own; the server
// needs neither: etcd must stay the authority on expiry, renewed only when
// the client itself is alive.
type keepAliver struct {
	cli *clientv3.Client

	mu      sync.Mutex
	stream  pb.Lease_LeaseKeepAliveClient            // guarded by mu; nil when not open
	cancel  context.CancelFunc                       // guarded by mu; ends stream
	waiters *waitq.Queue[clientv3.LeaseID, kaResult] // guarded by mu
	closed  bool                                     // guarded by mu
	wg      sync.WaitGroup
}

type kaResult struct {
	ttl int64
	err error
}

func newKeepAliver(cli *clientv3.Client) *keepAliver {
	return &keepAliver{cli: cli, waiters: waitq.New[clientv3.LeaseID, kaResult]()}
}

// keepAliveMany renews several leases: every request goes out before any
// answer is awaited, so the gRPC transport can coalesce the writes.
func (k *keepAliver) keepAliveMany(ctx context.Context, ids []clientv3.LeaseID) []kaResult {
	out := make([]kaResult, len(ids))
	chans := make([]chan kaResult, len(ids))
	k.mu.Lock()
	if k.closed {
		k.mu.Unlock()
		for i := range out {
			out[i].err = errors.New("store: closed")
		}
		return out
	}
	stream, err := k.streamLocked()
	for i, id := range ids {
		if err == nil {
			chans[i] = k.waiters.Add(id)
			// Send under mu: a gRPC stream allows one sender at a time.
			if err = stream.Send(&pb.LeaseKeepAliveRequest{ID: int64(id)}); err != nil {
				k.resetLocked() // fails the waiters added so far
				err = fmt.Errorf("store: keepalive: %w", err)
			}
		}
		if chans[i] == nil {
			out[i].err = err
		}
	}
	k.mu.Unlock()

	for i, ch := range chans {
		if ch == nil {
			continue
		}
		select {
		case r := <-ch:
			if r.err == nil && r.ttl <= 0 {
				r.err = ErrSessionNotFound
			}
			out[i] = r
		case <-ctx.Done():
			k.mu.Lock()
			k.waiters.Drop(ids[i], ch)
			k.mu.Unlock()
			out[i].err = ctx.Err()
		}
	}
	return out
}

func (k *keepAliver) streamLocked() (pb.Lease_LeaseKeepAliveClient, error) {
	if k.stream != nil {
		return k.stream, nil
	}
	ctx, cancel := context.WithCancel(clientv3.WithRequireLeader(context.Background()))
	stream, err := pb.NewLeaseClient(k.cli.ActiveConnection()).LeaseKeepAlive(ctx)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("store: opening keepalive stream: %w", err)
	}
	k.stream, k.cancel = stream, cancel
	k.wg.Add(1)
	go k.recvLoop(stream)
	return stream, nil
}

// recvLoop hands each response to the oldest waiter for that lease.
func (k *keepAliver) recvLoop(stream pb.Lease_LeaseKeepAliveClient) {
	defer k.wg.Done()
	for {
		resp, err := stream.Recv()
		k.mu.Lock()
		if err != nil {
			if k.stream == stream {
				k.resetLocked()
			}
			k.mu.Unlock()
			return
		}
		k.waiters.Deliver(clientv3.LeaseID(resp.ID), kaResult{ttl: resp.TTL})
		k.mu.Unlock()
	}
}

// resetLocked ends the current stream and fails every waiter, which retry
// on a fresh stream at their next heartbeat.
func (k *keepAliver) resetLocked() {
	if k.cancel != nil {
		k.cancel()
	}
	k.stream, k.cancel = nil, nil
	k.waiters.FailAll(kaResult{err: errors.New("store: keepalive stream broken")})
}

func (k *keepAliver) close() {
	k.mu.Lock()
	k.closed = true
	k.resetLocked()
	k.mu.Unlock()
	k.wg.Wait()
}

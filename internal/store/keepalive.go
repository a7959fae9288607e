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

// keepAlive renews lease id once and returns the TTL etcd granted.
func (k *keepAliver) keepAlive(ctx context.Context, id clientv3.LeaseID) (int64, error) {
	k.mu.Lock()
	if k.closed {
		k.mu.Unlock()
		return 0, errors.New("store: closed")
	}
	stream, err := k.streamLocked()
	if err != nil {
		k.mu.Unlock()
		return 0, err
	}
	ch := k.waiters.Add(id)
	// Send under mu: a gRPC stream allows one sender at a time.
	err = stream.Send(&pb.LeaseKeepAliveRequest{ID: int64(id)})
	if err != nil {
		k.waiters.Drop(id, ch)
		k.resetLocked()
		k.mu.Unlock()
		return 0, fmt.Errorf("store: keepalive: %w", err)
	}
	k.mu.Unlock()

	select {
	case r := <-ch:
		if r.err != nil {
			return 0, r.err
		}
		if r.ttl <= 0 {
			return 0, ErrSessionNotFound
		}
		return r.ttl, nil
	case <-ctx.Done():
		k.mu.Lock()
		k.waiters.Drop(id, ch)
		k.mu.Unlock()
		return 0, ctx.Err()
	}
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

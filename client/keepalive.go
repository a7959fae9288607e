package client

import (
	"context"
	"errors"
	"sync"

	"connectrpc.com/connect"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/internal/waitq"
)

// keepAliveStream carries the heartbeats of every session of a Client over
// one long-lived stream: a message per heartbeat costs the server a small
// fraction of a request. If the stream cannot be used, sessions fall back
// to the unary KeepAlive call (which also moves to another server).
type keepAliveStream struct {
	c *Client

	mu      sync.Mutex
	stream  *connect.BidiStreamForClient[beaconv1.KeepAliveRequest, beaconv1.KeepAliveResponse] // guarded by mu; nil when not open
	cancel  context.CancelFunc                                                                  // guarded by mu
	waiters *waitq.Queue[int64, *beaconv1.KeepAliveResponse]                                    // guarded by mu
	closed  bool                                                                                // guarded by mu
	wg      sync.WaitGroup
}

var errStreamBroken = errors.New("beacon: keepalive stream broken")

func newKeepAliveStream(c *Client) *keepAliveStream {
	return &keepAliveStream{c: c, waiters: waitq.New[int64, *beaconv1.KeepAliveResponse]()}
}

// keepAlive sends one heartbeat and waits for its answer.
func (k *keepAliveStream) keepAlive(ctx context.Context, id int64) (*beaconv1.KeepAliveResponse, error) {
	k.mu.Lock()
	if k.closed {
		k.mu.Unlock()
		return nil, ErrClosed
	}
	if k.stream == nil {
		sctx, cancel := context.WithCancel(context.Background())
		k.stream = k.c.rpcs[k.c.current.Load()].KeepAliveStream(sctx)
		k.cancel = cancel
		k.wg.Add(1)
		go k.receive(k.stream)
	}
	ch := k.waiters.Add(id)
	err := k.stream.Send(&beaconv1.KeepAliveRequest{SessionId: id}) // one sender at a time
	if err != nil {
		k.resetLocked()
		k.mu.Unlock()
		return nil, errStreamBroken
	}
	k.mu.Unlock()
	select {
	case resp := <-ch:
		if resp == nil {
			return nil, errStreamBroken
		}
		return resp, nil
	case <-ctx.Done():
		k.mu.Lock()
		k.waiters.Drop(id, ch)
		k.mu.Unlock()
		return nil, ctx.Err()
	}
}

func (k *keepAliveStream) receive(stream *connect.BidiStreamForClient[beaconv1.KeepAliveRequest, beaconv1.KeepAliveResponse]) {
	defer k.wg.Done()
	for {
		resp, err := stream.Receive()
		k.mu.Lock()
		if err != nil {
			if k.stream == stream {
				k.resetLocked()
			}
			k.mu.Unlock()
			_ = stream.CloseResponse()
			return
		}
		k.waiters.Deliver(resp.GetSessionId(), resp)
		k.mu.Unlock()
	}
}

// resetLocked ends the stream and fails every waiter; the next heartbeat
// opens a new stream.
func (k *keepAliveStream) resetLocked() {
	if k.stream != nil {
		_ = k.stream.CloseRequest()
		k.cancel()
	}
	k.stream, k.cancel = nil, nil
	k.waiters.FailAll(nil)
}

func (k *keepAliveStream) close() {
	k.mu.Lock()
	k.closed = true
	k.resetLocked()
	k.mu.Unlock()
	k.wg.Wait()
}

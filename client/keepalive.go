package client

import (
	"context"
	"errors"
	"sync"
	"time"

	"connectrpc.com/connect"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/internal/waitq"
)

// keepAliveLinger is how long a heartbeat waits for others of the same
// Client to share its message. Heartbeats go every TTL/3 (≥ 666 ms), so
// this costs nothing in safety and saves the server a message and a write
// per session.
const keepAliveLinger = 100 * time.Millisecond

// keepAliveSendTimeout bounds one write to the stream.
const keepAliveSendTimeout = 5 * time.Second

type kaStream = connect.BidiStreamForClient[beaconv1.KeepAliveBatch, beaconv1.KeepAliveBatchResult]

// keepAliveStream carries the heartbeats of every session of a Client over
// one long-lived stream, several per message, as clientv3 does for leases.
// If the stream cannot be used, sessions fall back to the unary KeepAlive
// call (which also moves to another server).
type keepAliveStream struct {
	c *Client

	mu      sync.Mutex
	stream  *kaStream                                      // guarded by mu; nil when not open
	server  int64                                          // guarded by mu; the stream's server (index into Client.rpcs)
	cancel  context.CancelFunc                             // guarded by mu
	waiters *waitq.Queue[int64, *beaconv1.KeepAliveResult] // guarded by mu
	pending []int64                                        // guarded by mu; heartbeats waiting for the next message
	flush   *time.Timer                                    // guarded by mu; non-nil while pending is scheduled
	closed  bool                                           // guarded by mu
	sendMu  sync.Mutex                                     // held by the one send in progress
	wg      sync.WaitGroup
}

var errStreamBroken = errors.New("beacon: keepalive stream broken")

func newKeepAliveStream(c *Client) *keepAliveStream {
	return &keepAliveStream{c: c, waiters: waitq.New[int64, *beaconv1.KeepAliveResult]()}
}

// keepAlive queues one heartbeat and waits for its result.
func (k *keepAliveStream) keepAlive(ctx context.Context, id int64) (*beaconv1.KeepAliveResult, error) {
	k.mu.Lock()
	if k.closed {
		k.mu.Unlock()
		return nil, ErrClosed
	}
	ch := k.waiters.Add(id)
	k.pending = append(k.pending, id)
	if k.flush == nil {
		k.flush = time.AfterFunc(keepAliveLinger, k.send)
	}
	k.mu.Unlock()
	select {
	case res := <-ch:
		if res == nil {
			return nil, errStreamBroken
		}
		return res, nil
	case <-ctx.Done():
		k.mu.Lock()
		k.waiters.Drop(id, ch)
		k.mu.Unlock()
		return nil, ctx.Err()
	}
}

// send writes the pending heartbeats as one message, opening the stream if
// needed. The message is written without mu held: a server that stops
// reading blocks the write (HTTP/2 flow control), and heartbeats, results
// and close must go on meanwhile. A write that takes longer than
// keepAliveSendTimeout resets the stream; its waiters fall back to the
// unary call.
func (k *keepAliveStream) send() {
	k.sendMu.Lock() // one message at a time, in order
	defer k.sendMu.Unlock()
	k.mu.Lock()
	ids := k.pending
	k.pending, k.flush = nil, nil
	if k.closed || len(ids) == 0 {
		k.mu.Unlock()
		return
	}
	if k.stream == nil {
		sctx, cancel := context.WithCancel(context.Background())
		k.server = k.c.current.Load()
		k.stream = k.c.rpcs[k.server].KeepAliveStream(sctx)
		k.cancel = cancel
		k.wg.Add(1)
		go k.receive(k.stream)
	}
	stream := k.stream
	k.mu.Unlock()
	reset := func() {
		k.mu.Lock()
		if k.stream == stream {
			k.resetLocked()
		}
		k.mu.Unlock()
	}
	stuck := time.AfterFunc(keepAliveSendTimeout, reset)
	err := stream.Send(&beaconv1.KeepAliveBatch{SessionIds: ids})
	stuck.Stop()
	if err != nil {
		reset()
	}
}

func (k *keepAliveStream) receive(stream *kaStream) {
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
		for _, r := range resp.GetResults() {
			k.waiters.Deliver(r.GetSessionId(), r)
		}
		k.mu.Unlock()
	}
}

// resetLocked ends the stream and fails every waiter; the next heartbeat
// opens a new stream.
func (k *keepAliveStream) resetLocked() {
	if k.stream != nil {
		// Cancelling aborts a send blocked on flow control; closing the
		// request side is what ends the stream's read (the HTTP/2
		// transport does not watch the context once the response has
		// begun). CloseRequest may not run beside a Send, so it waits for
		// the send in progress, off the lock.
		stream := k.stream
		k.cancel()
		k.wg.Add(1)
		go func() {
			defer k.wg.Done()
			k.sendMu.Lock()
			defer k.sendMu.Unlock()
			_ = stream.CloseRequest()
		}()
	}
	k.stream, k.cancel = nil, nil
	k.waiters.FailAll(nil)
}

// abandon ends the stream, if one is open, because its server did not
// answer in time: its waiters fall back to the unary call, and the client's
// calls move off that server, so the next stream opens on another.
func (k *keepAliveStream) abandon() {
	k.mu.Lock()
	open, server := k.stream != nil, k.server
	if open {
		k.resetLocked()
	}
	k.mu.Unlock()
	if open {
		k.c.suspect(server)
	}
}

func (k *keepAliveStream) close() {
	k.mu.Lock()
	k.closed = true
	if k.flush != nil {
		k.flush.Stop()
		k.flush = nil
	}
	k.pending = nil
	k.resetLocked()
	k.mu.Unlock()
	k.wg.Wait()
}

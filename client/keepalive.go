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

// keepAliveMaxLinger is the longest a heartbeat waits for others of the
// same Client to share its message, as clientv3 sends its leases'
// keepalives from a 500 ms poll. Each message costs the server far more
// than each heartbeat in it (HTTP/2 frames, decode, encode, a write), so
// a process holding many sessions sends a few messages a second, not one
// per heartbeat. A heartbeat never waits more than a quarter of the time
// it has for an answer (keepAliveLinger), so sessions with a short TTL
// wait less: at the shortest (2 s) about 80 ms.
const keepAliveMaxLinger = 500 * time.Millisecond

// keepAliveLinger is how long a heartbeat with ctx may wait to share a
// message.
func keepAliveLinger(ctx context.Context, now time.Time) time.Duration {
	linger := keepAliveMaxLinger
	if dl, ok := ctx.Deadline(); ok {
		linger = min(linger, dl.Sub(now)/4)
	}
	return max(linger, 0)
}

// keepAliveSendTimeout bounds one write to the stream.
const keepAliveSendTimeout = 5 * time.Second

type kaStream = connect.BidiStreamForClient[beaconv1.KeepAliveBatch, beaconv1.KeepAliveBatchResult]

// kaQueueLen bounds the messages waiting for the stream's sender; a
// stream that falls that far behind is stuck, and is reset.
const kaQueueLen = 16

// keepAliveStream carries the heartbeats of every session of a Client over
// one long-lived stream, several per message, as clientv3 does for leases.
// If the stream cannot be used, sessions fall back to the unary KeepAlive
// call (which also moves to another server).
//
// Each stream has a sender goroutine that alone writes to it, and a
// receiver; no lock is held across a write, so a server that stops
// reading (HTTP/2 flow control) blocks only the sender, which the stuck
// timer then cuts.
type keepAliveStream struct {
	c *Client

	mu      sync.Mutex
	stream  *kaStream                                      // guarded by mu; nil when not open
	out     chan []int64                                   // guarded by mu; the open stream's sender queue
	server  int64                                          // guarded by mu; the stream's server (index into Client.rpcs)
	cancel  context.CancelFunc                             // guarded by mu
	waiters *waitq.Queue[int64, *beaconv1.KeepAliveResult] // guarded by mu
	pending []int64                                        // guarded by mu; heartbeats waiting for the next message
	flush   *time.Timer                                    // guarded by mu; non-nil while pending is scheduled
	flushAt time.Time                                      // guarded by mu; when flush fires
	closed  bool                                           // guarded by mu
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
	now := time.Now()
	due := now.Add(keepAliveLinger(ctx, now))
	// Send when the most hurried pending heartbeat must go. A timer that
	// cannot be stopped has fired: its send, waiting for mu, takes this one.
	if k.flush == nil || due.Before(k.flushAt) && k.flush.Stop() {
		k.flush, k.flushAt = time.AfterFunc(due.Sub(now), k.send), due
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

// send hands the pending heartbeats, as one message, to the stream's
// sender, opening the stream if needed.
func (k *keepAliveStream) send() {
	k.mu.Lock()
	defer k.mu.Unlock()
	ids := k.pending
	k.pending, k.flush = nil, nil
	if k.closed || len(ids) == 0 {
		return
	}
	if k.stream == nil {
		sctx, cancel := context.WithCancel(context.Background())
		k.server = k.c.current.Load()
		k.stream, k.cancel, k.out = k.c.rpcs[k.server].KeepAliveStream(sctx), cancel, make(chan []int64, kaQueueLen)
		k.wg.Add(2)
		go k.receive(k.stream)
		go k.sender(k.stream, k.out)
	}
	for _, batch := range splitBatch(ids, kaMaxBatch) {
		select {
		case k.out <- batch:
		default:
			k.resetLocked() // the sender is that far behind: the stream is stuck
			return
		}
	}
}

// kaMaxBatch is the most heartbeats a message may carry: the server ends
// a stream whose message carries more.
const kaMaxBatch = 10000

// splitBatch cuts ids into messages of at most max heartbeats.
func splitBatch(ids []int64, max int) [][]int64 {
	var out [][]int64
	for len(ids) > max {
		out = append(out, ids[:max:max])
		ids = ids[max:]
	}
	return append(out, ids)
}

// sender writes the stream's messages in order. A write that takes longer
// than keepAliveSendTimeout resets the stream; its waiters fall back to
// the unary call. It closes the request side once the stream is reset
// (CloseRequest may not run beside a Send, so only the sender calls it).
func (k *keepAliveStream) sender(stream *kaStream, out <-chan []int64) {
	defer k.wg.Done()
	reset := func() {
		k.mu.Lock()
		if k.stream == stream {
			k.resetLocked()
		}
		k.mu.Unlock()
	}
	for ids := range out {
		stuck := time.AfterFunc(keepAliveSendTimeout, reset)
		err := stream.Send(&beaconv1.KeepAliveBatch{SessionIds: ids})
		stuck.Stop()
		if err != nil {
			reset()
		}
	}
	// Closing the request side is what ends the stream's read (the HTTP/2
	// transport does not watch the context once the response has begun).
	_ = stream.CloseRequest()
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
		k.cancel()   // aborts a send blocked on flow control
		close(k.out) // the sender drains what is left (failing fast), then closes the request side
	}
	k.stream, k.cancel, k.out = nil, nil, nil
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

// leave closes the stream if it is on another server than to, so that
// the next heartbeat opens it on the client's current server. Heartbeats
// in flight fall back to the unary call, as after any reset.
func (k *keepAliveStream) leave(to int64) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.stream != nil && k.server != to {
		k.resetLocked()
	}
}

// onServer reports the server of the open stream, if one is open.
func (k *keepAliveStream) onServer() (int64, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.server, k.stream != nil
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

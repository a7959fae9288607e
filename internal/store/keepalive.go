package store

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// ErrOverloaded means a keepalive was not forwarded to etcd in time: the
// server has more renewals queued than etcd answers, or etcd is
// unreachable. The session may well be alive; the caller should retry
// (or try another server) at once, not wait for its next heartbeat.
var ErrOverloaded = errors.New("store: keepalive not forwarded to etcd in time (server overloaded or etcd unreachable)")

// The keepaliver's bounds. Nothing here bounds a single caller: callers
// bound themselves (the API bounds each client stream).
const (
	// kaWindow bounds the renewals sent to etcd and not yet answered. etcd
	// answers a stream's requests in order, so every renewal sent after
	// these waits for them: the window bounds the delay a flood adds in
	// etcd to anyone else's heartbeat, and keeps the gRPC stream far from
	// its flow-control limits.
	kaWindow = 1024
	// kaChunk is how many renewals of one call go out before the next
	// queued call's turn: a call of 10,000 ids does not hold up a call of
	// one for more than a chunk.
	kaChunk = 128
	// kaMaxQueued bounds the renewals queued server-wide and not yet sent.
	// A call larger than a chunk that would pass it is refused at once
	// (ErrOverloaded); smaller calls, ordinary heartbeats, always queue.
	kaMaxQueued = 100_000
	// kaQueueTimeout is how long a renewal may wait in the queue: one not
	// sent by then is answered ErrOverloaded rather than sent late.
	kaQueueTimeout = time.Second
)

var (
	errKAClosed  = errors.New("store: closed")
	errKAStalled = fmt.Errorf("store: keepalive: etcd did not answer for %s", requestTimeout)
)

// keepAliver forwards one keepalive per client heartbeat to etcd over a
// single shared LeaseKeepAlive stream. clientv3's KeepAliveOnce opens a new
// stream per call and its KeepAlive renews forever on its own; the server
// needs neither: etcd must stay the authority on expiry, renewed only when
// the client itself is alive.
//
// One goroutine, the sender, owns the stream and is the only one to call
// Send on it; callers queue their ids and wait. So no lock is ever held
// across a network send: a stream that etcd stops reading blocks the
// sender alone, never the reader that delivers etcd's answers (the
// deadlock of a send under the lock the reader needs), and never a caller,
// who waits on its own context and deadlines. One sender rather than a
// send mutex also chooses the order of the sends: calls take turns a
// chunk at a time, so one huge caller cannot stand between a small one
// and etcd; with a mutex the order would be whoever wins the lock, with
// a whole call's sends behind each win.
//
// Lock order: mu only. Safe for concurrent use.
type keepAliver struct {
	cli *clientv3.Client
	// ctx owns the sender, the stream and its reader: close cancels it.
	ctx    context.Context
	stop   context.CancelFunc
	wake   chan struct{} // size 1: work was queued or the window has room
	wg     sync.WaitGroup
	jitter func(time.Duration) time.Duration

	mu         sync.Mutex
	started    bool                          // guarded by mu; the sender runs
	closed     bool                          // guarded by mu
	queue      []*kaCall                     // guarded by mu; calls with ids not yet sent, in turn order
	queued     int                           // guarded by mu; ids in queue not yet sent
	sent       map[clientv3.LeaseID][]kaSlot // guarded by mu; sent on stream gen, unanswered, oldest first
	inflight   int                           // guarded by mu; total of sent
	gen        uint64                        // guarded by mu; bumped when a stream is opened or fails
	lastAnswer time.Time                     // guarded by mu; last answer, or first send after none in flight
}

type kaResult struct {
	ttl      int64
	err      error
	answered bool
}

// kaCall is one keepAliveMany call. Its fields are guarded by the
// keepAliver's mu.
type kaCall struct {
	ids       []clientv3.LeaseID
	out       []kaResult
	next      int  // ids[:next] were taken by the sender (or failed unsent)
	left      int  // results still missing
	abandoned bool // the caller left; answers are dropped
	done      chan struct{}
}

// kaSlot is a renewal sent and waiting for etcd's answer. An abandoned
// caller's slots stay until answered: etcd answers each request once and
// in order, so a later request for the same lease must not take an
// earlier one's answer.
type kaSlot struct {
	c *kaCall
	i int
}

func newKeepAliver(cli *clientv3.Client) *keepAliver {
	ctx, stop := context.WithCancel(context.Background())
	return &keepAliver{
		cli: cli, ctx: ctx, stop: stop, wake: make(chan struct{}, 1),
		sent:   make(map[clientv3.LeaseID][]kaSlot),
		jitter: func(d time.Duration) time.Duration { return d/2 + rand.N(d/2+1) },
	}
}

// keepAliveMany renews several leases and returns one result per id, in
// order. It returns when every id is answered, when ctx ends (the ids
// still open get ctx's error) or at close. Ids not sent to etcd within
// kaQueueTimeout get ErrOverloaded.
func (k *keepAliver) keepAliveMany(ctx context.Context, ids []clientv3.LeaseID) []kaResult {
	if len(ids) == 0 {
		return nil
	}
	c := &kaCall{ids: ids, out: make([]kaResult, len(ids)), left: len(ids), done: make(chan struct{})}
	k.mu.Lock()
	switch {
	case k.closed:
		k.failUnsentLocked(c, errKAClosed)
	case len(ids) > kaChunk && k.queued+len(ids) > kaMaxQueued:
		k.failUnsentLocked(c, ErrOverloaded)
	default:
		k.queue = append(k.queue, c)
		k.queued += len(ids)
		if !k.started {
			k.started = true
			k.wg.Add(1)
			go k.run()
		}
	}
	k.mu.Unlock()
	k.signal()

	queueTimer := time.NewTimer(kaQueueTimeout)
	defer queueTimer.Stop()
	for {
		select {
		case <-c.done:
			return c.out
		case <-queueTimer.C:
			k.mu.Lock()
			k.failUnsentLocked(c, ErrOverloaded)
			k.mu.Unlock()
		case <-ctx.Done():
			k.mu.Lock()
			k.failUnsentLocked(c, ctx.Err())
			for i := range c.out {
				if !c.out[i].answered {
					c.out[i].err = ctx.Err()
				}
			}
			c.abandoned = true
			k.mu.Unlock()
			return c.out
		}
	}
}

// failUnsentLocked takes c's ids not yet sent out of the queue and
// answers them with err.
func (k *keepAliver) failUnsentLocked(c *kaCall, err error) {
	if c.next == len(c.ids) {
		return
	}
	if i := slices.Index(k.queue, c); i >= 0 {
		k.queue = slices.Delete(k.queue, i, i+1)
		k.queued -= len(c.ids) - c.next
	}
	for ; c.next < len(c.ids); c.next++ {
		k.answerLocked(kaSlot{c, c.next}, kaResult{err: err})
	}
}

func (k *keepAliver) answerLocked(s kaSlot, r kaResult) {
	c := s.c
	if c.abandoned || c.out[s.i].answered {
		return
	}
	r.answered = true
	c.out[s.i] = r
	if c.left--; c.left == 0 {
		close(c.done)
	}
}

// signal wakes the sender without blocking.
func (k *keepAliver) signal() {
	select {
	case k.wake <- struct{}{}:
	default:
	}
}

// run is the sender: it opens the stream when there is work, takes turns
// between the queued calls and sends, never holding mu across a send.
func (k *keepAliver) run() {
	defer k.wg.Done()
	var (
		stream       pb.Lease_LeaseKeepAliveClient
		cancelStream context.CancelFunc = func() {}
		gen          uint64
		backoff      = 50 * time.Millisecond
	)
	defer func() { cancelStream() }()
	for {
		k.mu.Lock()
		if k.closed {
			k.mu.Unlock()
			return
		}
		if stream != nil && k.gen != gen { // the reader saw it fail
			cancelStream()
			stream = nil
		}
		if k.inflight > 0 && time.Since(k.lastAnswer) >= requestTimeout {
			// etcd holds our renewals and says nothing (a frozen peer
			// answers with silence): start over on a new stream.
			k.resetLocked(errKAStalled)
			k.mu.Unlock()
			continue
		}
		if len(k.queue) == 0 || k.inflight >= kaWindow {
			wait := time.Duration(1<<63 - 1)
			if k.inflight > 0 {
				wait = requestTimeout - time.Since(k.lastAnswer)
			}
			k.mu.Unlock()
			t := time.NewTimer(wait)
			select {
			case <-k.wake:
			case <-t.C:
			case <-k.ctx.Done():
				t.Stop()
				return
			}
			t.Stop()
			continue
		}
		if stream == nil {
			k.mu.Unlock()
			s, cancel, err := k.open()
			if err != nil {
				// The queued calls fail by their own deadlines; keep
				// trying while they wait.
				t := time.NewTimer(k.jitter(backoff))
				select {
				case <-t.C:
				case <-k.ctx.Done():
					t.Stop()
					return
				}
				backoff = min(2*backoff, 2*time.Second)
				continue
			}
			backoff = 50 * time.Millisecond
			k.mu.Lock()
			if k.closed {
				k.mu.Unlock()
				cancel()
				return
			}
			k.gen++
			stream, cancelStream, gen = s, cancel, k.gen
			k.wg.Add(1)
			go k.recvLoop(s, gen)
			k.mu.Unlock()
			continue
		}
		// The first queued call's turn: a chunk of its ids, within the window.
		c := k.queue[0]
		n := min(kaChunk, len(c.ids)-c.next, kaWindow-k.inflight)
		ids := c.ids[c.next : c.next+n]
		for j, id := range ids {
			k.sent[id] = append(k.sent[id], kaSlot{c, c.next + j})
		}
		c.next += n
		k.queued -= n
		if k.inflight == 0 {
			k.lastAnswer = time.Now() // the stall clock starts with the first send
		}
		k.inflight += n
		k.queue = k.queue[1:]
		if c.next < len(c.ids) {
			k.queue = append(k.queue, c) // back of the line
		}
		k.mu.Unlock()
		for _, id := range ids {
			if err := stream.Send(&pb.LeaseKeepAliveRequest{ID: int64(id)}); err != nil {
				k.mu.Lock()
				if k.gen == gen {
					k.resetLocked(fmt.Errorf("store: keepalive: %w", err))
				}
				k.mu.Unlock()
				break
			}
		}
	}
}

// open opens a LeaseKeepAlive stream, giving up after requestTimeout
// (clientv3 waits for a connection) or at close.
func (k *keepAliver) open() (pb.Lease_LeaseKeepAliveClient, context.CancelFunc, error) {
	ctx, cancel := context.WithCancel(clientv3.WithRequireLeader(k.ctx))
	t := time.AfterFunc(requestTimeout, cancel)
	stream, err := pb.NewLeaseClient(k.cli.ActiveConnection()).LeaseKeepAlive(ctx)
	if !t.Stop() && err == nil {
		err = context.DeadlineExceeded // cancelled just as it opened
	}
	if err != nil {
		cancel()
		return nil, nil, fmt.Errorf("store: opening keepalive stream: %w", err)
	}
	return stream, cancel, nil
}

// recvLoop hands each answer of stream generation gen to the oldest
// renewal of that lease sent on it.
func (k *keepAliver) recvLoop(stream pb.Lease_LeaseKeepAliveClient, gen uint64) {
	defer k.wg.Done()
	for {
		resp, err := stream.Recv()
		k.mu.Lock()
		if k.gen != gen {
			k.mu.Unlock()
			return
		}
		if err != nil {
			k.resetLocked(fmt.Errorf("store: keepalive stream broken: %w", err))
			k.mu.Unlock()
			k.signal()
			return
		}
		id := clientv3.LeaseID(resp.ID)
		if slots := k.sent[id]; len(slots) > 0 {
			if len(slots) == 1 {
				delete(k.sent, id)
			} else {
				k.sent[id] = slots[1:]
			}
			k.inflight--
			k.lastAnswer = time.Now()
			r := kaResult{ttl: resp.TTL}
			if resp.TTL <= 0 {
				r.err = ErrSessionNotFound
			}
			k.answerLocked(slots[0], r)
		}
		k.mu.Unlock()
		k.signal()
	}
}

// resetLocked abandons the current stream (the sender drops it and opens
// another when there is work) and fails every renewal sent on it; their
// callers retry at their next heartbeat.
func (k *keepAliver) resetLocked(err error) {
	k.gen++
	for _, slots := range k.sent {
		for _, s := range slots {
			k.answerLocked(s, kaResult{err: err})
		}
	}
	clear(k.sent)
	k.inflight = 0
}

// close fails every renewal queued or in flight, stops the sender and the
// stream and waits for them; it never waits for etcd.
func (k *keepAliver) close() {
	k.mu.Lock()
	k.closed = true
	k.resetLocked(errKAClosed)
	for len(k.queue) > 0 {
		k.failUnsentLocked(k.queue[0], errKAClosed)
	}
	k.mu.Unlock()
	k.stop()
	k.wg.Wait()
}

package main

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/peer"

	"beacon.dev/beacon/examples/shop/shoppb"
)

// items are the shop's (examples/shop): orders go round them, as a
// shop's do, rather than all contending for one stock counter.
var items = []string{"widget", "gadget", "gizmo"}

// call is one request as the load generator saw it.
type call struct {
	start   time.Duration // since the run began
	latency time.Duration
	err     error
	peer    string // the instance that answered (or failed), if known
}

// generator sends PlaceOrder at a fixed rate (open loop: a slow answer
// does not slow the rate) to whatever client is current.
type generator struct {
	begin time.Time

	mu       sync.Mutex
	client   shoppb.OrdersClient // guarded by mu; swapped on a client restart
	inflight *sync.WaitGroup     // guarded by mu; the current client's calls
	calls    []call              // guarded by mu
	attempts []call              // guarded by mu; every attempt, below retries and hedges
	seq      int                 // guarded by mu
}

// recordAttempts is a client interceptor placed below the client's own
// policies: it sees every attempt and where it went.
func (g *generator) recordAttempts(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	var p peer.Peer
	start := time.Now()
	err := invoker(ctx, method, req, reply, cc, append(opts, grpc.Peer(&p))...)
	a := call{start: start.Sub(g.begin), latency: time.Since(start), err: err}
	if p.Addr != nil {
		a.peer = p.Addr.String()
	}
	g.mu.Lock()
	g.attempts = append(g.attempts, a)
	g.mu.Unlock()
	return err
}

// setClient sends the next calls through c and returns a wait for the
// calls still in flight on the previous client (a restarting process
// drains its requests before it closes its connections).
func (g *generator) setClient(c shoppb.OrdersClient) (drained func()) {
	g.mu.Lock()
	defer g.mu.Unlock()
	old := g.inflight
	g.client, g.inflight = c, new(sync.WaitGroup)
	return func() {
		if old != nil {
			old.Wait()
		}
	}
}

// run sends rate requests a second until ctx ends, then waits for those in
// flight (each bounded by its own deadline).
func (g *generator) run(ctx context.Context, rate int, deadline time.Duration) {
	var wg sync.WaitGroup
	defer wg.Wait()
	t := time.NewTicker(time.Second / time.Duration(rate))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		g.mu.Lock()
		c, inflight := g.client, g.inflight
		inflight.Add(1)
		g.seq++
		seq := g.seq
		id := fmt.Sprintf("chaos-%d-%d", g.begin.UnixNano(), seq)
		g.mu.Unlock()
		wg.Go(func() {
			defer inflight.Done()
			start := time.Now()
			cctx, cancel := context.WithTimeout(context.Background(), deadline)
			defer cancel()
			var p peer.Peer
			_, err := c.PlaceOrder(cctx, &shoppb.PlaceOrderRequest{OrderId: id, Item: items[seq%len(items)], Quantity: 1, AmountCents: 100}, grpc.Peer(&p))
			cl := call{start: start.Sub(g.begin), latency: time.Since(start), err: err}
			if p.Addr != nil {
				cl.peer = p.Addr.String()
			}
			g.mu.Lock()
			g.calls = append(g.calls, cl)
			g.mu.Unlock()
		})
	}
}

// results returns the calls and the attempts, by start.
func (g *generator) results() (calls, attempts []call) {
	g.mu.Lock()
	defer g.mu.Unlock()
	calls, attempts = slices.Clone(g.calls), slices.Clone(g.attempts)
	for _, l := range [][]call{calls, attempts} {
		slices.SortFunc(l, func(a, b call) int { return int(a.start - b.start) })
	}
	return calls, attempts
}

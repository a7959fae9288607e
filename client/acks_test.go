package client_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
)

// consume calls Next in a loop, as the discovery cache does, until ctx ends.
func consume(ctx context.Context, w *client.Watcher) {
	for {
		if _, err := w.Next(ctx); err != nil {
			return
		}
	}
}

// watchAndConsume watches services through c, consuming every batch (so
// each is acknowledged) until the test ends, and returns once synced.
func watchAndConsume(ctx context.Context, t *testing.T, c *client.Client, services ...string) *client.Watcher {
	t.Helper()
	w, err := c.Watch(ctx, services)
	if err != nil {
		t.Fatal(err)
	}
	consumeCtx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { consume(consumeCtx, w); close(done) }() // owned: stopped at cleanup
	t.Cleanup(func() { stop(); <-done; w.Close() })
	select {
	case <-w.Synced():
	case <-ctx.Done():
		t.Fatalf("the watch of %v never synced", services)
	}
	return w
}

// awaitsInFlight waits until the server has exactly n AwaitWatchers calls
// waiting (its beacon_awaits_in_flight gauge).
func awaitsInFlight(t *testing.T, addr string, n int) {
	t.Helper()
	testutil.Eventually(t, 30*time.Second, fmt.Sprintf("%d AwaitWatchers in flight on the server", n), func() bool {
		v, ok := testutil.Metric(t, addr, "beacon_awaits_in_flight")
		return ok && v == float64(n)
	})
}

// awaitComplete runs an AwaitWatchers that must complete: its timeout
// (2 min) outlasts the call's context (1 min), so a wait that answered at
// its timeout rather than on the last acknowledgement fails with the
// context's error instead of passing. Both are generous liveness bounds.
func awaitComplete(ctx context.Context, t *testing.T, c *client.Client, service string, rev int64) (client.WatchersResult, error) {
	t.Helper()
	cctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	return c.AwaitWatchers(cctx, service, rev, 2*time.Minute)
}

func TestAwaitWatchersCountsAcknowledgements(t *testing.T) {
	srv := testutil.StartBeacon(t)
	c := newClient(t, srv.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	in := registry.Instance{Service: "orders", ID: "o-1", Address: "127.0.0.1", Port: 9001}
	if _, err := c.Register(ctx, in); err != nil {
		t.Fatal(err)
	}
	// Two consuming watchers (one of the service, one of the namespace),
	// one that receives but never comes back to Next (a stuck consumer),
	// and one of another service, which is not waited for.
	var watchers []*client.Watcher
	watch := func(services ...string) *client.Watcher {
		w, err := c.Watch(ctx, services)
		if err != nil {
			t.Fatal(err)
		}
		watchers = append(watchers, w)
		return w
	}
	consumeCtx, stopConsuming := context.WithCancel(ctx)
	done := make(chan struct{}, 2)
	for _, w := range []*client.Watcher{watch("orders"), watch()} {
		go func() { consume(consumeCtx, w); done <- struct{}{} }()
	}
	stuck := watch("orders")
	watch("payments")
	defer func() {
		stopConsuming()
		<-done
		<-done
		for _, w := range watchers {
			w.Close()
		}
	}()
	for _, w := range watchers {
		<-w.Synced()
	}
	if _, err := stuck.Next(ctx); err != nil { // takes the first batch, never returns for more
		t.Fatal(err)
	}

	in.Status = registry.StatusDraining
	rev, err := c.Register(ctx, in)
	if err != nil {
		t.Fatal(err)
	}
	// The stuck consumer never acknowledges: the wait ends at its timeout,
	// incomplete, by which time the two consumers have long acknowledged
	// (5 s is room for them, not a measurement).
	res, err := c.AwaitWatchers(ctx, "orders", rev, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if res.Watchers != 3 || res.Acknowledged != 2 || res.Gone != 0 || res.Complete() {
		t.Fatalf("AwaitWatchers = %+v, want 3 watchers, 2 acknowledged, incomplete", res)
	}

	// The stuck consumer comes back while a wait is in flight: the wait
	// completes on its acknowledgement, long before its own timeout.
	type result struct {
		res client.WatchersResult
		err error
	}
	awaited := make(chan result, 1)
	go func() { r, err := awaitComplete(ctx, t, c, "orders", rev); awaited <- result{r, err} }()
	awaitsInFlight(t, srv.Addr(), 1)
	nexted := make(chan struct{})
	go func() {
		defer close(nexted)
		stuck.Next(ctx) // acknowledges the first batch, takes the DRAINING one
		stuck.Next(ctx) // acknowledges it, takes the UP one below, never acknowledges that
	}()
	r := <-awaited
	if r.err != nil || !r.res.Complete() || r.res.Acknowledged != 3 {
		t.Fatalf("AwaitWatchers = %+v, %v; want all 3 acknowledged", r.res, r.err)
	}

	// A watcher that goes away while waited for counts as gone: it is
	// closed only once the server holds the wait, which then counts it.
	in.Status = registry.StatusUp
	rev, err = c.Register(ctx, in)
	if err != nil {
		t.Fatal(err)
	}
	<-nexted // the stuck consumer holds the UP batch, unacknowledged
	go func() { r, err := awaitComplete(ctx, t, c, "orders", rev); awaited <- result{r, err} }()
	awaitsInFlight(t, srv.Addr(), 1)
	stuck.Close()
	r = <-awaited
	if r.err != nil || !r.res.Complete() || r.res.Gone != 1 || r.res.Watchers != 3 {
		t.Fatalf("AwaitWatchers = %+v, %v; want 3 watchers, the closed one gone and the wait complete", r.res, r.err)
	}
}

func TestAcknowledgementsSurviveReconnect(t *testing.T) {
	srv := testutil.StartBeacon(t)
	proxy := testutil.NewProxy(t, srv.Addr())
	c := newClient(t, srv.Addr())
	viaProxy := newClient(t, proxy.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	in := registry.Instance{Service: "orders", ID: "o-1", Address: "127.0.0.1", Port: 9001, Status: registry.StatusDraining}
	rev, err := c.Register(ctx, in)
	if err != nil {
		t.Fatal(err)
	}
	w := watchAndConsume(ctx, t, viaProxy, "orders")
	if res, err := awaitComplete(ctx, t, c, "orders", rev); err != nil || !res.Complete() || res.Acknowledged != 1 {
		t.Fatalf("before the cut: %+v, %v", res, err)
	}
	// After a reconnect the server sends nothing new (the watcher is
	// current), so the watcher must acknowledge what it already applied.
	reconnects := w.Status().Reconnects
	proxy.Cut()
	testutil.Eventually(t, 30*time.Second, "watch reconnected", func() bool {
		st := w.Status()
		return st.Reconnects > reconnects && st.Connected
	})
	if res, err := awaitComplete(ctx, t, c, "orders", rev); err != nil || !res.Complete() || res.Acknowledged != 1 {
		t.Fatalf("after the reconnect: %+v, %v", res, err)
	}
}

func TestAwaitWatchersBadInput(t *testing.T) {
	srv := testutil.StartBeacon(t)
	c := newClient(t, srv.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, tc := range []struct {
		service string
		rev     int64
		timeout time.Duration
		field   string
	}{
		{"Orders!", 1, time.Second, "service"},
		{"orders", 0, time.Second, "revision"},
		{"orders", 1, 6 * time.Minute, "timeout"},
	} {
		_, err := c.AwaitWatchers(ctx, tc.service, tc.rev, tc.timeout)
		if !errors.Is(err, registry.ErrInvalid) || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("AwaitWatchers(%q, %d, %v) = %v, want invalid %s", tc.service, tc.rev, tc.timeout, err, tc.field)
		}
	}
}

// A server that stops answering without closing its connections (a hung
// process, a silent network) is noticed by the HTTP/2 pings: the watch
// reports itself disconnected (the ping budget is 5 s idle + 5 s; the
// waits below are generous liveness bounds, not that budget), and comes
// back once the server answers again.
func TestHungServerIsNoticedByPings(t *testing.T) {
	srv := testutil.StartBeacon(t)
	proxy := testutil.NewProxy(t, srv.Addr())
	viaProxy := newClient(t, proxy.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	w := watchAndConsume(ctx, t, viaProxy, "orders")
	testutil.Eventually(t, 30*time.Second, "connected", func() bool { return w.Status().Connected })

	proxy.Freeze(true)
	frozen := time.Now()
	testutil.Eventually(t, 60*time.Second, "the watch notices the hung server", func() bool { return !w.Status().Connected })
	t.Logf("noticed after %v", time.Since(frozen).Round(100*time.Millisecond))
	proxy.Freeze(false)
	proxy.Cut() // connections opened while frozen may have given up already
	testutil.Eventually(t, 60*time.Second, "the watch is back", func() bool { return w.Status().Connected })
}

// Watchers acknowledge only when a wait asks: changes nobody waits for
// cost no AckWatch calls, and a wait is answered by every watcher, once.
func TestAcknowledgementsOnlyWhenAsked(t *testing.T) {
	srv := testutil.StartBeacon(t)
	c := newClient(t, srv.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var watchers []*client.Watcher
	for range 3 {
		watchers = append(watchers, watchAndConsume(ctx, t, newClient(t, srv.Addr()), "orders"))
	}
	var rev int64
	for i := range 20 {
		var err error
		if rev, err = c.Register(ctx, registry.Instance{Service: "orders", ID: "o-1", Address: "127.0.0.1", Port: 9000 + i}); err != nil {
			t.Fatal(err)
		}
	}
	for _, w := range watchers {
		testutil.Eventually(t, 30*time.Second, "every watcher applied the last change", func() bool {
			s, ok := w.Snapshot("orders")
			return ok && s.Revision >= rev
		})
	}
	const acks = `beacon_requests_total{code="ok",procedure="/beacon.v1.RegistryService/AckWatch"}`
	if n, _ := testutil.Metric(t, srv.Addr(), acks); n != 0 {
		t.Fatalf("%v AckWatch calls before any wait; want none", n)
	}
	res, err := awaitComplete(ctx, t, c, "orders", rev)
	if err != nil || !res.Complete() || res.Acknowledged != 3 {
		t.Fatalf("AwaitWatchers = %+v, %v; want all 3 acknowledged", res, err)
	}
	if n, _ := testutil.Metric(t, srv.Addr(), acks); n != 3 {
		t.Fatalf("%v AckWatch calls for one wait of 3 watchers; want 3", n)
	}
}

package e2e

import (
	"context"
	"fmt"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server"
	"beacon.dev/beacon/server/servertest"
)

// guardTTL is the sessions' TTL in the guard test: long enough that a
// loaded machine does not expire a session that is not cut.
const guardTTL = 5 * time.Second

// sessionVia opens a session through its own proxy (so that it can be cut
// alone) and registers n instances of service under it.
func sessionVia(ctx context.Context, t *testing.T, srvAddr, service, prefix string, n int) *testutil.Proxy {
	t.Helper()
	p := testutil.NewProxy(t, srvAddr)
	c := newClient(t, p.Addr())
	s, err := c.NewSession(ctx, client.WithTTL(guardTTL))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close(context.Background()) })
	for i := range n {
		if _, err := s.Register(ctx, registry.Instance{Service: service, ID: fmt.Sprintf("%s-%d", prefix, i), Address: "127.0.0.1", Port: 1000 + i}); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

func count(ctx context.Context, t *testing.T, c *client.Client, service string) (all, suspect int) {
	t.Helper()
	snap, err := c.Instances(ctx, service)
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range snap.Instances {
		all++
		if in.Suspect {
			suspect++
		}
	}
	return all, suspect
}

// The mass-expiry guard: sessions holding most of a namespace's instances
// expire together (here their clients are cut off, as when the server's
// own network fails) — the instances stay, routable and marked suspect,
// for the grace period, then go. A single expiry is not held. The grace
// (30 s) is long enough for the test to see the held state on a loaded
// machine; how long they were held is logged.
func TestMassExpiryIsHeldSingleExpiryIsNot(t *testing.T) {
	cfg := servertest.Config(t, "")
	cfg.Guard = server.GuardConfig{Share: 0.3, MinSessions: 3, Window: 5 * time.Second, Grace: 30 * time.Second}
	srv := servertest.Start(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	direct := newClient(t, srv.Addr())

	// Single expiry: one session of five.
	var proxies []*testutil.Proxy
	for i := range 5 {
		proxies = append(proxies, sessionVia(ctx, t, srv.Addr(), "fleet", fmt.Sprint("s", i), 2))
	}
	if all, _ := count(ctx, t, direct, "fleet"); all != 10 {
		t.Fatalf("%d instances, want 10", all)
	}
	cut := time.Now()
	proxies[0].SetDown(true)
	testutil.Eventually(t, guardTTL+60*time.Second, "the single expired session's instances are gone", func() bool {
		all, suspect := count(ctx, t, direct, "fleet")
		return all == 8 && suspect == 0
	})
	t.Logf("single expiry: gone %v after the cut (TTL %v), not held", time.Since(cut).Round(100*time.Millisecond), guardTTL)
	if v, _ := testutil.Metric(t, srv.Addr(), "beacon_guard_triggered_total"); v != 0 {
		t.Errorf("the guard triggered on a single expiry")
	}

	// Mass expiry: the other four sessions (8 of 8 instances) at once,
	// once the single expiry has left the guard's window.
	time.Sleep(cfg.Guard.Window)
	w := watch(ctx, t, direct, "fleet")
	cut = time.Now()
	for _, p := range proxies[1:] {
		p.SetDown(true)
	}
	// Held: all eight still listed, every one suspect (they only become
	// suspect when their session has gone), and counted as held.
	var all, suspect int
	testutil.Eventually(t, guardTTL+30*time.Second, "the mass expiry is held", func() bool {
		all, suspect = count(ctx, t, direct, "fleet")
		return all == 8 && suspect == 8
	})
	held := time.Now()
	if v, _ := testutil.Metric(t, srv.Addr(), "beacon_guard_held_instances"); v != 8 {
		t.Errorf("beacon_guard_held_instances = %v, want 8", v)
	}
	if v, _ := testutil.Metric(t, srv.Addr(), "beacon_guard_triggered_total"); v < 1 {
		t.Errorf("beacon_guard_triggered_total = %v, want the mass expiry counted", v)
	}
	// Watchers see them suspect but routable.
	testutil.Eventually(t, 30*time.Second, "the watcher sees the suspects", func() bool {
		s, ok := w.Snapshot("fleet")
		if !ok {
			return false
		}
		n := 0
		for _, in := range s.Routable() {
			if in.Suspect {
				n++
			}
		}
		if n != 8 {
			w.Next(ctx)
		}
		return n == 8
	})
	// Released after the grace: gone from the list and no longer held.
	testutil.Eventually(t, cfg.Guard.Grace+60*time.Second, "the held instances go after the grace", func() bool {
		all, _ := count(ctx, t, direct, "fleet")
		return all == 0
	})
	if v, _ := testutil.Metric(t, srv.Addr(), "beacon_guard_held_instances"); v != 0 {
		t.Errorf("beacon_guard_held_instances = %v after the release, want 0", v)
	}
	t.Logf("mass expiry: held %v after the cut, released %v after it was first seen held (grace %v)",
		held.Sub(cut).Round(100*time.Millisecond), time.Since(held).Round(100*time.Millisecond), cfg.Guard.Grace)
}

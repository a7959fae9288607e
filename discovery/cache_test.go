package discovery_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"

	"beacon.dev/beacon/balancer"
	"beacon.dev/beacon/balancer/roundrobin"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/discovery"
	"beacon.dev/beacon/endpoint"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
)

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func newClient(t *testing.T, addrs ...string) *client.Client {
	t.Helper()
	c, err := client.New(addrs)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func newCache(t *testing.T, c *client.Client, cfg discovery.Config, services ...string) *discovery.Cache {
	t.Helper()
	cache, err := discovery.New(discovery.FromClient(c, ""), cfg, services...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cache.Close)
	return cache
}

func idsOf(set endpoint.Set) []string {
	var out []string
	for _, e := range set.Endpoints {
		id := e.ID
		if e.Suspect {
			id += "?"
		}
		out = append(out, id)
	}
	return out
}

// waitSet waits until the service's set has exactly the given IDs
// (suspects end in "?").
func waitSet(t *testing.T, cache *discovery.Cache, service string, want ...string) endpoint.Set {
	t.Helper()
	var set endpoint.Set
	testutil.Eventually(t, 30*time.Second, fmt.Sprintf("%s = %v", service, want), func() bool {
		set, _ = cache.Endpoints(service)
		return slices.Equal(idsOf(set), want)
	})
	return set
}

func inst(service, id string, port int) registry.Instance {
	return registry.Instance{Service: service, ID: id, Address: "127.0.0.1", Port: port}
}

func TestFollowsChangesAndFeedsABalancer(t *testing.T) {
	ctx := testCtx(t)
	srv := testutil.StartBeacon(t)
	c := newClient(t, srv.Addr())
	cache := newCache(t, c, discovery.Config{})
	sub, err := cache.Subscribe("orders")
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	bal, err := balancer.New(roundrobin.Builder{}, balancer.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer bal.Close()
	rctx, stop := context.WithCancel(ctx)
	ran := make(chan error, 1)
	go func() { ran <- bal.Run(rctx, sub) }()
	defer func() { stop(); <-ran }()

	for i := range 3 {
		if _, err := c.Register(ctx, inst("orders", fmt.Sprintf("o-%d", i), 9000+i)); err != nil {
			t.Fatal(err)
		}
	}
	set := waitSet(t, cache, "orders", "o-0", "o-1", "o-2")
	if set.Revision == 0 || set.FromDisk {
		t.Errorf("set = rev %d fromDisk %v, want a registry revision", set.Revision, set.FromDisk)
	}
	testutil.Eventually(t, 30*time.Second, "balancer sees 3 endpoints", func() bool { return bal.State().Endpoints == 3 })

	// Draining is intent: removed at once, whatever the share.
	drain := inst("orders", "o-0", 9000)
	drain.Status = registry.StatusDraining
	if _, err := c.Register(ctx, drain); err != nil {
		t.Fatal(err)
	}
	waitSet(t, cache, "orders", "o-1", "o-2")

	// Scale to zero on purpose: persistent instances deregistered.
	for _, id := range []string{"o-0", "o-1", "o-2"} {
		if _, err := c.Deregister(ctx, "orders", id); err != nil {
			t.Fatal(err)
		}
	}
	waitSet(t, cache, "orders")
	testutil.Eventually(t, 30*time.Second, "balancer empties", func() bool { return bal.State().Endpoints == 0 })
}

func TestMassLossIsHeldBackButSingleLossIsNot(t *testing.T) {
	ctx := testCtx(t)
	srv := testutil.StartBeacon(t)
	c := newClient(t, srv.Addr())
	// The grace runs on a fake clock, advanced only once the suspects are
	// seen: the cache's other timers (cold start, snapshot flush, probe)
	// share it but do nothing here once the watch has synced (no snapshot
	// directory), so their firing or not is irrelevant. A grace of a
	// minute on the wall clock could not end within the waits below.
	clock := clockwork.NewFakeClock()
	const grace = time.Minute
	cache := newCache(t, c, discovery.Config{MassLoss: 0.5, MassLossGrace: grace, Clock: clock}, "pay")

	big, err := c.NewSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	small, err := c.NewSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer small.Close(ctx)
	one, err := c.NewSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if _, err := big.Register(ctx, inst("pay", fmt.Sprintf("b-%d", i), 9100+i)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := small.Register(ctx, inst("pay", "s-0", 9200)); err != nil {
		t.Fatal(err)
	}
	if _, err := one.Register(ctx, inst("pay", "x-0", 9300)); err != nil {
		t.Fatal(err)
	}
	waitSet(t, cache, "pay", "b-0", "b-1", "b-2", "s-0", "x-0")

	// One of five lost with its session: an ordinary expiry, applied at once.
	if err := one.Close(ctx); err != nil {
		t.Fatal(err)
	}
	waitSet(t, cache, "pay", "b-0", "b-1", "b-2", "s-0")

	// Three of four at once: held as suspects for the grace, then dropped.
	if err := big.Close(ctx); err != nil {
		t.Fatal(err)
	}
	waitSet(t, cache, "pay", "b-0?", "b-1?", "b-2?", "s-0")
	if st := cache.Status(); st.Suspects != 3 {
		t.Errorf("Status().Suspects = %d, want 3", st.Suspects)
	}
	// The suspects' expiry timer was armed with the set above. Short of
	// the grace they stay; at the grace they go.
	clock.Advance(grace - time.Nanosecond)
	if set, _ := cache.Endpoints("pay"); !slices.Equal(idsOf(set), []string{"b-0?", "b-1?", "b-2?", "s-0"}) {
		t.Errorf("a nanosecond before the grace ends the set is %v, want the suspects still held", idsOf(set))
	}
	if st := cache.Status(); st.Suspects != 3 {
		t.Errorf("a nanosecond before the grace ends Status().Suspects = %d, want 3", st.Suspects)
	}
	clock.Advance(time.Nanosecond)
	waitSet(t, cache, "pay", "s-0")
	if st := cache.Status(); st.Suspects != 0 {
		t.Errorf("after the grace Status().Suspects = %d, want 0", st.Suspects)
	}
}

func TestRegistryOutageKeepsLastKnownGood(t *testing.T) {
	ctx := testCtx(t)
	srv := testutil.StartBeacon(t)
	proxy := testutil.NewProxy(t, srv.Addr())
	c := newClient(t, proxy.Addr())
	if _, err := c.Register(ctx, inst("inv", "i-0", 9400)); err != nil {
		t.Fatal(err)
	}
	cache := newCache(t, c, discovery.Config{}, "inv")
	waitSet(t, cache, "inv", "i-0")
	testutil.Eventually(t, 30*time.Second, "connected", func() bool { return cache.Status().Connected })
	if st := cache.Status(); st.Stale != 0 {
		t.Errorf("Stale = %v while connected, want 0", st.Stale)
	}

	proxy.SetDown(true)
	proxy.Cut()
	testutil.Eventually(t, 30*time.Second, "stale grows", func() bool { return cache.Status().Stale > 500*time.Millisecond })
	if set, ok := cache.Endpoints("inv"); !ok || len(set.Endpoints) != 1 {
		t.Fatalf("during the outage Endpoints(inv) = %v %v, want the last known set", idsOf(set), ok)
	}

	proxy.SetDown(false)
	testutil.Eventually(t, 30*time.Second, "reconnected", func() bool { return cache.Status().Stale == 0 })
}

func TestDiskSnapshotServesAColdStartDuringAnOutage(t *testing.T) {
	ctx := testCtx(t)
	dir := filepath.Join(t.TempDir(), "not", "made", "yet") // the cache makes it
	srv := testutil.StartBeacon(t)
	proxy := testutil.NewProxy(t, srv.Addr())
	c := newClient(t, proxy.Addr())
	for i := range 2 {
		if _, err := c.Register(ctx, inst("cart", fmt.Sprintf("c-%d", i), 9500+i)); err != nil {
			t.Fatal(err)
		}
	}
	// A refused registry does not make the cold start wait ColdStartWait.
	cfg := discovery.Config{SnapshotDir: dir, SnapshotEvery: 50 * time.Millisecond, ColdStartWait: time.Hour}
	warm, err := discovery.New(discovery.FromClient(c, ""), cfg, "cart")
	if err != nil {
		t.Fatal(err)
	}
	waitSet(t, warm, "cart", "c-0", "c-1")
	warm.Close()
	path := filepath.Join(dir, "beacon-discovery-default.json")
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("no snapshot written: %v", err)
	}

	// The registry is down; a new process starts from the snapshot.
	proxy.SetDown(true)
	proxy.Cut()
	cold := newCache(t, c, cfg, "cart")
	set := waitSet(t, cold, "cart", "c-0", "c-1")
	if !set.FromDisk || !cold.Status().FromDisk {
		t.Errorf("cold-start set FromDisk = %v, want true", set.FromDisk)
	}

	// The registry answers: its data replaces the snapshot at once.
	if _, err := srvClient(t, srv).Register(ctx, inst("cart", "c-2", 9502)); err != nil {
		t.Fatal(err)
	}
	proxy.SetDown(false)
	testutil.Eventually(t, 30*time.Second, "registry data replaces disk", func() bool {
		set, _ := cold.Endpoints("cart")
		return !set.FromDisk && len(set.Endpoints) == 3
	})
}

// A registry that hangs (accepts, never answers) is waited for
// ColdStartWait, then the snapshot is served.
func TestDiskSnapshotServesAColdStartWhileTheRegistryHangs(t *testing.T) {
	ctx := testCtx(t)
	dir := t.TempDir()
	srv := testutil.StartBeacon(t)
	proxy := testutil.NewProxy(t, srv.Addr())
	c := newClient(t, proxy.Addr())
	if _, err := c.Register(ctx, inst("cart", "c-0", 9500)); err != nil {
		t.Fatal(err)
	}
	cfg := discovery.Config{SnapshotDir: dir, SnapshotEvery: 50 * time.Millisecond, ColdStartWait: 300 * time.Millisecond}
	warm, err := discovery.New(discovery.FromClient(c, ""), cfg, "cart")
	if err != nil {
		t.Fatal(err)
	}
	waitSet(t, warm, "cart", "c-0")
	warm.Close()

	proxy.Freeze(true)
	proxy.Cut()
	cold := newCache(t, c, cfg, "cart")
	if set := waitSet(t, cold, "cart", "c-0"); !set.FromDisk {
		t.Errorf("cold-start set FromDisk = %v, want true", set.FromDisk)
	}
	proxy.Freeze(false)
}

func srvClient(t *testing.T, srv interface{ Addr() string }) *client.Client {
	return newClient(t, srv.Addr())
}

func TestBadSnapshotsAreRefused(t *testing.T) {
	dir := t.TempDir()
	srv := testutil.StartBeacon(t)
	proxy := testutil.NewProxy(t, srv.Addr())
	c := newClient(t, proxy.Addr())
	proxy.SetDown(true)
	path := filepath.Join(dir, "beacon-discovery-default.json")
	for _, tc := range []struct {
		name, content, want string
	}{
		{"garbage", "not json", "envelope"},
		{"format", `{"format":"x","version":1}`, `format "x"`},
		{"version", `{"format":"beacon-discovery-snapshot","version":9,"namespace":"default"}`, "version 9"},
		{"checksum", `{"format":"beacon-discovery-snapshot","version":2,"namespace":"default","sha256":"00","payload":{}}`, "checksum mismatch"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := os.WriteFile(path, []byte(tc.content), 0o600); err != nil {
				t.Fatal(err)
			}
			cache := newCache(t, c, discovery.Config{SnapshotDir: dir, ColdStartWait: 50 * time.Millisecond}, "cart")
			testutil.Eventually(t, 30*time.Second, "disk error reported", func() bool { return cache.Status().DiskErr != nil })
			if err := cache.Status().DiskErr; !strings.Contains(err.Error(), tc.want) {
				t.Errorf("DiskErr = %v, want it to name %q", err, tc.want)
			}
			if _, ok := cache.Endpoints("cart"); ok {
				t.Error("a bad snapshot was served")
			}
		})
	}
}

package e2e

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/servertest"
)

func startCluster(t *testing.T, n int) []*testutil.Node {
	t.Helper()
	ns := testutil.NewCluster(t, beaconBin, n, "--log-level", "warn", "--member-ttl", "2s")
	testutil.StartAll(t, ns)
	return ns
}

func restart(t *testing.T, nd *testutil.Node) {
	t.Helper()
	select {
	case <-nd.Start(t):
	case <-time.After(90 * time.Second):
		t.Fatalf("%s did not come back; output:\n%s", nd.Name, nd.Output())
	}
}

// HA behaviour 1: a 3-node cluster under continuous registrations and
// watches loses the node hosting the etcd leader to SIGKILL: no
// acknowledged registration is lost, every watcher converges, a session
// survives without its instance ever vanishing, writes come back (how
// soon is logged; BenchmarkClusterFailover measures it); restarted, the
// node rejoins with the same state.
func TestClusterSurvivesTheLeadersDeath(t *testing.T) {
	ms := startCluster(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// A session holding one instance that must never vanish. Its TTL
	// (10 s) leaves the failover room on a loaded machine; that the
	// session survives it is the property, not how fast the failover is.
	owner := newClient(t, testutil.APIs(ms, 0)...)
	var expired atomic.Bool
	sess, err := owner.NewSession(ctx, client.WithTTL(10*time.Second), client.WithEvents(func(ev client.SessionEvent) {
		if ev.Kind == client.SessionExpired || ev.Kind == client.SessionRecovered {
			expired.Store(true)
		}
	}))
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close(context.Background())
	if _, err := sess.Register(ctx, registry.Instance{Service: "keep", ID: "keeper", Address: "127.0.0.1", Port: 9000}); err != nil {
		t.Fatal(err)
	}

	// Three watchers, each starting on another server.
	type watcher struct {
		w          *client.Watcher
		keeperGone atomic.Bool
	}
	var ws []*watcher
	var wg sync.WaitGroup
	for i := range 3 {
		c := newClient(t, testutil.APIs(ms, i)...)
		w, err := c.Watch(ctx, []string{"reg", "keep"})
		if err != nil {
			t.Fatal(err)
		}
		defer w.Close()
		wt := &watcher{w: w}
		ws = append(ws, wt)
		wg.Go(func() {
			seen := false
			for {
				snaps, err := w.Next(ctx)
				if err != nil {
					return
				}
				for _, s := range snaps {
					if s.Service != "keep" {
						continue
					}
					has := slices.ContainsFunc(s.Instances, func(in *registry.Instance) bool { return in.ID == "keeper" })
					if seen && !has {
						wt.keeperGone.Store(true)
					}
					seen = seen || has
				}
			}
		})
	}
	defer func() {
		for _, wt := range ws {
			wt.w.Close()
		}
		wg.Wait()
	}()

	// A writer registering persistent instances as fast as it can.
	writer := newClient(t, testutil.APIs(ms, 1)...)
	var mu sync.Mutex
	var acked []string
	var lastFail, firstOKAfterKill time.Time
	var killed atomic.Int64 // unix nanos of the kill
	wctx, stopWriting := context.WithCancel(ctx)
	writing := make(chan struct{})
	go func() {
		defer close(writing)
		for i := 0; wctx.Err() == nil; i++ {
			id := fmt.Sprint("w-", i)
			began := time.Now()
			cctx, cancel := context.WithTimeout(wctx, 2*time.Second)
			_, err := writer.Register(cctx, registry.Instance{Service: "reg", ID: id, Address: "127.0.0.1", Port: 1 + i%60000})
			cancel()
			mu.Lock()
			if err == nil {
				acked = append(acked, id)
				if k := killed.Load(); k != 0 && firstOKAfterKill.IsZero() && began.UnixNano() > k { // started after the kill
					firstOKAfterKill = time.Now()
				}
			} else if wctx.Err() == nil {
				lastFail = time.Now()
			}
			mu.Unlock()
			time.Sleep(5 * time.Millisecond)
		}
	}()
	time.Sleep(2 * time.Second)

	victim := servertest.Leader(ctx, t, ms)
	killAt := time.Now()
	killed.Store(killAt.UnixNano())
	victim.Kill()
	testutil.Eventually(t, 30*time.Second, "writes succeed again", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return !firstOKAfterKill.IsZero()
	})
	time.Sleep(2 * time.Second)
	stopWriting()
	<-writing
	mu.Lock()
	back := firstOKAfterKill.Sub(killAt)
	n := len(acked)
	mu.Unlock()
	t.Logf("leader %s killed: writes back after %v (last failure %v after the kill); %d registrations acknowledged",
		victim.Name, back.Round(time.Millisecond), lastFail.Sub(killAt).Round(time.Millisecond), n)

	// No acknowledged registration is lost.
	reader := newClient(t, testutil.APIs(ms, 2)...)
	snap, err := reader.Instances(ctx, "reg", client.All())
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	for _, in := range snap.Instances {
		have[in.ID] = true
	}
	for _, id := range acked {
		if !have[id] {
			t.Errorf("acknowledged registration %s is lost", id)
		}
	}
	want := ids(snap)
	// Every watcher converges on it, and the session's instance never left.
	for i, wt := range ws {
		testutil.Eventually(t, 30*time.Second, fmt.Sprintf("watcher %d converges", i), func() bool {
			s, ok := wt.w.Snapshot("reg")
			return ok && slices.Equal(ids(s), want)
		})
		if wt.keeperGone.Load() {
			t.Errorf("watcher %d saw the session's instance vanish", i)
		}
	}
	if expired.Load() {
		t.Error("the session expired (or had to be replaced) during the failover")
	}

	// The node comes back and serves the same registry.
	restart(t, victim)
	only := newClient(t, victim.API)
	testutil.Eventually(t, 30*time.Second, "the restarted node serves the same state", func() bool {
		s, err := only.Instances(ctx, "reg", client.All())
		return err == nil && slices.Equal(ids(s), want)
	})
}

func ids(s *registry.Snapshot) []string {
	var out []string
	for _, in := range s.Instances {
		out = append(out, in.ID)
	}
	return out
}

// HA behaviour 2: with two of three nodes dead there is no quorum: writes
// are refused with an error saying so, watchers keep what they hold;
// bringing one node back restores service.
func TestClusterWithoutQuorumRefusesWritesAndRecovers(t *testing.T) {
	ms := startCluster(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c := newClient(t, testutil.APIs(ms, 0)...)
	for i := range 5 {
		if _, err := c.Register(ctx, registry.Instance{Service: "reg", ID: fmt.Sprint("r-", i), Address: "127.0.0.1", Port: 9000 + i}); err != nil {
			t.Fatal(err)
		}
	}
	w := watch(ctx, t, c, "reg")
	waitInstances(ctx, t, w, "reg", "r-0", "r-1", "r-2", "r-3", "r-4")

	for _, m := range ms[1:] {
		m.Kill()
	}
	wctx, wcancel := context.WithTimeout(ctx, 30*time.Second) // the server's answer, not this deadline
	start := time.Now()
	_, err := c.Register(wctx, registry.Instance{Service: "reg", ID: "r-5", Address: "127.0.0.1", Port: 9005})
	wcancel()
	t.Logf("write without quorum: %v after %v", err, time.Since(start).Round(time.Millisecond))
	if err == nil {
		t.Fatal("a write succeeded without a quorum")
	}
	if !strings.Contains(err.Error(), "unavailable") && !strings.Contains(err.Error(), "quorum") && !strings.Contains(err.Error(), "leader") {
		t.Errorf("the error does not say the registry is unavailable: %v", err)
	}
	if s, ok := w.Snapshot("reg"); !ok || len(s.Instances) != 5 {
		t.Errorf("the watcher lost what it held: %v", s)
	}

	restart(t, ms[1])
	testutil.Eventually(t, 60*time.Second, "writes succeed with a quorum again", func() bool {
		cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
		_, err := c.Register(cctx, registry.Instance{Service: "reg", ID: "r-5", Address: "127.0.0.1", Port: 9005})
		return err == nil
	})
	waitInstances(ctx, t, w, "reg", "r-0", "r-1", "r-2", "r-3", "r-4", "r-5")
}

// metric reads one sample of a node's /metrics (0 while not recorded).
func metric(t *testing.T, nd *testutil.Node, sample string) float64 {
	v, _ := testutil.Metric(t, nd.API, sample)
	return v
}

// A client whose home server restarts leaves it (its watch stream and
// heartbeats go to the others) and comes back once the server is ready
// again: the watch stream resumes there without losing a change and the
// heartbeats follow, so a restarted node gets its clients back.
func TestClientsReturnHomeAfterARestart(t *testing.T) {
	ms := startCluster(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c, err := client.New(testutil.APIs(ms, 0), client.WithOrderedServers(), client.WithRebalanceInterval(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	home := ms[0]
	sess, err := c.NewSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close(context.Background())
	w := watch(ctx, t, c, "home")
	register := func(id string) {
		t.Helper()
		if _, err := sess.Register(ctx, registry.Instance{Service: "home", ID: id, Address: "127.0.0.1", Port: 9000}); err != nil {
			t.Fatal(err)
		}
	}
	register("before")
	if s := w.Status().Server; !strings.HasSuffix(s, home.API) {
		t.Fatalf("the watcher starts on %s, want its home %s", s, home.API)
	}
	home.Kill()
	testutil.Eventually(t, 60*time.Second, "the watcher to move off its dead home", func() bool {
		st := w.Status()
		return st.Connected && !strings.HasSuffix(st.Server, home.API)
	})
	register("during")
	restart(t, home)
	testutil.Eventually(t, 90*time.Second, "the watcher back on its home, and heartbeats there", func() bool {
		st := w.Status()
		return st.Connected && strings.HasSuffix(st.Server, home.API) &&
			metric(t, home, `beacon_watchers`) == 1 && metric(t, home, `beacon_session_keepalives_total{result="ok"}`) > 0
	})
	register("after")
	testutil.Eventually(t, 60*time.Second, "the watcher to hold all three instances", func() bool {
		s, ok := w.Snapshot("home")
		return ok && len(s.Instances) == 3
	})
}

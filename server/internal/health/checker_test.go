package health_test

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/servertest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m, testutil.LeakOptions()...) }

// A target that hangs: its check goes CRITICAL after its failures, and the
// probes never pile up at the target — one at a time, each cut at its
// timeout.
func TestHungTargetDoesNotPileUpProbes(t *testing.T) {
	srv := servertest.Start(t, servertest.Config(t, ""))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var inflight, peak, total atomic.Int64
	release := make(chan struct{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		total.Add(1)
		n := inflight.Add(1)
		defer inflight.Add(-1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		select { // hang until the probe gives up (or the test ends)
		case <-r.Context().Done():
		case <-release:
		}
	})}
	go hs.Serve(ln)
	defer hs.Close()
	defer close(release)
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	in := registry.Instance{Service: "slow", ID: "s-1", Address: "127.0.0.1", Port: port, Checks: []registry.Check{{
		Kind: registry.CheckHTTP, Interval: 200 * time.Millisecond, Timeout: 100 * time.Millisecond, FailuresBeforeCritical: 2}}}
	if _, err := c.Register(ctx, in); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "the hung target's check is CRITICAL", func() bool {
		snap, err := c.Instances(ctx, "slow", client.All())
		return err == nil && len(snap.Instances) == 1 && snap.Instances[0].Health == registry.HealthCritical
	})
	// Go on probing the hung target for a while, counted, not timed.
	seen := total.Load()
	testutil.Eventually(t, 30*time.Second, "5 more probes at the hung target", func() bool { return total.Load() >= seen+5 })
	if p := peak.Load(); p > 1 {
		t.Errorf("%d probes were at the hung target at once, want 1", p)
	}
	// Every request the target saw is a probe the scheduler ran, none a
	// retry or a leftover: read the target's count first, then the
	// server's, which counts a probe once its result is handled — at most
	// one, the running one, is not counted yet.
	hits := total.Load()
	fails, _ := testutil.Metric(t, srv.Addr(), `beacon_check_probes_total{kind="HTTP",result="fail"}`)
	passes, _ := testutil.Metric(t, srv.Addr(), `beacon_check_probes_total{kind="HTTP",result="pass"}`)
	probes := int64(fails + passes)
	t.Logf("%d requests at the hung target, %d probes run", hits, probes)
	if hits > probes+1 {
		t.Errorf("%d requests reached the hung target for %d probes run: they pile up", hits, probes)
	}
	snap, _ := c.Instances(ctx, "slow", client.All())
	if out := snap.Instances[0].Checks[0].Output; out == "" {
		t.Error("a critical check carries no output")
	} else {
		t.Logf("output: %s", out)
	}
}

// deregister_critical_after removes an instance that stays CRITICAL.
func TestDeregisterCriticalAfter(t *testing.T) {
	srv := servertest.Start(t, servertest.Config(t, ""))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	closed := testutil.FreeAddr(t) // nothing listens: connections are refused
	_, port, _ := net.SplitHostPort(closed)
	p, _ := net.LookupPort("tcp", port)
	in := registry.Instance{Service: "gone", ID: "g-1", Address: "127.0.0.1", Port: p, Checks: []registry.Check{{
		Kind: registry.CheckTCP, Interval: 100 * time.Millisecond, FailuresBeforeCritical: 1, DeregisterCriticalAfter: 500 * time.Millisecond}}}
	start := time.Now() // before Register: the check may go CRITICAL before it returns
	if _, err := c.Register(ctx, in); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "the instance critical too long is deregistered", func() bool {
		snap, err := c.Instances(ctx, "gone", client.All())
		return err == nil && len(snap.Instances) == 0
	})
	if d := time.Since(start); d < 500*time.Millisecond {
		t.Errorf("deregistered after %v, before deregister_critical_after", d)
	}
}

// Behaviour 3: 1,000 checked instances at a 1 s interval on one server:
// every check is owned once and runs, and a steady window writes nothing
// to etcd (only transitions are written, and there are none). The timing
// figures — probes per second, lateness — are BenchmarkChecks1000's.
func TestThousandChecksStayOnTime(t *testing.T) {
	if testing.Short() {
		t.Skip("1,000 checks for several seconds")
	}
	srv := servertest.Start(t, servertest.Config(t, ""))
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const n = 1000
	// A target per check, so that each check's probes are counted.
	accepted := make([]atomic.Int64, n)
	ports := make([]int, n)
	var accepting sync.WaitGroup
	defer accepting.Wait()
	for i := range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		ports[i] = ln.Addr().(*net.TCPAddr).Port
		accepting.Go(func() {
			for {
				conn, err := ln.Accept()
				if err != nil {
					return
				}
				accepted[i].Add(1)
				conn.Close()
			}
		})
	}
	probed := func() []int64 {
		out := make([]int64, n)
		for i := range accepted {
			out[i] = accepted[i].Load()
		}
		return out
	}
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	errs := make(chan error, n)
	sem := make(chan struct{}, 16)
	for i := range n {
		sem <- struct{}{}
		go func() {
			defer func() { <-sem }()
			// The longest timeout and the most failures allowed: a probe
			// cut because a loaded machine did not run it in time is no
			// transition (this test is about steady state, not detection).
			in := registry.Instance{Service: fmt.Sprintf("svc-%d", i%10), ID: fmt.Sprint("i-", i), Address: "127.0.0.1", Port: ports[i],
				Checks: []registry.Check{{Kind: registry.CheckTCP, Interval: time.Second, Timeout: time.Second, FailuresBeforeCritical: registry.MaxCheckThreshold}}}
			_, err := c.Register(ctx, in)
			errs <- err
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	owned := func() float64 {
		v, _ := testutil.Metric(t, srv.Addr(), "beacon_checks_owned")
		return v
	}
	testutil.Eventually(t, 30*time.Second, "all checks owned", func() bool { return owned() == n })
	// Every check runs: its target sees a probe.
	advanced := func(from []int64, by int64) func() bool {
		return func() bool {
			for i, v := range probed() {
				if v < from[i]+by {
					return false
				}
			}
			return true
		}
	}
	testutil.Eventually(t, 30*time.Second, "every check probing its target", advanced(make([]int64, n), 1))
	revision := func() int64 {
		resp, err := srv.EtcdClient().Get(ctx, "/beacon/revision-probe", clientv3.WithCountOnly())
		if err != nil {
			t.Fatal(err)
		}
		return resp.Header.Revision
	}
	// A steady window, measured in probes: every check runs three more
	// times (two intervals or more) and nothing is written.
	p0, rev0 := probed(), revision()
	testutil.Eventually(t, 60*time.Second, "every check probing three more times", advanced(p0, 3))
	p1, rev1 := probed(), revision()
	var probes int64
	for i := range p1 {
		probes += p1[i] - p0[i]
	}
	t.Logf("%d checks at 1 s: %d probes in the steady window, %d etcd writes", n, probes, rev1-rev0)
	if rev1 != rev0 {
		transitions, _ := testutil.Metric(t, srv.Addr(), `beacon_check_transitions_total{to="CRITICAL"}`)
		t.Errorf("%d etcd writes in a steady window, want 0 (transitions to CRITICAL so far: %v)", rev1-rev0, transitions)
	}
	if v := owned(); v != n {
		t.Errorf("beacon_checks_owned = %v after the window, want %d: a check is owned twice or lost", v, n)
	}
}

package health_test

import (
	"context"
	"fmt"
	"net"
	"net/http"
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
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
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
	testutil.Eventually(t, 10*time.Second, "the hung target's check is CRITICAL", func() bool {
		snap, err := c.Instances(ctx, "slow", client.All())
		return err == nil && len(snap.Instances) == 1 && snap.Instances[0].Health == registry.HealthCritical
	})
	time.Sleep(time.Second)
	if p := peak.Load(); p > 1 {
		t.Errorf("%d probes were at the hung target at once, want 1", p)
	}
	if n := total.Load(); n > 12 {
		t.Errorf("%d probes in ~1.5 s at a 200 ms interval: they pile up", n)
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
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
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
	if _, err := c.Register(ctx, in); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	testutil.Eventually(t, 10*time.Second, "the instance critical too long is deregistered", func() bool {
		snap, err := c.Instances(ctx, "gone", client.All())
		return err == nil && len(snap.Instances) == 0
	})
	if d := time.Since(start); d < 500*time.Millisecond {
		t.Errorf("deregistered after %v, before deregister_critical_after", d)
	}
}

// Behaviour 3: 1,000 checked instances at a 1 s interval on one server:
// probes run once per interval without drifting, the lateness
// distribution is reported, and a steady window writes nothing to etcd
// (only transitions are written, and there are none).
func TestThousandChecksStayOnTime(t *testing.T) {
	if testing.Short() {
		t.Skip("1,000 checks for several seconds")
	}
	srv := servertest.Start(t, servertest.Config(t, ""))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var accepted atomic.Int64
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			conn.Close()
		}
	}()
	defer ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const n = 1000
	errs := make(chan error, n)
	sem := make(chan struct{}, 16)
	for i := range n {
		sem <- struct{}{}
		go func() {
			defer func() { <-sem }()
			in := registry.Instance{Service: fmt.Sprintf("svc-%d", i%10), ID: fmt.Sprint("i-", i), Address: "127.0.0.1", Port: port,
				Checks: []registry.Check{{Kind: registry.CheckTCP, Interval: time.Second}}}
			_, err := c.Register(ctx, in)
			errs <- err
		}()
	}
	for range n {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	testutil.Eventually(t, 20*time.Second, "all checks owned", func() bool {
		v, _ := testutil.Metric(t, srv.Addr(), "beacon_checks_owned")
		return v == n
	})
	time.Sleep(1500 * time.Millisecond) // every check has had its first run
	bounds := []string{"0.0001", "0.0002", "0.0004", "0.0008", "0.0016", "0.0032", "0.0064", "0.0128", "0.0256", "0.0512", "0.1024", "0.2048", "0.4096", "0.8192", "1.6384", "3.2768", "+Inf"}
	buckets := func() []float64 {
		out := make([]float64, len(bounds))
		for i, le := range bounds {
			out[i], _ = testutil.Metric(t, srv.Addr(), `beacon_check_lateness_seconds_bucket{le="`+le+`"}`)
		}
		return out
	}
	revision := func() int64 {
		resp, err := srv.EtcdClient().Get(ctx, "/beacon/revision-probe", clientv3.WithCountOnly())
		if err != nil {
			t.Fatal(err)
		}
		return resp.Header.Revision
	}
	b0, rev0, acc0 := buckets(), revision(), accepted.Load()
	const window = 4 * time.Second
	time.Sleep(window)
	b1, rev1, acc1 := buckets(), revision(), accepted.Load()
	total := b1[len(b1)-1] - b0[len(b0)-1]
	quantile := func(q float64) string {
		for i := range bounds {
			if b1[i]-b0[i] >= q*total {
				return bounds[i]
			}
		}
		return "+Inf"
	}
	rate := float64(acc1-acc0) / window.Seconds()
	t.Logf("%d checks at 1 s: %.0f probes/s; lateness p50 ≤ %s s, p99 ≤ %s s, max ≤ %s s; etcd writes in %v: %d",
		n, rate, quantile(0.5), quantile(0.99), quantile(1), window, rev1-rev0)
	// Timing figures belong to BenchmarkChecks1000; under the test suite's
	// load (race detector, packages in parallel on two cores) only gross
	// drift fails: checks must still run about once per interval, and half
	// of the probes start within a quarter of it.
	if rate < 0.7*n || rate > 1.3*n {
		t.Errorf("%.0f probes/s, want about %d (once per interval each)", rate, n)
	}
	idx := func(le string) int {
		for i, b := range bounds {
			if b == le {
				return i
			}
		}
		return len(bounds)
	}
	if idx(quantile(0.5)) > idx("0.2048") {
		t.Errorf("median lateness above 200 ms at a 1 s interval: probes are not on time")
	}
	if rev1 != rev0 {
		t.Errorf("%d etcd writes in a steady window, want 0", rev1-rev0)
	}
}

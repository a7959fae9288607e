package bench

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
)

// latenessQuantile estimates a quantile of beacon_check_lateness_seconds
// from its cumulative buckets (the bucket's upper bound).
func latenessQuantile(b *testing.B, addr string, q float64, bounds []float64, before map[float64]float64) float64 {
	counts := latenessBuckets(b, addr, bounds)
	total := counts[bounds[len(bounds)-1]] - before[bounds[len(bounds)-1]]
	for _, le := range bounds {
		if counts[le]-before[le] >= q*total {
			return le
		}
	}
	return bounds[len(bounds)-1]
}

func latenessBuckets(b *testing.B, addr string, bounds []float64) map[float64]float64 {
	out := map[float64]float64{}
	for _, le := range bounds {
		name := fmt.Sprintf(`beacon_check_lateness_seconds_bucket{le="%g"}`, le)
		if le > 1e9 {
			name = `beacon_check_lateness_seconds_bucket{le="+Inf"}`
		}
		v, _ := testutil.Metric(b, addr, name)
		out[le] = v
	}
	return out
}

// BenchmarkChecks1000: one beacon server process runs 1,000 HTTP checks at
// a 1 s interval against a local target. Reported: how late probes start
// (from the server's histogram), etcd writes during the steady window
// (only transitions are written: there are none), and the server's CPU
// with the checks minus the same server idle, in the same run.
func BenchmarkChecks1000(b *testing.B) {
	const n, window = 1000, 10 * time.Second
	for range b.N {
		p := startServerProcess(b)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		time.Sleep(3 * time.Second)
		idle := p.cpuOver(b, 5*time.Second)

		var hits atomic.Int64
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		target := &http.Server{Handler: http.HandlerFunc(func(http.ResponseWriter, *http.Request) { hits.Add(1) })}
		go target.Serve(ln)
		port := ln.Addr().(*net.TCPAddr).Port
		c, err := client.New([]string{p.addr})
		if err != nil {
			b.Fatal(err)
		}
		for i := range n {
			in := registry.Instance{Service: fmt.Sprintf("svc-%d", i%20), ID: fmt.Sprint("i-", i), Address: "127.0.0.1", Port: port,
				Checks: []registry.Check{{Kind: registry.CheckHTTP, Target: fmt.Sprintf("http://127.0.0.1:%d/c/%d", port, i), Interval: time.Second}}}
			if _, err := c.Register(ctx, in); err != nil {
				b.Fatal(err)
			}
		}
		for p.metric(b, "beacon_checks_owned") < n {
			time.Sleep(100 * time.Millisecond)
		}
		time.Sleep(3 * time.Second) // every check has run at least once
		bounds := []float64{}
		for le := 0.0001; len(bounds) < 16; le *= 2 {
			bounds = append(bounds, le)
		}
		bounds = append(bounds, 1e18) // +Inf
		before := latenessBuckets(b, p.addr, bounds)
		etcd := etcdClient(b, p.etcdAddr)
		rev0 := revision(ctx, b, etcd)
		hits0 := hits.Load()
		busy := p.cpuOver(b, window)
		probes := float64(hits.Load()-hits0) / window.Seconds()
		writes := revision(ctx, b, etcd) - rev0
		p50 := latenessQuantile(b, p.addr, 0.50, bounds, before)
		p99 := latenessQuantile(b, p.addr, 0.99, bounds, before)
		max := latenessQuantile(b, p.addr, 1.0, bounds, before)
		b.ReportMetric(probes, "probes/s")
		b.ReportMetric(p50*1000, "lateness-p50-ms(≤)")
		b.ReportMetric(p99*1000, "lateness-p99-ms(≤)")
		b.ReportMetric(max*1000, "lateness-max-ms(≤)")
		b.ReportMetric(float64(writes), "etcd-writes-in-window")
		b.ReportMetric(idle*100, "idle-cpu-%")
		b.ReportMetric(busy*100, "with-checks-cpu-%")
		b.ReportMetric((busy-idle)*100/(probes/1000), "cpu-%-per-1000-checks/s")
		b.ReportMetric(0, "ns/op")
		c.Close()
		target.Close()
		cancel()
	}
}

func revision(ctx context.Context, b *testing.B, cli *clientv3.Client) int64 {
	resp, err := cli.Get(ctx, "/beacon/revision-probe", clientv3.WithCountOnly())
	if err != nil {
		b.Fatal(err)
	}
	return resp.Header.Revision
}

// BenchmarkCheckDetection: 100 times, a checked instance starts failing
// (its HTTP check answers 500) and recovers; the time until a watching
// client sees CRITICAL, and PASSING again, beside the configured interval
// × threshold (100 ms × 3 failures; × 2 successes).
func BenchmarkCheckDetection(b *testing.B) {
	const trials, interval, failures, successes = 100, 100 * time.Millisecond, 3, 2
	srv, _ := benchServer(b)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	var failing atomic.Bool
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	target := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		if failing.Load() {
			w.WriteHeader(http.StatusInternalServerError)
		}
	})}
	go target.Serve(ln)
	defer target.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	in := registry.Instance{Service: "web", ID: "w-1", Address: "127.0.0.1", Port: port,
		Checks: []registry.Check{{Kind: registry.CheckHTTP, Target: fmt.Sprintf("http://127.0.0.1:%d/", port),
			Interval: interval, FailuresBeforeCritical: failures, SuccessesBeforePassing: successes}}}
	if _, err := c.Register(ctx, in); err != nil {
		b.Fatal(err)
	}
	w, err := c.Watch(ctx, []string{"web"})
	if err != nil {
		b.Fatal(err)
	}
	defer w.Close()
	await := func(want registry.Health) {
		for {
			if s, ok := w.Snapshot("web"); ok && len(s.Instances) == 1 && s.Instances[0].Health == want {
				return
			}
			if _, err := w.Next(ctx); err != nil {
				b.Fatal(err)
			}
		}
	}
	await(registry.HealthPassing)
	var detect, recover []time.Duration
	b.ResetTimer()
	for range b.N {
		for range trials {
			time.Sleep(time.Duration(float64(interval) * (0.5 + float64(len(detect)%7)/7))) // vary the phase
			t0 := time.Now()
			failing.Store(true)
			await(registry.HealthCritical)
			detect = append(detect, time.Since(t0))
			t1 := time.Now()
			failing.Store(false)
			await(registry.HealthPassing)
			recover = append(recover, time.Since(t1))
		}
	}
	b.StopTimer()
	q := func(d []time.Duration, f float64) float64 {
		s := slices.Clone(d)
		slices.Sort(s)
		return float64(s[min(len(s)-1, int(f*float64(len(s))))]) / 1e6
	}
	b.ReportMetric(q(detect, 0.5), "detect-p50-ms")
	b.ReportMetric(q(detect, 0.99), "detect-p99-ms")
	b.ReportMetric(q(detect, 0.5)/float64((failures*interval).Milliseconds()), "detect-p50/(interval×failures)")
	b.ReportMetric(q(recover, 0.5), "recover-p50-ms")
	b.ReportMetric(q(recover, 0.99), "recover-p99-ms")
	b.ReportMetric(q(recover, 0.5)/float64((successes*interval).Milliseconds()), "recover-p50/(interval×successes)")
	b.ReportMetric(0, "ns/op")
}

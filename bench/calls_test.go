package bench

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"

	"beacon.dev/beacon/beacongrpc"
	"beacon.dev/beacon/beaconhttp"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/discovery"
	"beacon.dev/beacon/policy"
	"beacon.dev/beacon/registry"
)

type echoBackend struct {
	testpb.UnimplementedTestServiceServer
}

func (echoBackend) UnaryCall(_ context.Context, req *testpb.SimpleRequest) (*testpb.SimpleResponse, error) {
	return &testpb.SimpleResponse{Payload: req.GetPayload()}, nil
}

// backends starts n gRPC and n HTTP servers on 127.0.0.1 in this process.
func backends(b *testing.B, n int) (grpcAddrs, httpAddrs []string) {
	b.Helper()
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		s := grpc.NewServer()
		testpb.RegisterTestServiceServer(s, echoBackend{})
		go s.Serve(ln)
		b.Cleanup(s.Stop)
		grpcAddrs = append(grpcAddrs, ln.Addr().String())

		hln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.WriteString(w, "ok")
		})}
		go hs.Serve(hln)
		b.Cleanup(func() { hs.Close() })
		httpAddrs = append(httpAddrs, hln.Addr().String())
	}
	return grpcAddrs, httpAddrs
}

// register puts addrs in the registry as instances of service and returns
// a discovery cache that has them.
func register(ctx context.Context, b *testing.B, srvAddr string, service string, addrs []string) *discovery.Cache {
	b.Helper()
	c, err := client.New([]string{srvAddr})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	for i, a := range addrs {
		host, port, _ := net.SplitHostPort(a)
		p, _ := strconv.Atoi(port)
		if _, err := c.Register(ctx, registry.Instance{Service: service, ID: fmt.Sprintf("%s-%d", service, i), Address: host, Port: p}); err != nil {
			b.Fatal(err)
		}
	}
	cache, err := discovery.New(discovery.FromClient(c, ""), discovery.Config{}, service)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(cache.Close)
	for {
		if set, ok := cache.Endpoints(service); ok && len(set.Endpoints) == len(addrs) {
			return cache
		}
		select {
		case <-ctx.Done():
			b.Fatal("discovery never saw the backends")
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// callStats is one side's share of a run.
type callStats struct {
	calls   int
	elapsed time.Duration
	lat     []time.Duration
}

func (s *callStats) add(o callStats) {
	s.calls += o.calls
	s.elapsed += o.elapsed
	s.lat = append(s.lat, o.lat...)
}

func (s *callStats) perSecond() float64 { return float64(s.calls) / s.elapsed.Seconds() }

func (s *callStats) quantile(q float64) time.Duration {
	slices.Sort(s.lat)
	return s.lat[min(len(s.lat)-1, int(q*float64(len(s.lat))))]
}

// drive makes n calls from callers goroutines and times each.
func drive(b *testing.B, n, callers int, call func() error) callStats {
	var next atomic.Int64
	lats := make([][]time.Duration, callers)
	var wg sync.WaitGroup
	start := time.Now()
	for w := range callers {
		wg.Go(func() {
			for next.Add(1) <= int64(n) {
				t0 := time.Now()
				if err := call(); err != nil {
					b.Error(err)
					return
				}
				lats[w] = append(lats[w], time.Since(t0))
			}
		})
	}
	wg.Wait()
	st := callStats{calls: n, elapsed: time.Since(start)}
	for _, l := range lats {
		st.lat = append(st.lat, l...)
	}
	return st
}

// compare runs b.N calls on each side in alternating rounds (so that drift
// in the machine's speed hits both) and reports both sides and the ratios.
func compare(b *testing.B, callers int, beacon, anchor func() error, anchorName string) {
	const rounds = 4
	for range 200 { // warm connections and latency averages
		if err := beacon(); err != nil {
			b.Fatal(err)
		}
		if err := anchor(); err != nil {
			b.Fatal(err)
		}
	}
	var bs, as callStats
	b.ResetTimer()
	for r := range rounds {
		n := max(1, b.N/rounds)
		if r%2 == 0 {
			bs.add(drive(b, n, callers, beacon))
			as.add(drive(b, n, callers, anchor))
		} else {
			as.add(drive(b, n, callers, anchor))
			bs.add(drive(b, n, callers, beacon))
		}
	}
	b.StopTimer()
	b.ReportMetric(bs.perSecond(), "beacon-calls/s")
	b.ReportMetric(as.perSecond(), anchorName+"-calls/s")
	b.ReportMetric(bs.perSecond()/as.perSecond(), "throughput-ratio")
	b.ReportMetric(float64(bs.quantile(0.5))/1e3, "beacon-p50-µs")
	b.ReportMetric(float64(as.quantile(0.5))/1e3, anchorName+"-p50-µs")
	b.ReportMetric(float64(bs.quantile(0.5))/float64(as.quantile(0.5)), "p50-ratio")
	b.ReportMetric(float64(bs.quantile(0.99))/1e3, "beacon-p99-µs")
	b.ReportMetric(float64(as.quantile(0.99))/1e3, anchorName+"-p99-µs")
	b.ReportMetric(float64(bs.quantile(0.99))/float64(as.quantile(0.99)), "p99-ratio")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkGRPCUnary compares unary calls through the beacon resolver, the
// beacon_p2c policy and the policy interceptor (retries with a budget)
// with grpc-go's round_robin over a manual resolver, to the same three
// local backends, in the same run.
func BenchmarkGRPCUnary(b *testing.B) {
	srv, _ := benchServer(b)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	grpcAddrs, _ := backends(b, 3)
	cache := register(ctx, b, srv.Addr(), "echo", grpcAddrs)

	budget, _ := policy.NewBudget(policy.BudgetConfig{})
	exec, err := policy.New(policy.WithRetry(policy.RetryConfig{MaxAttempts: 3, BaseBackoff: 10 * time.Millisecond, MaxBackoff: 100 * time.Millisecond, RetryOn: beacongrpc.RetryableCode, Budget: budget}))
	if err != nil {
		b.Fatal(err)
	}
	bcc, err := beacongrpc.NewClient(cache, "echo", beacongrpc.WithPolicies(exec, func(string) bool { return true }))
	if err != nil {
		b.Fatal(err)
	}
	defer bcc.Close()

	mr := manual.NewBuilderWithScheme("static")
	var st resolver.State
	for _, a := range grpcAddrs {
		st.Endpoints = append(st.Endpoints, resolver.Endpoint{Addresses: []resolver.Address{{Addr: a}}})
	}
	mr.InitialState(st)
	acc, err := grpc.NewClient("static:///echo",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithResolvers(mr),
		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig": [{"round_robin": {}}]}`))
	if err != nil {
		b.Fatal(err)
	}
	defer acc.Close()

	req := &testpb.SimpleRequest{Payload: &testpb.Payload{Body: make([]byte, 64)}}
	caller := func(cc *grpc.ClientConn) func() error {
		tc := testpb.NewTestServiceClient(cc)
		return func() error {
			_, err := tc.UnaryCall(ctx, req)
			return err
		}
	}
	for _, callers := range []int{1, 16} {
		b.Run(fmt.Sprintf("callers=%d", callers), func(b *testing.B) {
			compare(b, callers, caller(bcc), caller(acc), "grpc-rr")
		})
	}
}

// BenchmarkHTTPCalls compares GET requests through the beacon RoundTripper
// (discovery, P2C, outlier accounting, retries with a budget) with a plain
// http.Transport (same pool settings) to one fixed backend, in the same
// run.
func BenchmarkHTTPCalls(b *testing.B) {
	srv, _ := benchServer(b)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	_, httpAddrs := backends(b, 3)
	cache := register(ctx, b, srv.Addr(), "web", httpAddrs)
	tr, err := beaconhttp.NewTransport(cache, beaconhttp.WithServices("web"))
	if err != nil {
		b.Fatal(err)
	}
	defer tr.Close()
	plain := beaconhttp.DefaultBase() // the same connection pool settings
	defer plain.CloseIdleConnections()
	get := func(rt http.RoundTripper, url string) func() error {
		hc := &http.Client{Transport: rt}
		return func() error {
			resp, err := hc.Get(url)
			if err != nil {
				return err
			}
			_, err = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			return err
		}
	}
	for _, callers := range []int{1, 16} {
		b.Run(fmt.Sprintf("callers=%d", callers), func(b *testing.B) {
			compare(b, callers, get(tr, "http://web/"), get(plain, "http://"+httpAddrs[0]+"/"), "http-transport")
		})
	}
}

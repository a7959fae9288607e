package bench

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server"
)

const edsType = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"

// BenchmarkXDSPropagation measures a registration reaching N = 100 xDS
// clients — each on its own connection and ADS stream, subscribed to the
// service's endpoints and ACKing every response, as a gRPC client's xDS
// layer does — beside the same N on beacon's own watch (the SDK), in the
// same run, on the same server. A change counts as applied by an xDS
// client when an endpoints response holding it arrives (grpc-go's own
// client would then still parse it and update its balancer). Run with
// -benchtime=Nx changes.
func BenchmarkXDSPropagation(b *testing.B) {
	const n = 100
	srv, _ := benchServerWith(b, func(c *server.Config) { c.XDS.Addr = "127.0.0.1:0" })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	beacon := propagationBeacon(ctx, b, func(int) []string { return []string{srv.Addr()} }, n, b.N)
	x := propagationXDS(ctx, b, srv, n, b.N)
	report := func(name string, l *latencies) {
		b.ReportMetric(ms(l.quantile(l.all, 0.5)), name+"-p50-ms")
		b.ReportMetric(ms(l.quantile(l.lastOfStart, 0.5)), name+"-from-start-last-of-N-p50-ms")
		b.ReportMetric(ms(l.quantile(l.lastOfStart, 0.99)), name+"-from-start-last-of-N-p99-ms")
		b.ReportMetric(float64(l.cpu.Microseconds())/float64(b.N*n), name+"-cpu-us-per-change-per-client")
	}
	report("watch", beacon)
	report("xds", x)
	b.ReportMetric(float64(x.quantile(x.lastOfStart, 0.99))/float64(beacon.quantile(beacon.lastOfStart, 0.99)), "xds/watch-last-of-N-p99")
	b.ReportMetric(0, "ns/op")
}

// propagationXDS registers `changes` instances of service "bench" (id
// i-K, port 20000+K: each change is told apart by its port) and waits for
// every one of n ADS clients to receive endpoints holding it.
func propagationXDS(ctx context.Context, b *testing.B, srv *server.Server, n, changes int) *latencies {
	type got struct {
		ports map[uint32]bool
		at    time.Time
	}
	seen := make([]chan got, n)
	var wg sync.WaitGroup
	sctx, scancel := context.WithCancel(ctx)
	defer func() { scancel(); wg.Wait() }()
	for i := range n {
		cc, err := grpc.NewClient(srv.XDSAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			b.Fatal(err)
		}
		defer cc.Close()
		st, err := discoveryv3.NewAggregatedDiscoveryServiceClient(cc).StreamAggregatedResources(sctx)
		if err != nil {
			b.Fatal(err)
		}
		node := &corev3.Node{Id: fmt.Sprintf("bench-%d", i)}
		if err := st.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: edsType, ResourceNames: []string{"bench"}}); err != nil {
			b.Fatal(err)
		}
		seen[i] = make(chan got, changes+warmUp+16)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				resp, err := st.Recv()
				if err != nil {
					return
				}
				now := time.Now()
				g := got{ports: map[uint32]bool{}, at: now}
				for _, r := range resp.GetResources() {
					var cla endpointv3.ClusterLoadAssignment
					if r.UnmarshalTo(&cla) == nil {
						for _, l := range cla.GetEndpoints() {
							for _, e := range l.GetLbEndpoints() {
								g.ports[e.GetEndpoint().GetAddress().GetSocketAddress().GetPortValue()] = true
							}
						}
					}
				}
				// ACK, as a client that applied it.
				if st.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: edsType, ResourceNames: []string{"bench"},
					VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()}) != nil {
					return
				}
				seen[i] <- g
			}
		}()
	}
	writer, err := client.New([]string{srv.Addr()})
	if err != nil {
		b.Fatal(err)
	}
	defer writer.Close()
	await := func(port uint32, start, t0 time.Time, l *latencies) {
		var worst, worstStart time.Duration
		for _, ch := range seen {
			for done := false; !done; {
				select {
				case g := <-ch:
					if g.ports[port] {
						d := max(g.at.Sub(t0), 0)
						l.all = append(l.all, d)
						worst, worstStart = max(worst, d), max(worstStart, g.at.Sub(start))
						done = true
					}
				case <-ctx.Done():
					b.Fatal("an xDS client never received the change")
				}
			}
		}
		l.lastOf = append(l.lastOf, worst)
		l.lastOfStart = append(l.lastOfStart, worstStart)
	}
	write := func(i int) uint32 {
		port := uint32(20000 + i)
		if _, err := writer.Register(ctx, registry.Instance{Service: "bench", ID: fmt.Sprintf("x-%d", i), Address: "127.0.0.1", Port: int(port)}); err != nil {
			b.Fatal(err)
		}
		return port
	}
	for i := range warmUp {
		start := time.Now()
		port := write(i)
		await(port, start, time.Now(), &latencies{})
	}
	l := &latencies{}
	cpu0 := processCPU()
	defer func() { l.cpu = processCPU() - cpu0 }()
	for i := range changes {
		start := time.Now()
		port := write(warmUp + i)
		await(port, start, time.Now(), l)
	}
	return l
}

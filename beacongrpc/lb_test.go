package beacongrpc_test

import (
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"beacon.dev/beacon/beacongrpc"
	"beacon.dev/beacon/internal/testutil"
)

// failingBackend serves health checks through an interceptor that counts
// calls and fails them with INTERNAL while fail is set.
type failingBackend struct {
	*backend
	hits atomic.Int64
	fail atomic.Bool
}

func startFailingBackend(t *testing.T) *failingBackend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fb := &failingBackend{}
	srv := grpc.NewServer(grpc.UnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		fb.hits.Add(1)
		if fb.fail.Load() {
			return nil, status.Error(codes.Internal, "broken")
		}
		return h(ctx, req)
	}))
	fb.backend = &backend{srv: srv, addr: ln.Addr().String(), port: ln.Addr().(*net.TCPAddr).Port}
	fb.health = beacongrpc.RegisterHealth(srv)
	fb.health.SetServing(true)
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	return fb
}

func policyConfig(name string) grpc.DialOption {
	return grpc.WithDefaultServiceConfig(`{"loadBalancingConfig": [{"` + name + `":{}}]}`)
}

func TestBeaconPoliciesSpreadCalls(t *testing.T) {
	for _, name := range []string{beacongrpc.PolicyP2C, beacongrpc.PolicyRoundRobin} {
		t.Run(name, func(t *testing.T) {
			e := newEnv(t)
			bs := []*backend{startBackend(t), startBackend(t), startBackend(t)}
			e.register(t, "hello", bs...)
			e.reachesAll(t, healthpb.NewHealthClient(e.dial(t, "beacon:///hello", policyConfig(name))), 3)
		})
	}
}

func TestBeaconPolicyEjectsAFailingInstance(t *testing.T) {
	e := newEnv(t)
	bad, good1, good2 := startFailingBackend(t), startFailingBackend(t), startFailingBackend(t)
	bad.fail.Store(true)
	e.register(t, "hello", bad.backend, good1.backend, good2.backend)
	hc := healthpb.NewHealthClient(e.dial(t, "beacon:///hello", policyConfig(beacongrpc.PolicyRoundRobin)))
	call := func() error {
		ctx, cancel := context.WithTimeout(e.ctx, 5*time.Second)
		defer cancel()
		_, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
		return err
	}
	// Warm up until the bad instance has failed its 5 calls in a row.
	testutil.Eventually(t, 20*time.Second, "the failing instance is called 5 times", func() bool {
		_ = call()
		return bad.hits.Load() >= 5
	})
	before := bad.hits.Load()
	for i := range 100 {
		if err := call(); err != nil {
			t.Fatalf("call %d after ejection: %v", i, err)
		}
	}
	if got := bad.hits.Load() - before; got != 0 {
		t.Errorf("the ejected instance got %d of 100 calls, want 0", got)
	}
}

package beacongrpc_test

import (
	"context"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"beacon.dev/beacon/beacongrpc"
	"beacon.dev/beacon/internal/testutil"
)

// failingBackend serves health checks through an interceptor that counts
// calls and fails them with INTERNAL while fail is set.
type failingBackend struct {
	*backend
	hits  atomic.Int64
	fail  atomic.Bool
	delay atomic.Int64 // per call, in ns
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
		if d := time.Duration(fb.delay.Load()); d > 0 {
			select {
			case <-time.After(d):
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
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
		ctx, cancel := context.WithTimeout(e.ctx, 30*time.Second) // generous: a slow call is not a failed one
		defer cancel()
		_, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
		return err
	}
	// Warm up until the bad instance has failed its 5 calls in a row.
	testutil.Eventually(t, 60*time.Second, "the failing instance is called 5 times", func() bool {
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

func TestPolicyConfigFromServiceConfig(t *testing.T) {
	e := newEnv(t)
	bad, good := startFailingBackend(t), startFailingBackend(t)
	bad.fail.Store(true)
	e.register(t, "hello", bad.backend, good.backend)
	// Two failures in a row eject (the default is 5), for 1 minute.
	cfg := `{"loadBalancingConfig": [{"beacon_round_robin": {"outlier": {"consecutiveFailures": 2, "baseEjection": "1m"}}}]}`
	cc := e.dial(t, "beacon:///hello", grpc.WithDefaultServiceConfig(cfg))
	hc := healthpb.NewHealthClient(cc)
	// Until the good instance is READY the bad one is all there is, and a
	// balancer with every endpoint ejected routes to them all anyway.
	cc.Connect()
	testutil.Eventually(t, 30*time.Second, "both instances are READY", func() bool {
		return beacongrpc.Outliers()["hello"].Ready == 2
	})
	failures := 0
	for range 40 {
		ctx, cancel := context.WithTimeout(e.ctx, 30*time.Second) // a slow call must not count as a failure
		if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true)); err != nil {
			failures++
		}
		cancel()
	}
	if failures != 2 || bad.hits.Load() != 2 {
		t.Errorf("with consecutiveFailures 2: %d failed calls, %d reached the bad instance; want 2 and 2", failures, bad.hits.Load())
	}
	st := beacongrpc.Outliers()["hello"]
	if st.Ejected != 1 || st.Ejections != 1 {
		t.Errorf("Outliers()[hello] = %+v, want 1 ejected", st)
	}
}

func TestPolicyConfigRejectsBadFields(t *testing.T) {
	for cfg, field := range map[string]string{
		`{"outlier": {"baseEjection": "soon"}}`: "outlier.baseEjection",
		`{"outlier": {"failureRate": 3}}`:       "rate",
		`{"slowStart": "-1s"}`:                  "slowStart",
		`{"zone": 7}`:                           "zone",
	} {
		sc := `{"loadBalancingConfig": [{"beacon_p2c": ` + cfg + `}]}`
		_, err := grpc.NewClient("passthrough:///x", grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithDefaultServiceConfig(sc))
		if err == nil || !strings.Contains(err.Error(), field) {
			t.Errorf("config %s: err = %v, want one naming %s", cfg, err, field)
		}
	}
}

package beacongrpc_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"beacon.dev/beacon/beacongrpc"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/discovery"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/policy"
	"beacon.dev/beacon/registry"
)

// backend is a real gRPC server on 127.0.0.1 serving grpc.health.v1,
// which stands for the application's service here.
type backend struct {
	srv    *grpc.Server
	health *beacongrpc.Health
	addr   string
	port   int
}

func startBackend(t testing.TB) *backend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &backend{srv: grpc.NewServer(), addr: ln.Addr().String(), port: ln.Addr().(*net.TCPAddr).Port}
	b.health = beacongrpc.RegisterHealth(b.srv)
	b.health.SetServing(true)
	go b.srv.Serve(ln)
	t.Cleanup(b.srv.Stop)
	return b
}

type env struct {
	ctx   context.Context
	c     *client.Client
	cache *discovery.Cache
}

func newEnv(t testing.TB) *env {
	t.Helper()
	// The whole test's liveness bound: generous enough for every per-call
	// deadline below to be the one that speaks.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	srv := testutil.StartBeacon(t)
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	cache, err := discovery.New(discovery.FromClient(c, ""), discovery.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cache.Close)
	return &env{ctx: ctx, c: c, cache: cache}
}

func (e *env) register(t testing.TB, service string, bs ...*backend) {
	t.Helper()
	for i, b := range bs {
		if _, err := e.c.Register(e.ctx, registry.Instance{Service: service, ID: fmt.Sprintf("%s-%d", service, i), Address: "127.0.0.1", Port: b.port}); err != nil {
			t.Fatal(err)
		}
	}
}

func (e *env) dial(t testing.TB, target string, opts ...grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	opts = append([]grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithResolvers(beacongrpc.NewResolverBuilder(e.cache, "default")),
		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig": [{"round_robin":{}}]}`),
	}, opts...)
	cc, err := grpc.NewClient(target, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

func TestResolverSpreadsCallsOverInstances(t *testing.T) {
	e := newEnv(t)
	bs := []*backend{startBackend(t), startBackend(t), startBackend(t)}
	e.register(t, "hello", bs...)
	e.reachesAll(t, healthpb.NewHealthClient(e.dial(t, "beacon:///hello")), 3)
}

// reachesAll calls until n distinct instances have answered. Each call
// must succeed; the per-call deadline is only a generous liveness bound.
func (e *env) reachesAll(t *testing.T, hc healthpb.HealthClient, n int) {
	t.Helper()
	seen := map[string]int{}
	testutil.Eventually(t, 60*time.Second, fmt.Sprintf("calls reach all %d instances", n), func() bool {
		var p peer.Peer
		ctx, cancel := context.WithTimeout(e.ctx, 30*time.Second)
		defer cancel()
		if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.Peer(&p), grpc.WaitForReady(true)); err != nil {
			t.Fatalf("Check: %v", err)
		}
		seen[p.Addr.String()]++
		return len(seen) == n
	})
}

func TestResolverReportsAnEmptyService(t *testing.T) {
	e := newEnv(t)
	b := startBackend(t)
	e.register(t, "lonely", b)
	if _, err := e.c.Deregister(e.ctx, "lonely", "lonely-0"); err != nil {
		t.Fatal(err)
	}
	cc := e.dial(t, "beacon:///lonely")
	hc := healthpb.NewHealthClient(cc)
	testutil.Eventually(t, 90*time.Second, "RPCs fail with the resolver's reason", func() bool {
		ctx, cancel := context.WithTimeout(e.ctx, 30*time.Second)
		defer cancel()
		_, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
		return status.Code(err) == codes.Unavailable && strings.Contains(err.Error(), "no routable instances")
	})
}

func TestTargetInAnotherNamespaceIsRefused(t *testing.T) {
	e := newEnv(t)
	cc, err := grpc.NewClient("beacon://other/hello", grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithResolvers(beacongrpc.NewResolverBuilder(e.cache, "default")))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	// Without WaitForReady the call fails as soon as the resolver reports
	// its error; the deadline is only a liveness bound.
	ctx, cancel := context.WithTimeout(e.ctx, 30*time.Second)
	defer cancel()
	_, err = healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{})
	if err == nil || !strings.Contains(err.Error(), `namespace "other"`) {
		t.Errorf("Check via beacon://other/ = %v, want the namespace mismatch", err)
	}
}

func TestKilledInstanceUnderRetriesFailsNoCall(t *testing.T) {
	e := newEnv(t)
	bs := []*backend{startBackend(t), startBackend(t), startBackend(t)}
	e.register(t, "hello", bs...)
	// gRPC notices a dead connection asynchronously: leave room for a few
	// attempts while its picker catches up.
	exec, err := policy.New(policy.WithRetry(policy.RetryConfig{MaxAttempts: 5, BaseBackoff: 5 * time.Millisecond, RetryOn: beacongrpc.RetryableCode}))
	if err != nil {
		t.Fatal(err)
	}
	cc := e.dial(t, "beacon:///hello", grpc.WithUnaryInterceptor(beacongrpc.UnaryClientInterceptor(exec, func(string) bool { return true })))
	hc := healthpb.NewHealthClient(cc)
	e.callsSucceed(t, hc, 30, "before the kill")
	bs[0].srv.Stop() // dies; still registered
	e.callsSucceed(t, hc, 300, "after the kill")
}

// callsSucceed makes n calls, each of which must succeed (the per-call
// deadline is a generous liveness bound, not a latency target).
func (e *env) callsSucceed(t *testing.T, hc healthpb.HealthClient, n int, when string) {
	t.Helper()
	for i := range n {
		ctx, cancel := context.WithTimeout(e.ctx, 30*time.Second)
		_, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
		cancel()
		if err != nil {
			t.Fatalf("call %d %s: %v", i, when, err)
		}
	}
}

func TestHealthAndBoundedGracefulStop(t *testing.T) {
	e := newEnv(t)
	b := startBackend(t)
	cc, err := grpc.NewClient(b.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	hc := healthpb.NewHealthClient(cc)
	check := func() healthpb.HealthCheckResponse_ServingStatus {
		resp, err := hc.Check(e.ctx, &healthpb.HealthCheckRequest{})
		if err != nil {
			t.Fatal(err)
		}
		return resp.Status
	}
	if got := check(); got != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("Check = %v, want SERVING", got)
	}
	b.health.SetServing(false)
	if got := check(); got != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("Check = %v, want NOT_SERVING", got)
	}
	// An open Watch stream would hold a plain GracefulStop forever.
	wctx, wcancel := context.WithCancel(e.ctx)
	defer wcancel()
	w, err := hc.Watch(wctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Recv(); err != nil {
		t.Fatal(err)
	}
	// A plain GracefulStop would never return here: that GracefulStop
	// returns at all (the generous select is liveness, not latency) and
	// reports the forced stop is the property.
	stopped := make(chan bool, 1)
	go func() { stopped <- beacongrpc.GracefulStop(b.srv, b.health, 500*time.Millisecond) }()
	select {
	case finished := <-stopped:
		if finished {
			t.Error("GracefulStop reported a clean finish with a Watch stream still open")
		}
	case <-time.After(60 * time.Second):
		t.Fatal("GracefulStop never returned with a Watch open, want it bounded by its grace")
	}
}

func TestClassification(t *testing.T) {
	for _, tc := range []struct {
		err              error
		retry, isFailure bool
	}{
		{status.Error(codes.Unavailable, "x"), true, true},
		{status.Error(codes.DeadlineExceeded, "x"), false, true},
		{status.Error(codes.InvalidArgument, "x"), false, false},
		{status.Error(codes.NotFound, "x"), false, false},
		{status.Error(codes.Internal, "x"), false, true},
		{context.Canceled, false, false},
		{policy.ErrOpen, false, false},
	} {
		if got := beacongrpc.RetryableCode(tc.err); got != tc.retry {
			t.Errorf("RetryableCode(%v) = %v, want %v", tc.err, got, tc.retry)
		}
		if got := beacongrpc.IsFailure(tc.err); got != tc.isFailure {
			t.Errorf("IsFailure(%v) = %v, want %v", tc.err, got, tc.isFailure)
		}
	}
	for _, tc := range []struct {
		err  error
		want codes.Code
	}{
		{policy.ErrOpen, codes.Unavailable},
		{policy.ErrBulkheadFull, codes.Unavailable},
		{policy.ErrRateLimited, codes.ResourceExhausted},
		{&policy.RetryError{Attempts: 3, Reason: "max attempts", Last: status.Error(codes.Unavailable, "down")}, codes.Unavailable},
		{errors.New("plain"), codes.Unknown},
	} {
		if got := beacongrpc.StatusOf(tc.err).Code(); got != tc.want {
			t.Errorf("StatusOf(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

func TestHedgingCutsTheSlowInstancesTail(t *testing.T) {
	e := newEnv(t)
	slow, fast1, fast2 := startFailingBackend(t), startFailingBackend(t), startFailingBackend(t)
	// The slow instance never answers: its calls hang until they are
	// cancelled (a hedge won, or the server stops when the test ends). A
	// call that reaches it succeeds only through a hedge.
	slow.delay.Store(int64(time.Hour))
	e.register(t, "hello", slow.backend, fast1.backend, fast2.backend)
	exec, err := policy.New(policy.WithRetry(policy.RetryConfig{MaxAttempts: 2, BaseBackoff: 5 * time.Millisecond, RetryOn: beacongrpc.RetryableCode}))
	if err != nil {
		t.Fatal(err)
	}
	hedger, err := policy.NewHedger(policy.HedgeConfig{Delay: 50 * time.Millisecond, RetryOn: beacongrpc.RetryableCode})
	if err != nil {
		t.Fatal(err)
	}
	// Round robin: the slow instance gets every third first attempt, so
	// only hedging keeps those calls fast. Outlier detection off: the
	// warm-up's timed-out calls and the hedges the slow instance loses
	// would eject it, and then no call would reach it (seen in CI).
	cc := e.dial(t, "beacon:///hello",
		grpc.WithUnaryInterceptor(beacongrpc.UnaryClientInterceptor(exec, func(string) bool { return true }, beacongrpc.WithHedging(hedger))),
		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig": [{"`+beacongrpc.PolicyRoundRobin+`":{"outlier":{"consecutiveFailures":-1,"failureRate":-1}}}]}`))
	hc := healthpb.NewHealthClient(cc)
	// Connected to both fast instances. Not with reachesAll: while only
	// the slow instance's connection is ready, round robin sends a call
	// and its hedge both there and the call hangs until its deadline —
	// so a warm-up call may fail, and is tried again.
	seen := map[string]bool{}
	testutil.Eventually(t, 2*time.Minute, "calls reach both fast instances", func() bool {
		var p peer.Peer
		ctx, cancel := context.WithTimeout(e.ctx, 2*time.Second)
		defer cancel()
		if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.Peer(&p), grpc.WaitForReady(true)); err == nil {
			seen[p.Addr.String()] = true
		}
		return len(seen) == 2
	})
	before := slow.hits.Load()
	for i := range 30 {
		// The deadline is generous liveness only: without the hedge a call
		// sent to the slow instance would hang until it and fail.
		ctx, cancel := context.WithTimeout(e.ctx, 30*time.Second)
		resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
		cancel()
		if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("call %d: %v, %v", i, resp, err)
		}
	}
	// Every call succeeded although some went to an instance that never
	// answers: the hedges answered them.
	if slow.hits.Load() == before {
		t.Fatal("no call reached the slow instance: the test proves nothing")
	}
}

func TestStreamInterceptorOpensThroughThePolicies(t *testing.T) {
	e := newEnv(t)
	bs := []*backend{startBackend(t), startBackend(t)}
	e.register(t, "hello", bs...)
	breaker, err := policy.NewBreaker(policy.BreakerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	exec, err := policy.New(policy.WithTimeout(100*time.Millisecond), policy.WithBreaker(breaker),
		policy.WithRetry(policy.RetryConfig{MaxAttempts: 3, BaseBackoff: time.Millisecond, RetryOn: beacongrpc.RetryableCode}))
	if err != nil {
		t.Fatal(err)
	}
	cc := e.dial(t, "beacon:///hello", grpc.WithStreamInterceptor(beacongrpc.StreamClientInterceptor(exec)))
	hc := healthpb.NewHealthClient(cc)
	ctx, cancel := context.WithCancel(e.ctx)
	defer cancel()
	w, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
	if err != nil {
		t.Fatal(err)
	}
	if m, err := w.Recv(); err != nil || m.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("first Watch message: %v, %v", m, err)
	}
	// The executor's 100 ms timeout does not cut an open stream.
	time.Sleep(200 * time.Millisecond)
	bs[0].health.SetServing(false)
	bs[1].health.SetServing(false)
	if m, err := w.Recv(); err != nil || m.Status != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("Watch after 200 ms: %v, %v; want the stream alive", m, err)
	}
	cancel()

	// An open breaker refuses to open streams.
	for range 200 {
		p, err := breaker.Allow()
		if err != nil {
			break
		}
		breaker.Done(p, errors.New("failure"))
	}
	if _, err := hc.Watch(e.ctx, &healthpb.HealthCheckRequest{}); !errors.Is(err, policy.ErrOpen) {
		t.Fatalf("Watch with the breaker open: %v, want ErrOpen", err)
	}
}

func TestNewClientWiresResolverPolicyAndInterceptors(t *testing.T) {
	e := newEnv(t)
	bs := []*backend{startBackend(t), startBackend(t), startBackend(t)}
	e.register(t, "hello", bs...)
	exec, err := policy.New(policy.WithRetry(policy.RetryConfig{MaxAttempts: 5, BaseBackoff: 5 * time.Millisecond, RetryOn: beacongrpc.RetryableCode}))
	if err != nil {
		t.Fatal(err)
	}
	cc, err := beacongrpc.NewClient(e.cache, "hello", beacongrpc.WithPolicies(exec, func(string) bool { return true }))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	hc := healthpb.NewHealthClient(cc)
	e.reachesAll(t, hc, 3)
	bs[0].srv.Stop() // retried by the interceptor: no call fails
	e.callsSucceed(t, hc, 100, "after a backend stopped")
}

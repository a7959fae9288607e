package beacongrpc_test

import (
	"strings"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"beacon.dev/beacon/beacongrpc"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/discovery"
	"beacon.dev/beacon/policy"
)

// ExampleNewClient is docs/sdk.md's grpc-go section, compiled (not run:
// it needs a beacon server).
func ExampleNewClient() {
	c, err := client.New([]string{"127.0.0.1:8970"})
	if err != nil {
		panic(err)
	}
	defer c.Close()
	cache, err := discovery.New(discovery.FromClient(c, ""), discovery.Config{})
	if err != nil {
		panic(err)
	}
	defer cache.Close()
	budget, _ := policy.NewBudget(policy.DefaultBudget)
	exec, _ := policy.New(policy.WithRetry(policy.RetryConfig{Budget: budget}))
	idempotent := func(method string) bool { return strings.HasSuffix(method, "/Get") }
	cc, err := shortWay(cache, exec, idempotent, insecure.NewCredentials())
	if err != nil {
		panic(err)
	}
	defer cc.Close()
	if err := spelledOut(cache, budget); err != nil {
		panic(err)
	}
	opts, err := hedging(exec, idempotent, budget)
	if err != nil {
		panic(err)
	}
	_ = append(opts, serviceConfig())
}

func shortWay(cache *discovery.Cache, exec *policy.Executor, idempotent func(string) bool, creds credentials.TransportCredentials) (*grpc.ClientConn, error) {
	cc, err := beacongrpc.NewClient(cache, "orders", beacongrpc.WithPolicies(exec, idempotent),
		beacongrpc.WithDialOptions(grpc.WithTransportCredentials(creds)))
	return cc, err
}

func spelledOut(cache *discovery.Cache, budget *policy.Budget) error {
	exec, err := policy.New(policy.WithRetry(policy.RetryConfig{Budget: budget})) // UNAVAILABLE is retried by the interceptor's rule
	if err != nil {
		return err
	}
	cc, err := grpc.NewClient("beacon:///orders",
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithResolvers(beacongrpc.NewResolverBuilder(cache, "default")),
		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig": [{"beacon_p2c":{}}]}`), // P2C + outlier ejection
		grpc.WithUnaryInterceptor(beacongrpc.UnaryClientInterceptor(exec, func(method string) bool {
			return strings.HasPrefix(method, "/orders.v1.Orders/Get") // safe to retry
		})),
	)
	if err != nil {
		return err
	}
	defer cc.Close()

	// Every error the interceptors return is a gRPC status: status.Code(err)
	// is UNAVAILABLE for an open breaker or a full bulkhead, RESOURCE_EXHAUSTED
	// when rate limited, the server's code otherwise — and errors.Is(err,
	// policy.ErrOpen) still tells them apart.

	// Server side.
	s := grpc.NewServer()
	health := beacongrpc.RegisterHealth(s) // NOT_SERVING
	// ... register services, then s.Serve(lis) in a goroutine ...
	health.SetServing(true)
	// on SIGTERM:
	beacongrpc.GracefulStop(s, health, 10*time.Second)
	return nil
}

func serviceConfig() grpc.DialOption {
	opt := grpc.WithDefaultServiceConfig(`{"loadBalancingConfig": [{"beacon_p2c": {
		"zone": "eu-1", "slowStart": "30s", "panicThreshold": 0.5,
		"outlier": {"consecutiveFailures": 3, "baseEjection": "5s", "maxEjection": "1m"}}}]}`)
	return opt
}

func hedging(exec *policy.Executor, idempotent func(string) bool, budget *policy.Budget) ([]grpc.DialOption, error) {
	hedger, err := policy.NewHedger(policy.HedgeConfig{Delay: 20 * time.Millisecond, Budget: budget, RetryOn: beacongrpc.RetryableCode})
	if err != nil {
		return nil, err
	}
	opts := []grpc.DialOption{
		grpc.WithUnaryInterceptor(beacongrpc.UnaryClientInterceptor(exec, idempotent, beacongrpc.WithHedging(hedger))),
		grpc.WithStreamInterceptor(beacongrpc.StreamClientInterceptor(exec)),
	}
	return opts, nil
}

// ExampleWithTracing is docs/sdk.md's tracing snippet, compiled (not
// run): beacon's call and attempt spans, with otelgrpc's RPC spans under
// them and W3C trace context to the server.
func ExampleWithTracing() {
	exporter := tracetest.NewInMemoryExporter() // any SpanExporter: OTLP, stdout, …
	exec, err := policy.New(policy.WithRetry(policy.RetryConfig{MaxAttempts: 3, RetryOn: beacongrpc.RetryableCode}))
	if err != nil {
		panic(err)
	}
	idempotent := func(method string) bool { return strings.HasSuffix(method, "/Get") }
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exporter)) // the application's
	opts := []grpc.DialOption{
		grpc.WithStatsHandler(otelgrpc.NewClientHandler(otelgrpc.WithTracerProvider(tp))),
		grpc.WithUnaryInterceptor(beacongrpc.UnaryClientInterceptor(exec, idempotent, beacongrpc.WithTracing(tp))),
	}
	_ = opts // with grpc.NewClient("beacon:///orders", opts...) as in ExampleNewClient
}

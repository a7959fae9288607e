package beacongrpc_test

import (
	"context"
	"testing"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"beacon.dev/beacon/beacongrpc"
	"beacon.dev/beacon/policy"
)

// BenchmarkTracingCost: a unary call over loopback through the beacon
// interceptor and balancer, with tracing off, with beacon's spans, with
// otelgrpc's stats handler alone (its client span), and with both; spans
// go to an exporter that keeps nothing (recorded and ended, not stored).
func BenchmarkTracingCost(b *testing.B) {
	e := newEnv(b)
	e.register(b, "hello", startBackend(b))
	exec, err := policy.New(policy.WithRetry(policy.RetryConfig{MaxAttempts: 2, RetryOn: beacongrpc.RetryableCode}))
	if err != nil {
		b.Fatal(err)
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(sdktrace.NewSimpleSpanProcessor(discard{})))
	b.Cleanup(func() { tp.Shutdown(context.Background()) })
	for _, v := range []struct {
		name         string
		beacon, otel bool
	}{{"off", false, false}, {"beacon", true, false}, {"otelgrpc", false, true}, {"both", true, true}} {
		b.Run(v.name, func(b *testing.B) {
			var iopts []beacongrpc.InterceptorOption
			if v.beacon {
				iopts = append(iopts, beacongrpc.WithTracing(tp))
			}
			opts := []grpc.DialOption{policyConfig(beacongrpc.PolicyP2C),
				grpc.WithUnaryInterceptor(beacongrpc.UnaryClientInterceptor(exec, func(string) bool { return true }, iopts...))}
			if v.otel {
				opts = append(opts, grpc.WithStatsHandler(otelgrpc.NewClientHandler(otelgrpc.WithTracerProvider(tp))))
			}
			cc := e.dial(b, "beacon:///hello", opts...)
			hc := healthpb.NewHealthClient(cc)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true)); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// discard ends spans without keeping them.
type discard struct{}

func (discard) ExportSpans(context.Context, []sdktrace.ReadOnlySpan) error { return nil }
func (discard) Shutdown(context.Context) error                             { return nil }

package beacongrpc_test

import (
	"context"
	"testing"
	"time"

	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"beacon.dev/beacon/beacongrpc"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/policy"
	"beacon.dev/beacon/tracing"
)

// beacon's spans reach an OTLP/gRPC receiver through OpenTelemetry's
// OTLP exporter — the protocol a collector speaks — with their attributes.
func TestTracingExportsOverOTLP(t *testing.T) {
	rcv := testutil.NewOTLPReceiver(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	exp, err := otlptracegrpc.New(ctx, otlptracegrpc.WithEndpoint(rcv.Addr), otlptracegrpc.WithInsecure())
	if err != nil {
		t.Fatal(err)
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp))
	t.Cleanup(func() { tp.Shutdown(context.Background()) })

	e := newEnv(t)
	e.register(t, "hello", startBackend(t))
	exec, err := policy.New(policy.WithRetry(policy.RetryConfig{MaxAttempts: 2, RetryOn: beacongrpc.RetryableCode}))
	if err != nil {
		t.Fatal(err)
	}
	cc := e.dial(t, "beacon:///hello", policyConfig(beacongrpc.PolicyP2C),
		grpc.WithUnaryInterceptor(beacongrpc.UnaryClientInterceptor(exec, func(string) bool { return true }, beacongrpc.WithTracing(tp))))
	if _, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true)); err != nil {
		t.Fatal(err)
	}
	if err := tp.ForceFlush(ctx); err != nil {
		t.Fatalf("ForceFlush over OTLP: %v", err)
	}
	named := func(name string) []*tracepb.Span {
		var out []*tracepb.Span
		for _, s := range rcv.Spans() {
			if s.GetName() == name {
				out = append(out, s.Span)
			}
		}
		return out
	}
	testutil.Eventually(t, 30*time.Second, "the spans at the receiver", func() bool {
		return len(named(tracing.SpanCall)) == 1 && len(named(tracing.SpanAttempt)) == 1
	})
	call, att := named(tracing.SpanCall)[0], named(tracing.SpanAttempt)[0]
	if string(att.GetParentSpanId()) != string(call.GetSpanId()) || string(att.GetTraceId()) != string(call.GetTraceId()) {
		t.Errorf("the attempt is not the call's child at the receiver")
	}
	if got := testutil.Attr(att, string(tracing.AttrEndpointID)); got != "hello-0" {
		t.Errorf("beacon.endpoint.id at the receiver = %q, want hello-0", got)
	}
	if got := testutil.Attr(att, string(tracing.AttrBalancer)); got != "p2c_ewma" {
		t.Errorf("beacon.balancer at the receiver = %q, want p2c_ewma", got)
	}
	if got := testutil.Attr(call, "rpc.method"); got != "/grpc.health.v1.Health/Check" {
		t.Errorf("rpc.method at the receiver = %q", got)
	}
}

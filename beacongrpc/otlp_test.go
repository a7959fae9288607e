package beacongrpc_test

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"beacon.dev/beacon/beacongrpc"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/policy"
	"beacon.dev/beacon/tracing"
)

// receiver is an OTLP/gRPC trace receiver: what a collector listens
// with, here in the test, keeping the spans it is sent.
type receiver struct {
	collectortrace.UnimplementedTraceServiceServer
	mu    sync.Mutex
	spans []*tracepb.Span // guarded by mu
}

func (r *receiver) Export(_ context.Context, req *collectortrace.ExportTraceServiceRequest) (*collectortrace.ExportTraceServiceResponse, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, rs := range req.GetResourceSpans() {
		for _, ss := range rs.GetScopeSpans() {
			r.spans = append(r.spans, ss.GetSpans()...)
		}
	}
	return &collectortrace.ExportTraceServiceResponse{}, nil
}

func (r *receiver) named(name string) []*tracepb.Span {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []*tracepb.Span
	for _, s := range r.spans {
		if s.GetName() == name {
			out = append(out, s)
		}
	}
	return out
}

func otlpAttr(s *tracepb.Span, key string) string {
	for _, a := range s.GetAttributes() {
		if a.GetKey() == key {
			if v := a.GetValue().GetStringValue(); v != "" {
				return v
			}
			return a.GetValue().String()
		}
	}
	return ""
}

// beacon's spans reach an OTLP/gRPC receiver through OpenTelemetry's
// OTLP exporter — the protocol a collector speaks — with their attributes.
func TestTracingExportsOverOTLP(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rcv := &receiver{}
	gs := grpc.NewServer()
	collectortrace.RegisterTraceServiceServer(gs, rcv)
	go gs.Serve(ln)
	t.Cleanup(gs.Stop)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	exp, err := otlptracegrpc.New(ctx, otlptracegrpc.WithEndpoint(ln.Addr().String()), otlptracegrpc.WithInsecure())
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
	testutil.Eventually(t, 30*time.Second, "the spans at the receiver", func() bool {
		return len(rcv.named(tracing.SpanCall)) == 1 && len(rcv.named(tracing.SpanAttempt)) == 1
	})
	call, att := rcv.named(tracing.SpanCall)[0], rcv.named(tracing.SpanAttempt)[0]
	if string(att.GetParentSpanId()) != string(call.GetSpanId()) || string(att.GetTraceId()) != string(call.GetTraceId()) {
		t.Errorf("the attempt is not the call's child at the receiver")
	}
	if got := otlpAttr(att, string(tracing.AttrEndpointID)); got != "hello-0" {
		t.Errorf("beacon.endpoint.id at the receiver = %q, want hello-0", got)
	}
	if got := otlpAttr(att, string(tracing.AttrBalancer)); got != "p2c_ewma" {
		t.Errorf("beacon.balancer at the receiver = %q, want p2c_ewma", got)
	}
	if got := otlpAttr(call, "rpc.method"); got != "/grpc.health.v1.Health/Check" {
		t.Errorf("rpc.method at the receiver = %q", got)
	}
}

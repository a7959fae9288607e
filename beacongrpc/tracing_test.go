package beacongrpc_test

import (
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"beacon.dev/beacon/beacongrpc"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/policy"
	"beacon.dev/beacon/tracing"
)

// tracedBackend serves grpc.health.v1 with otelgrpc's server handler; it
// can refuse (UNAVAILABLE) or hang every call.
type tracedBackend struct {
	*backend
	refuse, hang atomic.Bool
}

func startTracedBackend(t *testing.T, tp trace.TracerProvider) *tracedBackend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tb := &tracedBackend{}
	srv := grpc.NewServer(
		grpc.StatsHandler(otelgrpc.NewServerHandler(otelgrpc.WithTracerProvider(tp), otelgrpc.WithPropagators(propagation.TraceContext{}))),
		grpc.UnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			if tb.hang.Load() {
				<-ctx.Done() // until the client gives up on this attempt
				return nil, ctx.Err()
			}
			if tb.refuse.Load() {
				return nil, status.Error(codes.Unavailable, "refusing")
			}
			return h(ctx, req)
		}))
	tb.backend = &backend{srv: srv, addr: ln.Addr().String(), port: ln.Addr().(*net.TCPAddr).Port}
	tb.health = beacongrpc.RegisterHealth(srv)
	tb.health.SetServing(true)
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	return tb
}

func attr(s sdktrace.ReadOnlySpan, k attribute.Key) attribute.Value {
	for _, a := range s.Attributes() {
		if a.Key == k {
			return a.Value
		}
	}
	return attribute.Value{}
}

// traceOf returns the spans of one trace by name.
func traceOf(spans tracetest.SpanStubs, id trace.TraceID) map[string][]sdktrace.ReadOnlySpan {
	out := map[string][]sdktrace.ReadOnlySpan{}
	for _, s := range spans.Snapshots() {
		if s.SpanContext().TraceID() == id {
			out[s.Name()] = append(out[s.Name()], s)
		}
	}
	return out
}

// A retried call is one trace: the call's span, an attempt span per try
// naming the instance picked and the outcome, otelgrpc's client span
// under each attempt, and the server's span joined to it by W3C trace
// context.
func TestTracingRecordsRetriesWithTheirEndpoints(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	t.Cleanup(func() { tp.Shutdown(context.Background()) })
	e := newEnv(t)
	bad, good := startTracedBackend(t, tp), startTracedBackend(t, tp)
	e.register(t, "hello", bad.backend, good.backend) // hello-0 bad, hello-1 good
	exec, err := policy.New(policy.WithRetry(policy.RetryConfig{MaxAttempts: 3, BaseBackoff: time.Millisecond, RetryOn: beacongrpc.RetryableCode}))
	if err != nil {
		t.Fatal(err)
	}
	cc := e.dial(t, "beacon:///hello", policyConfig(beacongrpc.PolicyRoundRobin),
		grpc.WithStatsHandler(otelgrpc.NewClientHandler(otelgrpc.WithTracerProvider(tp), otelgrpc.WithPropagators(propagation.TraceContext{}))),
		grpc.WithUnaryInterceptor(beacongrpc.UnaryClientInterceptor(exec, func(string) bool { return true }, beacongrpc.WithTracing(tp))))
	hc := healthpb.NewHealthClient(cc)
	e.reachesAll(t, hc, 2)
	bad.refuse.Store(true)
	// Calls until one went to bad first: round robin alternates.
	var retried map[string][]sdktrace.ReadOnlySpan
	testutil.Eventually(t, 60*time.Second, "a call retried from hello-0 to hello-1", func() bool {
		exp.Reset()
		tracer := tp.Tracer("test")
		ctx, root := tracer.Start(e.ctx, "test.request")
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		_, err := hc.Check(cctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
		cancel()
		root.End()
		if err != nil {
			t.Fatalf("Check: %v (the retry should hide hello-0)", err)
		}
		retried = traceOf(exp.GetSpans(), root.SpanContext().TraceID())
		return len(retried["beacon.attempt"]) == 2
	})
	call := retried["beacon.call"]
	if len(call) != 1 || attr(call[0], "rpc.method").AsString() != "/grpc.health.v1.Health/Check" {
		t.Fatalf("beacon.call spans: %v", call)
	}
	byAttempt := map[int64]sdktrace.ReadOnlySpan{}
	for _, s := range retried["beacon.attempt"] {
		if s.Parent().SpanID() != call[0].SpanContext().SpanID() {
			t.Errorf("attempt span's parent is not the call's")
		}
		byAttempt[attr(s, tracing.AttrAttempt).AsInt64()] = s
	}
	first, second := byAttempt[1], byAttempt[2]
	if first == nil || second == nil {
		t.Fatalf("attempts numbered %v, want 1 and 2", byAttempt)
	}
	if got := attr(first, tracing.AttrEndpointID).AsString(); got != "hello-0" || attr(first, tracing.AttrOutcome).AsString() != "error" || attr(first, "rpc.grpc.status_code").AsString() != "Unavailable" {
		t.Errorf("first attempt: endpoint %q outcome %q code %q; want hello-0, error, Unavailable", got, attr(first, tracing.AttrOutcome).AsString(), attr(first, "rpc.grpc.status_code").AsString())
	}
	if got := attr(second, tracing.AttrEndpointID).AsString(); got != "hello-1" || attr(second, tracing.AttrOutcome).AsString() != "ok" {
		t.Errorf("second attempt: endpoint %q outcome %q; want hello-1, ok", got, attr(second, tracing.AttrOutcome).AsString())
	}
	for _, s := range []sdktrace.ReadOnlySpan{first, second} {
		if got := attr(s, tracing.AttrBalancer).AsString(); got != "round_robin" {
			t.Errorf("attempt %d: balancer %q recorded, want round_robin", attr(s, tracing.AttrAttempt).AsInt64(), got)
		}
		if attr(s, tracing.AttrRevision).AsInt64() == 0 {
			t.Errorf("attempt %d: no registry revision recorded", attr(s, tracing.AttrAttempt).AsInt64())
		}
	}
	// otelgrpc's client spans hang under the attempts; the server spans
	// are in the same trace, children of the client spans.
	clients := map[trace.SpanID]bool{}
	for _, s := range retried["grpc.health.v1.Health/Check"] {
		if s.SpanKind() == trace.SpanKindClient {
			clients[s.SpanContext().SpanID()] = true
			if p := s.Parent().SpanID(); p != first.SpanContext().SpanID() && p != second.SpanContext().SpanID() {
				t.Errorf("an otelgrpc client span is not under an attempt span")
			}
		}
	}
	// The server ends its span after writing the status: the client may
	// have returned before the second one is exported.
	var serverSpans []sdktrace.ReadOnlySpan
	testutil.Eventually(t, 30*time.Second, "both server spans exported", func() bool {
		serverSpans = nil
		for _, s := range traceOf(exp.GetSpans(), call[0].SpanContext().TraceID())["grpc.health.v1.Health/Check"] {
			if s.SpanKind() == trace.SpanKindServer {
				serverSpans = append(serverSpans, s)
			}
		}
		return len(serverSpans) >= 2
	})
	servers := len(serverSpans)
	for _, s := range serverSpans {
		if !clients[s.Parent().SpanID()] {
			t.Errorf("a server span's parent is not a client span of the call: trace context did not propagate")
		}
	}
	if len(clients) != 2 || servers != 2 {
		t.Errorf("%d client and %d server RPC spans in the trace, want 2 and 2", len(clients), servers)
	}
}

// hedged reports whether root's call made a hedge (an attempt has
// started as one): its spans may still be ending.
func hedged(exp *tracetest.InMemoryExporter, root trace.Span) bool {
	for _, s := range traceOf(exp.GetSpans(), root.SpanContext().TraceID())["beacon.attempt"] {
		if attr(s, tracing.AttrHedge).AsInt64() > 0 {
			return true
		}
	}
	return false
}

// A hedged call: the first attempt (to a hung instance) ends as
// lost_hedge, the hedge answers.
func TestTracingRecordsHedges(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	t.Cleanup(func() { tp.Shutdown(context.Background()) })
	e := newEnv(t)
	slow, fast := startTracedBackend(t, tp), startTracedBackend(t, tp)
	e.register(t, "hello", slow.backend, fast.backend)
	exec, err := policy.New(policy.WithRetry(policy.RetryConfig{MaxAttempts: 1}))
	if err != nil {
		t.Fatal(err)
	}
	hedger, err := policy.NewHedger(policy.HedgeConfig{Delay: 20 * time.Millisecond, RetryOn: beacongrpc.RetryableCode})
	if err != nil {
		t.Fatal(err)
	}
	cc := e.dial(t, "beacon:///hello", policyConfig(beacongrpc.PolicyRoundRobin),
		grpc.WithUnaryInterceptor(beacongrpc.UnaryClientInterceptor(exec, func(string) bool { return true }, beacongrpc.WithHedging(hedger), beacongrpc.WithTracing(tp))))
	hc := healthpb.NewHealthClient(cc)
	e.reachesAll(t, hc, 2)
	slow.hang.Store(true)
	testutil.Eventually(t, 60*time.Second, "a call hedged past the hung instance", func() bool {
		exp.Reset()
		ctx, root := tp.Tracer("test").Start(e.ctx, "test.request")
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		_, err := hc.Check(cctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
		cancel()
		root.End()
		if err != nil {
			t.Fatalf("Check: %v (the hedge should answer)", err)
		}
		var lost, won bool
		// The loser's span ends once its cancellation came back: wait.
		testutil.Eventually(t, 30*time.Second, "both attempts' spans", func() bool {
			return len(traceOf(exp.GetSpans(), root.SpanContext().TraceID())["beacon.attempt"]) >= 2 || !hedged(exp, root)
		})
		for _, s := range traceOf(exp.GetSpans(), root.SpanContext().TraceID())["beacon.attempt"] {
			switch {
			case attr(s, tracing.AttrHedge).AsInt64() == 0 && attr(s, tracing.AttrEndpointID).AsString() == "hello-0":
				lost = attr(s, tracing.AttrOutcome).AsString() == "lost_hedge"
			case attr(s, tracing.AttrHedge).AsInt64() == 1:
				won = attr(s, tracing.AttrOutcome).AsString() == "ok" && attr(s, tracing.AttrEndpointID).AsString() == "hello-1"
			}
		}
		return lost && won
	})
}

// A stream's opening is a call span too, with its attempt naming the
// instance picked, and otelgrpc's span of the stream nests under that
// attempt. (A server's refusal of a stream reaches the client on its
// first Recv, after the opening: only a failure to open, such as no
// instance ready, makes a second attempt.)
func TestTracingRecordsAStreamsOpening(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	t.Cleanup(func() { tp.Shutdown(context.Background()) })
	e := newEnv(t)
	b := startTracedBackend(t, tp)
	e.register(t, "hello", b.backend)
	exec, err := policy.New(policy.WithRetry(policy.RetryConfig{MaxAttempts: 3, BaseBackoff: time.Millisecond, RetryOn: beacongrpc.RetryableCode}))
	if err != nil {
		t.Fatal(err)
	}
	cc := e.dial(t, "beacon:///hello", policyConfig(beacongrpc.PolicyRoundRobin),
		grpc.WithStatsHandler(otelgrpc.NewClientHandler(otelgrpc.WithTracerProvider(tp), otelgrpc.WithPropagators(propagation.TraceContext{}))),
		grpc.WithStreamInterceptor(beacongrpc.StreamClientInterceptor(exec, beacongrpc.WithTracing(tp))))
	hc := healthpb.NewHealthClient(cc)
	ctx, root := tp.Tracer("test").Start(e.ctx, "test.watch")
	sctx, cancel := context.WithCancel(ctx)
	w, err := hc.Watch(sctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
	if err != nil {
		t.Fatalf("Watch: %v", err)
	}
	if _, err := w.Recv(); err != nil {
		t.Fatalf("Recv: %v", err)
	}
	cancel()
	root.End()
	var spans map[string][]sdktrace.ReadOnlySpan
	testutil.Eventually(t, 30*time.Second, "the call, its attempt and otelgrpc's stream span", func() bool {
		spans = traceOf(exp.GetSpans(), root.SpanContext().TraceID())
		if len(spans["beacon.call"]) != 1 || len(spans["beacon.attempt"]) != 1 {
			return false
		}
		for _, s := range exp.GetSpans().Snapshots() {
			if s.SpanKind() == trace.SpanKindClient && s.Parent().SpanID() == spans["beacon.attempt"][0].SpanContext().SpanID() {
				return true
			}
		}
		return false
	})
	call, at := spans["beacon.call"][0], spans["beacon.attempt"][0]
	if attr(call, "rpc.method").AsString() != "/grpc.health.v1.Health/Watch" || !attr(call, "rpc.stream").AsBool() || at.Parent().SpanID() != call.SpanContext().SpanID() {
		t.Errorf("call span %v", call.Attributes())
	}
	if attr(at, tracing.AttrEndpointID).AsString() != "hello-0" || attr(at, tracing.AttrOutcome).AsString() != "ok" || attr(at, tracing.AttrBalancer).AsString() != "round_robin" {
		t.Errorf("attempt span %v", at.Attributes())
	}
}

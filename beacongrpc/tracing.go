package beacongrpc

import (
	"context"
	"sync/atomic"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/status"

	"beacon.dev/beacon/policy"
	"beacon.dev/beacon/tracing"
)

// WithTracing records each call as a span of tp's tracer
// (tracing.SpanCall), each attempt — retries and hedges — as a child span
// (tracing.SpanAttempt) with the endpoint the balancer picked and why,
// and the policies' decisions (retry budget, breaker, bulkhead, rate
// limit, outlier ejection) as events: package tracing lists them.
// Attempts run in their span's context, so an otelgrpc client stats
// handler on the connection nests the RPC span under it and propagates
// its trace context (W3C) to the server. Without this option (or with a
// nil tp) nothing is recorded and nothing is allocated for tracing.
func WithTracing(tp trace.TracerProvider) InterceptorOption {
	return func(i *interceptor) { i.tracer = tracing.Tracer(tp, "beacon.dev/beacon/beacongrpc") }
}

// WithConfigChanges marks, with WithTracing, the first call after each
// change of the watched configuration values (config.Binding) with the
// value's key and revision (tracing.EventConfigChange on the call span).
func WithConfigChanges(c *tracing.ConfigChanges) InterceptorOption {
	return func(i *interceptor) { i.config = c }
}

// startCall opens the call's span.
func (ic *interceptor) startCall(ctx context.Context, method string, kind policy.Idempotency) (context.Context, trace.Span) {
	return tracing.StartCall(ctx, ic.tracer, kind == policy.Idempotent, attribute.String("rpc.method", method))
}

// endCall records how the call ended.
func endCall(span trace.Span, err error) {
	code := ""
	if err != nil {
		code = StatusOf(err).Code().String()
	}
	tracing.EndCall(span, err, code)
}

// traced runs one attempt in a span of its own.
func (ic *interceptor) traced(ctx context.Context, n *atomic.Int32, hedge int, fn func(context.Context) error) error {
	if ic.tracer == nil {
		return fn(ctx)
	}
	ctx, span := tracing.StartAttempt(ctx, ic.tracer, int(n.Add(1)), hedge)
	err := fn(ctx)
	switch {
	case err == nil:
		tracing.EndAttempt(span, "ok", "")
	case lostHedge(ctx, err):
		tracing.EndAttempt(span, "lost_hedge", "")
	default:
		code := status.Code(err).String()
		tracing.EndAttempt(span, "error", code, attribute.String("rpc.grpc.status_code", code))
	}
	return err
}

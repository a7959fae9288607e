package beacongrpc

import (
	"context"
	"errors"
	"sync/atomic"

	"go.opentelemetry.io/otel/attribute"
	otelcodes "go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/status"

	"beacon.dev/beacon/policy"
)

// instrumentationName names beacon's tracer.
const instrumentationName = "beacon.dev/beacon/beacongrpc"

// Span attributes beacon records; their values are bounded sets (ids of
// the service's instances, not request data).
const (
	AttrAttempt        = attribute.Key("beacon.attempt")     // 1, 2, … within the call
	AttrHedge          = attribute.Key("beacon.hedge")       // 0: the first; n: the nth hedge
	AttrOutcome        = attribute.Key("beacon.outcome")     // ok, error, lost_hedge
	AttrEndpointID     = attribute.Key("beacon.endpoint.id") // the instance picked
	AttrEndpointAddr   = attribute.Key("beacon.endpoint.address")
	AttrEndpointZone   = attribute.Key("beacon.endpoint.zone")
	AttrEndpointTier   = attribute.Key("beacon.endpoint.tier")  // 0 primary, 1+ backups
	AttrBalancer       = attribute.Key("beacon.balancer")       // the algorithm
	AttrLocalZone      = attribute.Key("beacon.balancer.local") // routing within the caller's zone
	AttrPanic          = attribute.Key("beacon.balancer.panic") // too few healthy: every endpoint
	AttrRevision       = attribute.Key("beacon.registry.revision")
	AttrRetryStop      = attribute.Key("beacon.retry.stop") // why retrying stopped
	AttrAttempts       = attribute.Key("beacon.attempts")   // attempts the call made
	EventBudgetRefused = "beacon.retry_budget_refused"
	EventBreakerOpen   = "beacon.breaker_open"
	EventBulkheadFull  = "beacon.bulkhead_full"
	EventRateLimited   = "beacon.rate_limited"
	EventEjected       = "beacon.outlier_ejected"
)

// WithTracing records each call as a span of tp's tracer ("beacon.call"),
// each attempt — retries and hedges — as a child span ("beacon.attempt")
// with the endpoint the balancer picked and why, and the policies'
// decisions (retry budget, breaker, bulkhead, rate limit, outlier
// ejection) as events. Attempts run in their span's context, so an
// otelgrpc client stats handler on the connection nests the RPC span
// under it and propagates its trace context (W3C) to the server. Without
// this option nothing is recorded and nothing is allocated for tracing.
func WithTracing(tp trace.TracerProvider) InterceptorOption {
	return func(i *interceptor) {
		if tp != nil { // nil: off
			i.tracer = tp.Tracer(instrumentationName)
		}
	}
}

// startCall opens the call's span.
func (ic *interceptor) startCall(ctx context.Context, method string, kind policy.Idempotency) (context.Context, trace.Span) {
	return ic.tracer.Start(ctx, "beacon.call", trace.WithAttributes(
		attribute.String("rpc.method", method),
		attribute.Bool("beacon.idempotent", kind == policy.Idempotent)))
}

// endCall records how the call ended.
func endCall(span trace.Span, err error) {
	defer span.End()
	if err == nil {
		return
	}
	var re *policy.RetryError
	if errors.As(err, &re) {
		span.SetAttributes(AttrRetryStop.String(re.Reason), AttrAttempts.Int(re.Attempts))
		if re.Reason == "retry budget" {
			span.AddEvent(EventBudgetRefused)
		}
	}
	switch {
	case errors.Is(err, policy.ErrOpen):
		span.AddEvent(EventBreakerOpen)
	case errors.Is(err, policy.ErrBulkheadFull):
		span.AddEvent(EventBulkheadFull)
	case errors.Is(err, policy.ErrRateLimited):
		span.AddEvent(EventRateLimited)
	}
	span.SetStatus(otelcodes.Error, StatusOf(err).Code().String())
}

// traced runs one attempt in a span of its own.
func (ic *interceptor) traced(ctx context.Context, n *atomic.Int32, hedge int, fn func(context.Context) error) error {
	if ic.tracer == nil {
		return fn(ctx)
	}
	ctx, span := ic.tracer.Start(ctx, "beacon.attempt", trace.WithAttributes(AttrAttempt.Int(int(n.Add(1))), AttrHedge.Int(hedge)))
	err := fn(context.WithValue(ctx, attemptSpanKey{}, span))
	switch {
	case err == nil:
		span.SetAttributes(AttrOutcome.String("ok"))
	case lostHedge(ctx, err):
		span.SetAttributes(AttrOutcome.String("lost_hedge"))
	default:
		span.SetAttributes(AttrOutcome.String("error"), attribute.String("rpc.grpc.status_code", status.Code(err).String()))
		span.SetStatus(otelcodes.Error, status.Code(err).String())
	}
	span.End()
	return err
}

// attemptSpanKey carries the attempt's span to the picker: the span
// innermost in the pick's context may be an otelgrpc RPC span under it.
type attemptSpanKey struct{}

// attemptSpan is the attempt's span, nil outside a traced attempt.
func attemptSpan(ctx context.Context) trace.Span {
	s, _ := ctx.Value(attemptSpanKey{}).(trace.Span)
	return s
}

// tracePick records the picked endpoint and the route that chose it on
// the attempt's span, if it is recording.
func (p *picker) tracePick(ctx context.Context, id, addr, zone string, tier int) {
	span := attemptSpan(ctx)
	if span == nil || !span.IsRecording() {
		return
	}
	st := p.bal.State()
	attrs := []attribute.KeyValue{
		AttrEndpointID.String(id), AttrEndpointAddr.String(addr), AttrEndpointTier.Int(tier),
		AttrBalancer.String(p.bal.Name()), AttrRevision.Int64(st.Revision),
	}
	if zone != "" {
		attrs = append(attrs, AttrEndpointZone.String(zone))
	}
	if len(st.Subsets) == 1 {
		attrs = append(attrs, AttrLocalZone.Bool(st.Subsets[0].Local), AttrPanic.Bool(st.Subsets[0].Panic))
	}
	span.SetAttributes(attrs...)
}

// traceEjection adds an event when the attempt's failure ejected the
// endpoint.
func traceEjection(ctx context.Context, id string) {
	if span := attemptSpan(ctx); span != nil && span.IsRecording() {
		span.AddEvent(EventEjected, trace.WithAttributes(AttrEndpointID.String(id)))
	}
}

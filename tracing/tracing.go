// Package tracing is what beacon's integrations (beacongrpc, beaconhttp)
// record in OpenTelemetry traces: a span per call ("beacon.call"), a
// child span per attempt — retries and hedges — ("beacon.attempt") with
// the endpoint the balancer picked and why, and the policies' decisions
// as events. The application brings the TracerProvider; without one
// nothing is recorded. Attribute values are bounded sets (the service's
// instance ids, algorithms, outcomes), never request data.
package tracing

import (
	"context"
	"errors"
	"sync/atomic"

	"go.opentelemetry.io/otel/attribute"
	otelcodes "go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"beacon.dev/beacon/balancer"
	"beacon.dev/beacon/policy"
)

// Span names.
const (
	SpanCall    = "beacon.call"
	SpanAttempt = "beacon.attempt"
)

// Attributes.
const (
	AttrAttempt      = attribute.Key("beacon.attempt")          // 1, 2, … within the call
	AttrHedge        = attribute.Key("beacon.hedge")            // 0: the first; n: the nth hedge
	AttrOutcome      = attribute.Key("beacon.outcome")          // ok, error, lost_hedge
	AttrEndpointID   = attribute.Key("beacon.endpoint.id")      // the instance picked
	AttrEndpointAddr = attribute.Key("beacon.endpoint.address") //
	AttrEndpointZone = attribute.Key("beacon.endpoint.zone")    //
	AttrEndpointTier = attribute.Key("beacon.endpoint.tier")    // 0 primary, 1+ backups
	AttrBalancer     = attribute.Key("beacon.balancer")         // the algorithm
	AttrLocalZone    = attribute.Key("beacon.balancer.local")   // routing within the caller's zone
	AttrPanic        = attribute.Key("beacon.balancer.panic")   // too few healthy: every endpoint
	AttrSubset       = attribute.Key("beacon.balancer.subset")  // the canary split's group, when split
	AttrRevision     = attribute.Key("beacon.registry.revision")
	AttrRetryStop    = attribute.Key("beacon.retry.stop") // why retrying stopped
	AttrAttempts     = attribute.Key("beacon.attempts")   // attempts the call made
	AttrIdempotent   = attribute.Key("beacon.idempotent")
)

// Events.
const (
	EventBudgetRefused = "beacon.retry_budget_refused"
	EventBreakerOpen   = "beacon.breaker_open"
	EventBulkheadFull  = "beacon.bulkhead_full"
	EventRateLimited   = "beacon.rate_limited"
	EventEjected       = "beacon.outlier_ejected"
	// On the first call that used a registry change: the attempt picked
	// on the route of a revision no call had used (AttrRevision).
	EventRegistryChange = "beacon.registry_change_used"
	// On the first call after a watched configuration value changed
	// (ConfigChanges): AttrConfigKey, AttrConfigRevision.
	EventConfigChange = "beacon.config_change_used"
)

// Attributes of EventConfigChange.
const (
	AttrConfigKey      = attribute.Key("beacon.config.key")
	AttrConfigRevision = attribute.Key("beacon.config.revision")
)

// Tracer returns beacon's tracer from tp, nil for a nil tp (tracing off).
func Tracer(tp trace.TracerProvider, instrumentation string) trace.Tracer {
	if tp == nil {
		return nil
	}
	return tp.Tracer(instrumentation)
}

// StartCall opens a call's span.
func StartCall(ctx context.Context, tr trace.Tracer, idempotent bool, attrs ...attribute.KeyValue) (context.Context, trace.Span) {
	return tr.Start(ctx, SpanCall, trace.WithAttributes(append(attrs, AttrIdempotent.Bool(idempotent))...))
}

// EndCall records how the call ended — why retrying stopped, the
// policies' refusals — and ends its span. code names the failure for the
// span's status (a gRPC code, an HTTP status).
func EndCall(span trace.Span, err error, code string) {
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
	span.SetStatus(otelcodes.Error, code)
}

// attemptKey carries the attempt's span to the balancer's pick: the span
// innermost in the pick's context may be an instrumentation's RPC span
// under it (otelgrpc, otelhttp).
type attemptKey struct{}

// StartAttempt opens attempt n's span (hedge: 0 for a first attempt, k
// for the kth hedge); the returned context carries it to RecordPick.
func StartAttempt(ctx context.Context, tr trace.Tracer, n, hedge int) (context.Context, trace.Span) {
	ctx, span := tr.Start(ctx, SpanAttempt, trace.WithAttributes(AttrAttempt.Int(n), AttrHedge.Int(hedge)))
	return context.WithValue(ctx, attemptKey{}, span), span
}

// EndAttempt records the attempt's outcome ("ok", "error", "lost_hedge")
// and ends its span; code and attrs describe an error.
func EndAttempt(span trace.Span, outcome, code string, attrs ...attribute.KeyValue) {
	span.SetAttributes(append(attrs, AttrOutcome.String(outcome))...)
	if outcome == "error" {
		span.SetStatus(otelcodes.Error, code)
	}
	span.End()
}

// Attempt is the attempt's span in ctx, nil outside a traced attempt.
func Attempt(ctx context.Context) trace.Span {
	s, _ := ctx.Value(attemptKey{}).(trace.Span)
	if s == nil || !s.IsRecording() {
		return nil
	}
	return s
}

// RecordPick puts what the balancer picked, and on which route, on the
// attempt's span in ctx, if any.
func RecordPick(ctx context.Context, algorithm string, p balancer.Pick) {
	span := Attempt(ctx)
	if span == nil {
		return
	}
	rev, sub := p.Route()
	attrs := []attribute.KeyValue{
		AttrEndpointID.String(p.ID), AttrEndpointAddr.String(p.Addr), AttrEndpointTier.Int(p.Tier),
		AttrBalancer.String(algorithm), AttrRevision.Int64(rev),
		AttrLocalZone.Bool(sub.Local), AttrPanic.Bool(sub.Panic),
	}
	if p.Zone != "" {
		attrs = append(attrs, AttrEndpointZone.String(p.Zone))
	}
	if sub.Name != "" {
		attrs = append(attrs, AttrSubset.String(sub.Name))
	}
	span.SetAttributes(attrs...)
	if p.FirstOfRevision() {
		span.AddEvent(EventRegistryChange, trace.WithAttributes(AttrRevision.Int64(rev)))
	}
}

// RecordEjection adds an event to the attempt's span when its failure
// ejected the endpoint.
func RecordEjection(ctx context.Context, id string) {
	if span := Attempt(ctx); span != nil {
		span.AddEvent(EventEjected, trace.WithAttributes(AttrEndpointID.String(id)))
	}
}

// Versioned is a configuration value calls depend on, such as a
// config.Binding: its key and the revision in force.
type Versioned interface {
	Key() string
	Revision() int64
}

// ConfigChanges marks, on the call span of the first traced call after a
// watched configuration value changed, the value's key and new revision
// (EventConfigChange): which call first ran with a new configuration.
// Give it to the integrations (beacongrpc.WithConfigChanges,
// beaconhttp.WithConfigChanges); one ConfigChanges may serve several.
type ConfigChanges struct {
	items []watchedConfig
}

type watchedConfig struct {
	src  Versioned
	seen atomic.Int64 // the revision last marked
}

// WatchConfig returns a ConfigChanges over the values.
func WatchConfig(values ...Versioned) *ConfigChanges {
	c := &ConfigChanges{items: make([]watchedConfig, len(values))}
	for i, v := range values {
		c.items[i].src = v
	}
	return c
}

// Record adds an EventConfigChange to span for every value whose revision
// changed since the last call recorded; exactly one call gets each change.
func (c *ConfigChanges) Record(span trace.Span) {
	// Only a span that is exported may claim a change: an unsampled one
	// would take the mark with it.
	if c == nil || span == nil || !span.IsRecording() {
		return
	}
	for i := range c.items {
		it := &c.items[i]
		rev, seen := it.src.Revision(), it.seen.Load()
		if rev != seen && it.seen.CompareAndSwap(seen, rev) {
			span.AddEvent(EventConfigChange, trace.WithAttributes(AttrConfigKey.String(it.src.Key()), AttrConfigRevision.Int64(rev)))
		}
	}
}

package shopkit

import (
	"context"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

// Propagator is the trace context the shop's services pass on: W3C's.
var Propagator = propagation.TraceContext{}

// StartTracing exports the process's spans over OTLP/gRPC to endpoint
// (host:port of any OpenTelemetry collector, plaintext), each span marked
// with service.name. An empty endpoint turns tracing off: the provider is
// nil. stop flushes and closes the exporter.
func StartTracing(ctx context.Context, endpoint, service string) (tp trace.TracerProvider, stop func(context.Context) error, err error) {
	if endpoint == "" {
		return nil, func(context.Context) error { return nil }, nil
	}
	exp, err := otlptracegrpc.New(ctx, otlptracegrpc.WithEndpoint(endpoint), otlptracegrpc.WithInsecure())
	if err != nil {
		return nil, nil, err
	}
	p := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp),
		sdktrace.WithResource(resource.NewSchemaless(attribute.String("service.name", service))))
	return p, p.Shutdown, nil
}

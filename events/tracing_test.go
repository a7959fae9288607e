package events_test

import (
	"context"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"beacon.dev/beacon/events"
	"beacon.dev/beacon/internal/testutil"
)

// The trace continues from the producer into the consumer: the handling
// span's parent is the publishing span, whose parent is the caller's, and
// the handler runs in the handling span's context.
func TestTraceContinuesIntoTheHandler(t *testing.T) {
	brokers := newCluster(t, "orders")
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	defer tp.Shutdown(context.Background())
	p, err := events.NewProducer(events.Config{Brokers: brokers, TracerProvider: tp})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	inHandler := make(chan trace.SpanContext, 1)
	startConsumer(t, events.ConsumerConfig{Config: events.Config{Brokers: brokers, TracerProvider: tp}, Group: "g", Topics: []string{"orders"},
		Handler: func(ctx context.Context, ev *events.Event) error {
			select {
			case inHandler <- trace.SpanContextFromContext(ctx):
			default:
			}
			return nil
		}})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ctx, root := tp.Tracer("test").Start(ctx, "place order")
	if err := p.Publish(ctx, &events.Event{Topic: "orders", Key: []byte("u1"), Value: []byte("view")}); err != nil {
		t.Fatal(err)
	}
	root.End()
	var handled trace.SpanContext
	select {
	case handled = <-inHandler:
	case <-ctx.Done():
		t.Fatal("the event was not handled")
	}
	var publish, handle sdktrace.ReadOnlySpan
	testutil.Eventually(t, time.Minute, "the handling span ended", func() bool {
		for _, s := range exp.GetSpans().Snapshots() {
			switch s.Name() {
			case events.SpanPublish:
				publish = s
			case events.SpanHandle:
				handle = s
			}
		}
		return publish != nil && handle != nil
	})
	switch {
	case publish.Parent().SpanID() != root.SpanContext().SpanID():
		t.Errorf("the publishing span's parent is %v, want the caller's span", publish.Parent().SpanID())
	case handle.Parent().SpanID() != publish.SpanContext().SpanID() || handle.SpanContext().TraceID() != root.SpanContext().TraceID():
		t.Errorf("the handling span (trace %v, parent %v) does not continue the publishing span %v", handle.SpanContext().TraceID(), handle.Parent().SpanID(), publish.SpanContext().SpanID())
	case handled.SpanID() != handle.SpanContext().SpanID():
		t.Errorf("the handler ran in span %v, want the handling span %v", handled.SpanID(), handle.SpanContext().SpanID())
	case handle.SpanKind() != trace.SpanKindConsumer || publish.SpanKind() != trace.SpanKindProducer:
		t.Errorf("span kinds %v / %v, want producer / consumer", publish.SpanKind(), handle.SpanKind())
	}
}

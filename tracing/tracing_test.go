package tracing_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"beacon.dev/beacon/tracing"
)

type fakeConfig struct {
	key string
	rev atomic.Int64
}

func (f *fakeConfig) Key() string     { return f.key }
func (f *fakeConfig) Revision() int64 { return f.rev.Load() }

// Each change of a watched value is marked on exactly one call's span,
// however many calls record at once.
func TestConfigChangesMarkOneCallPerChange(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	t.Cleanup(func() { tp.Shutdown(context.Background()) })
	tracer := tp.Tracer("test")
	a, b := &fakeConfig{key: "default/a"}, &fakeConfig{key: "default/b"}
	changes := tracing.WatchConfig(a, b)
	calls := func(n int) map[string][]int64 {
		exp.Reset()
		var wg sync.WaitGroup
		for range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, span := tracer.Start(context.Background(), "call")
				changes.Record(span)
				span.End()
			}()
		}
		wg.Wait()
		marked := map[string][]int64{}
		for _, s := range exp.GetSpans().Snapshots() {
			for _, ev := range s.Events() {
				if ev.Name != tracing.EventConfigChange {
					continue
				}
				var key string
				var rev int64
				for _, kv := range ev.Attributes {
					switch kv.Key {
					case tracing.AttrConfigKey:
						key = kv.Value.AsString()
					case tracing.AttrConfigRevision:
						rev = kv.Value.AsInt64()
					}
				}
				marked[key] = append(marked[key], rev)
			}
		}
		return marked
	}
	if m := calls(8); len(m) != 0 {
		t.Errorf("nothing changed, marked %v", m)
	}
	a.rev.Store(5)
	b.rev.Store(9)
	if m := calls(8); len(m) != 2 || len(m["default/a"]) != 1 || m["default/a"][0] != 5 || len(m["default/b"]) != 1 || m["default/b"][0] != 9 {
		t.Errorf("after a→5 and b→9, marked %v; want each once", m)
	}
	if m := calls(8); len(m) != 0 {
		t.Errorf("no further change, marked %v", m)
	}
	a.rev.Store(6)
	if m := calls(8); len(m) != 1 || len(m["default/a"]) != 1 || m["default/a"][0] != 6 {
		t.Errorf("after a→6, marked %v", m)
	}
	var nilChanges *tracing.ConfigChanges
	_, span := tracer.Start(context.Background(), "call")
	nilChanges.Record(span) // no option given: nothing, no panic
	span.End()
}

// An unsampled call cannot take a change's mark with it: the next sampled
// one gets it.
func TestConfigChangesSkipUnsampledCalls(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	t.Cleanup(func() { tp.Shutdown(context.Background()) })
	never := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.NeverSample()))
	t.Cleanup(func() { never.Shutdown(context.Background()) })
	a := &fakeConfig{key: "default/a"}
	a.rev.Store(3)
	changes := tracing.WatchConfig(a)
	_, dropped := never.Tracer("test").Start(context.Background(), "unsampled call")
	changes.Record(dropped)
	dropped.End()
	_, span := tp.Tracer("test").Start(context.Background(), "sampled call")
	changes.Record(span)
	span.End()
	spans := exp.GetSpans().Snapshots()
	if len(spans) != 1 || len(spans[0].Events()) != 1 || spans[0].Events()[0].Name != tracing.EventConfigChange {
		t.Fatalf("the sampled call's events: %v, want the change's mark", spans)
	}
}

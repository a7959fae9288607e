package beaconhttp_test

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"beacon.dev/beacon/beaconhttp"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/outlier"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/tracing"
)

func spanAttr(s sdktrace.ReadOnlySpan, k attribute.Key) attribute.Value {
	for _, a := range s.Attributes() {
		if a.Key == k {
			return a.Value
		}
	}
	return attribute.Value{}
}

// A request retried from an instance answering 503 to one answering 200
// is one trace: the call's span, an attempt span per try with the
// instance and the status, otelhttp's client span under each attempt
// (the base transport), and the instances' server spans joined to those
// by W3C trace context.
func TestTracingRecordsRetriedRequests(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	t.Cleanup(func() { tp.Shutdown(context.Background()) })
	prop := propagation.TraceContext{}
	e := newEnv(t)
	start := func(name string, code int) int {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		h := otelhttp.NewHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(code)
			fmt.Fprint(w, name)
		}), "instance", otelhttp.WithTracerProvider(tp), otelhttp.WithPropagators(prop))
		srv := &http.Server{Handler: h}
		go srv.Serve(ln)
		t.Cleanup(func() { srv.Close() })
		return ln.Addr().(*net.TCPAddr).Port
	}
	for _, in := range []struct {
		id   string
		code int
	}{{"down", http.StatusServiceUnavailable}, {"up", http.StatusOK}} {
		if _, err := e.c.Register(e.ctx, registry.Instance{Service: "echo", ID: in.id, Address: "127.0.0.1", Port: start(in.id, in.code)}); err != nil {
			t.Fatal(err)
		}
	}
	sub, err := e.cache.Subscribe("echo") // followed before the first request
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sub.Close)
	testutil.Eventually(t, 30*time.Second, "the cache following both instances", func() bool {
		set, _ := e.cache.Endpoints("echo")
		return len(set.Endpoints) == 2
	})
	base := otelhttp.NewTransport(beaconhttp.DefaultBase(), otelhttp.WithTracerProvider(tp), otelhttp.WithPropagators(prop))
	hc := newTransport(t, e, beaconhttp.WithTracing(tp), beaconhttp.WithBase(base))
	var spans map[string][]sdktrace.ReadOnlySpan
	testutil.Eventually(t, 60*time.Second, "a request retried from down to up", func() bool {
		exp.Reset()
		ctx, root := tp.Tracer("test").Start(e.ctx, "test.request")
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://echo/", nil)
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatalf("GET: %v", err)
		}
		resp.Body.Close()
		root.End()
		if resp.StatusCode != http.StatusOK {
			return false // both instances not followed yet
		}
		spans = map[string][]sdktrace.ReadOnlySpan{}
		for _, s := range exp.GetSpans().Snapshots() {
			if s.SpanContext().TraceID() == root.SpanContext().TraceID() {
				spans[s.Name()] = append(spans[s.Name()], s)
			}
		}
		if len(spans[tracing.SpanAttempt]) != 2 {
			return false
		}
		for _, s := range spans[tracing.SpanAttempt] { // not a first pick before the service was followed
			if spanAttr(s, tracing.AttrEndpointID).AsString() == "" {
				return false
			}
		}
		return true
	})
	call := spans[tracing.SpanCall]
	if len(call) != 1 || spanAttr(call[0], "server.address").AsString() != "echo" {
		t.Fatalf("call spans %v, want one for echo", call)
	}
	byN := map[int64]sdktrace.ReadOnlySpan{}
	for _, s := range spans[tracing.SpanAttempt] {
		byN[spanAttr(s, tracing.AttrAttempt).AsInt64()] = s
		if s.Parent().SpanID() != call[0].SpanContext().SpanID() {
			t.Errorf("an attempt's parent is not the call")
		}
	}
	if byN[1] == nil || byN[2] == nil {
		t.Fatalf("attempts numbered %v, want 1 and 2", byN)
	}
	if s := byN[1]; s == nil || spanAttr(s, tracing.AttrEndpointID).AsString() != "down" || spanAttr(s, "http.response.status_code").AsInt64() != 503 || spanAttr(s, tracing.AttrOutcome).AsString() != "error" {
		t.Errorf("first attempt: %v", s)
	}
	if s := byN[2]; s == nil || spanAttr(s, tracing.AttrEndpointID).AsString() != "up" || spanAttr(s, tracing.AttrOutcome).AsString() != "ok" || spanAttr(s, tracing.AttrBalancer).AsString() != "p2c_ewma" {
		t.Errorf("second attempt: %v", s)
	}
	// otelhttp's client spans under the attempts; the server spans their
	// children across the wire.
	clients := map[trace.SpanID]bool{}
	attempts := map[trace.SpanID]bool{byN[1].SpanContext().SpanID(): true, byN[2].SpanContext().SpanID(): true}
	var servers []sdktrace.ReadOnlySpan
	testutil.Eventually(t, 30*time.Second, "both server spans exported", func() bool {
		servers = servers[:0]
		for _, s := range exp.GetSpans().Snapshots() {
			if s.SpanContext().TraceID() == call[0].SpanContext().TraceID() && s.SpanKind() == trace.SpanKindServer {
				servers = append(servers, s)
			}
			if s.SpanContext().TraceID() == call[0].SpanContext().TraceID() && s.SpanKind() == trace.SpanKindClient {
				clients[s.SpanContext().SpanID()] = true
				if !attempts[s.Parent().SpanID()] {
					t.Errorf("an otelhttp client span is not under an attempt")
				}
			}
		}
		return len(servers) >= 2
	})
	for _, s := range servers {
		if !clients[s.Parent().SpanID()] {
			t.Errorf("a server span's parent is not the call's client span: trace context did not propagate")
		}
	}
}

// An attempt whose failure ejected its instance carries the ejection as
// an event, as in beacongrpc.
func TestTracingRecordsTheEjection(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	t.Cleanup(func() { tp.Shutdown(context.Background()) })
	e := newEnv(t)
	start := func(code int) int {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(code) })}
		go srv.Serve(ln)
		t.Cleanup(func() { srv.Close() })
		return ln.Addr().(*net.TCPAddr).Port
	}
	for id, code := range map[string]int{"down": http.StatusServiceUnavailable, "up": http.StatusOK} {
		if _, err := e.c.Register(e.ctx, registry.Instance{Service: "echo", ID: id, Address: "127.0.0.1", Port: start(code)}); err != nil {
			t.Fatal(err)
		}
	}
	sub, err := e.cache.Subscribe("echo")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sub.Close)
	testutil.Eventually(t, 30*time.Second, "the cache following both instances", func() bool {
		set, _ := e.cache.Endpoints("echo")
		return len(set.Endpoints) == 2
	})
	cfg := &fakeConfig{key: "default/echo.json"}
	cfg.rev.Store(42)
	hc := newTransport(t, e, beaconhttp.WithTracing(tp), beaconhttp.WithConfigChanges(tracing.WatchConfig(cfg)),
		beaconhttp.WithOutlierDetection(outlier.Config{ConsecutiveFailures: 1, FailureRate: -1, Interval: time.Hour, BaseEjection: time.Hour, MaxEjection: time.Hour}))
	var ejected []string
	testutil.Eventually(t, 60*time.Second, "an attempt on down carrying its ejection", func() bool {
		req, _ := http.NewRequestWithContext(e.ctx, http.MethodGet, "http://echo/", nil)
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatalf("GET: %v", err)
		}
		resp.Body.Close()
		ejected = ejected[:0]
		for _, s := range exp.GetSpans().Snapshots() {
			for _, ev := range s.Events() {
				if ev.Name == tracing.EventEjected {
					ejected = append(ejected, spanAttr(s, tracing.AttrEndpointID).AsString())
				}
			}
		}
		return len(ejected) > 0
	})
	if len(ejected) != 1 || ejected[0] != "down" {
		t.Errorf("ejection events on attempts to %v, want one, on down", ejected)
	}
	// The first request used the registry's revision and the configuration
	// value's, each marked once on that request's spans.
	var configMarks, registryMarks []string
	for _, s := range exp.GetSpans().Snapshots() {
		for _, ev := range s.Events() {
			switch ev.Name {
			case tracing.EventConfigChange:
				configMarks = append(configMarks, s.Name())
			case tracing.EventRegistryChange:
				registryMarks = append(registryMarks, s.Name())
			}
		}
	}
	if len(configMarks) != 1 || configMarks[0] != tracing.SpanCall || len(registryMarks) != 1 || registryMarks[0] != tracing.SpanAttempt {
		t.Errorf("config change marked on %v, registry change on %v; want one call span and one attempt span", configMarks, registryMarks)
	}
}

type fakeConfig struct {
	key string
	rev atomic.Int64
}

func (f *fakeConfig) Key() string     { return f.key }
func (f *fakeConfig) Revision() int64 { return f.rev.Load() }

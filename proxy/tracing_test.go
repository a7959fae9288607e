package proxy_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/proxy"
	"beacon.dev/beacon/tracing"
)

// With a tracer provider, a request is a server span named by its route,
// in the caller's trace, with beacon's call and attempt spans under it,
// and the instance receives the attempt's span as W3C trace context.
func TestProxyTracesARequest(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	t.Cleanup(func() { tp.Shutdown(context.Background()) })
	e := newEnv(t)
	var seen atomic.Value // the traceparent the instance received
	e.backend("alpha", "alpha-1", "", func(w http.ResponseWriter, r *http.Request) {
		seen.Store(r.Header.Get("traceparent"))
		io.WriteString(w, "alpha-1")
	})
	addr := testutil.FreeAddr(t)
	_, base, _ := e.startProxy(fmt.Sprintf(`
listeners:
  - {name: edge, addr: %q}
routes:
  - {name: alpha, match: {pathPrefix: /alpha}, service: alpha}
`, addr), proxy.WithTracerProvider(tp))
	hc := &http.Client{Timeout: 10 * time.Second}
	waitServing(t, hc, base+"/alpha", nil, "alpha-1")

	ctx, root := tp.Tracer("test").Start(context.Background(), "caller")
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"/alpha/orders/12345", nil)
	propagation.TraceContext{}.Inject(ctx, propagation.HeaderCarrier(req.Header))
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	root.End()

	var server, call, attempt sdktrace.ReadOnlySpan
	testutil.Eventually(t, 30*time.Second, "the proxy's spans in the caller's trace", func() bool {
		server, call, attempt = nil, nil, nil
		for _, s := range exp.GetSpans().Snapshots() {
			if s.SpanContext().TraceID() != root.SpanContext().TraceID() {
				continue
			}
			switch s.Name() {
			case "proxy alpha":
				server = s
			case tracing.SpanCall:
				call = s
			case tracing.SpanAttempt:
				attempt = s
			}
		}
		return server != nil && call != nil && attempt != nil
	})
	if server.SpanKind() != trace.SpanKindServer || server.Parent().SpanID() != root.SpanContext().SpanID() {
		t.Errorf("the route's span is not a server span under the caller's")
	}
	if call.Parent().SpanID() != server.SpanContext().SpanID() || attempt.Parent().SpanID() != call.SpanContext().SpanID() {
		t.Errorf("beacon's spans are not under the route's")
	}
	for _, a := range attempt.Attributes() {
		if a.Key == tracing.AttrEndpointID && a.Value.AsString() != "alpha-1" {
			t.Errorf("attempt picked %q, want alpha-1", a.Value.AsString())
		}
	}
	tp2, _ := seen.Load().(string)
	if !strings.Contains(tp2, root.SpanContext().TraceID().String()) || !strings.Contains(tp2, attempt.SpanContext().SpanID().String()) {
		t.Errorf("the instance received traceparent %q, want the trace %s and the attempt's span %s", tp2, root.SpanContext().TraceID(), attempt.SpanContext().SpanID())
	}
	for _, s := range exp.GetSpans().Snapshots() {
		if strings.Contains(s.Name(), "12345") {
			t.Errorf("a span named by the request's path: %q", s.Name())
		}
	}
}

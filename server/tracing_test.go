package server_test

import (
	"context"
	"net/http"
	"testing"
	"time"

	"connectrpc.com/connect"
	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/server/servertest"
)

// With a TracerProvider, every API request is a server span named by its
// procedure and joined to the caller's trace by W3C trace context; a path
// no procedure has gets a name from a bounded set, not the raw path.
func TestAPIRequestsAreTraced(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	t.Cleanup(func() { tp.Shutdown(context.Background()) })
	cfg := servertest.Config(t, "")
	cfg.TracerProvider = tp
	srv := servertest.Start(t, cfg)

	hc := &http.Client{Transport: otelhttp.NewTransport(http.DefaultTransport, otelhttp.WithTracerProvider(tp), otelhttp.WithPropagators(propagation.TraceContext{}))}
	defer hc.CloseIdleConnections()
	rc := beaconv1connect.NewRegistryServiceClient(hc, "http://"+srv.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ctx, root := tp.Tracer("test").Start(ctx, "test.register")
	if _, err := rc.Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{Instance: &beaconv1.Instance{Service: "orders", Id: "o-1", Address: "127.0.0.1", Port: 9000}})); err != nil {
		t.Fatal(err)
	}
	root.End()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+srv.Addr()+"/no/such/path-12345", nil)
	if resp, err := hc.Do(req); err == nil {
		resp.Body.Close()
	}
	var server, client sdktrace.ReadOnlySpan
	testutil.Eventually(t, 30*time.Second, "the Register call's client and server spans", func() bool {
		server, client = nil, nil
		for _, s := range exp.GetSpans().Snapshots() {
			if s.SpanContext().TraceID() != root.SpanContext().TraceID() {
				continue
			}
			switch {
			case s.SpanKind() == trace.SpanKindServer && s.Name() == "beacon.v1.RegistryService/Register":
				server = s
			case s.SpanKind() == trace.SpanKindClient && client == nil:
				client = s
			}
		}
		return server != nil && client != nil
	})
	if server.Parent().SpanID() != client.SpanContext().SpanID() {
		t.Errorf("the server span's parent is not the caller's client span: trace context did not propagate")
	}
	testutil.Eventually(t, 30*time.Second, "the unknown path's span", func() bool {
		for _, s := range exp.GetSpans().Snapshots() {
			if s.SpanKind() != trace.SpanKindServer {
				continue
			}
			if s.Name() == "/no/such/path-12345" || s.Name() == "GET /no/such/path-12345" {
				t.Fatalf("a raw path named a span: %q", s.Name())
			}
			if s.Name() == "HTTP GET" {
				return true
			}
		}
		return false
	})
}

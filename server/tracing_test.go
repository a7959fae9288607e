package server_test

import (
	"context"
	"net/http"
	"strings"
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
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
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

// The SDK's registry client passes its caller's trace on: the server's
// span of a call made under a span joins that span's trace.
func TestSDKCallsJoinTheCallersTrace(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	t.Cleanup(func() { tp.Shutdown(context.Background()) })
	cfg := servertest.Config(t, "")
	cfg.TracerProvider = tp
	srv := servertest.Start(t, cfg)
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ctx, root := tp.Tracer("test").Start(ctx, "app.startup")
	if _, err := c.Register(ctx, registry.Instance{Service: "orders", ID: "o-1", Address: "127.0.0.1", Port: 9000}); err != nil {
		t.Fatal(err)
	}
	root.End()
	testutil.Eventually(t, 30*time.Second, "the server's Register span in the application's trace", func() bool {
		for _, s := range exp.GetSpans().Snapshots() {
			if s.SpanKind() == trace.SpanKindServer && s.Name() == "beacon.v1.RegistryService/Register" {
				return s.SpanContext().TraceID() == root.SpanContext().TraceID() && s.Parent().SpanID() == root.SpanContext().SpanID()
			}
		}
		return false
	})
}

// The Consul-compatible API's requests are spans too, named by route.
func TestConsulRequestsAreTraced(t *testing.T) {
	exp := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	t.Cleanup(func() { tp.Shutdown(context.Background()) })
	cfg := servertest.Config(t, "")
	cfg.TracerProvider = tp
	cfg.Consul.Addr = "127.0.0.1:0"
	srv := servertest.Start(t, cfg)
	for _, path := range []string{"/v1/catalog/service/orders", "/v1/no/such/path-12345"} {
		resp, err := http.Get("http://" + srv.ConsulAddr() + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
	}
	testutil.Eventually(t, 30*time.Second, "the Consul requests' spans", func() bool {
		var route, unknown bool
		for _, s := range exp.GetSpans().Snapshots() {
			switch s.Name() {
			case "consul GET /v1/catalog/service/{name}":
				route = s.SpanKind() == trace.SpanKindServer
			case "consul /": // the catch-all route's answer to a path with none
				unknown = true
			default:
				if strings.Contains(s.Name(), "12345") || strings.Contains(s.Name(), "orders") {
					t.Fatalf("a raw path named a span: %q", s.Name())
				}
			}
		}
		return route && unknown
	})
}

package lifecycle_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	testpb "google.golang.org/grpc/interop/grpc_testing"

	"beacon.dev/beacon/backend/memory"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/lifecycle"
	"beacon.dev/beacon/registry"
)

// Left nil, HTTPHealth is made by Run and wraps the server's handler: the
// probes answer and every other request reaches the handler.
func TestNilHTTPHealthIsWired(t *testing.T) {
	reg := memory.New("")
	defer reg.Close()
	ln := listen(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	mux := http.NewServeMux()
	mux.HandleFunc("/hello", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello") })
	done := make(chan error, 1)
	go func() {
		_, err := lifecycle.Run(ctx, lifecycle.Config{Backend: reg, Instance: registry.Instance{Service: "web"},
			HTTP: &http.Server{Handler: mux}, HTTPListener: ln})
		done <- err
	}()
	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + ln.Addr().String() + path)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	testutil.Eventually(t, 30*time.Second, "/readyz answers 200", func() bool {
		code, _ := get("/readyz")
		return code == http.StatusOK
	})
	if code, body := get("/hello"); code != http.StatusOK || body != "hello" {
		t.Errorf("GET /hello = %d %q, want the handler's answer", code, body)
	}
	if code, body := get("/livez"); code != http.StatusOK || !strings.Contains(body, "SERVING") {
		t.Errorf("GET /livez = %d %q", code, body)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run = %v", err)
	}
}

// recordHandler keeps the messages logged.
type recordHandler struct {
	mu   sync.Mutex
	msgs []string
}

func (h *recordHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *recordHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	h.msgs = append(h.msgs, r.Message)
	h.mu.Unlock()
	return nil
}
func (h *recordHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *recordHandler) WithGroup(string) slog.Handler      { return h }

func (h *recordHandler) count(sub string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, m := range h.msgs {
		if strings.Contains(m, sub) {
			n++
		}
	}
	return n
}

// A wrong registry address: every failed attempt is logged, and a run
// that stops without ever registering says why instead of returning nil.
func TestWrongRegistryAddressIsReported(t *testing.T) {
	c := newClient(t, testutil.FreeAddr(t)) // nobody listens there
	ln := listen(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	logs := &recordHandler{}
	type result struct {
		rep lifecycle.Report
		err error
	}
	done := make(chan result, 1)
	go func() {
		rep, err := lifecycle.Run(ctx, lifecycle.Config{Client: c, Instance: registry.Instance{Service: "web"},
			HTTP: &http.Server{Handler: http.NotFoundHandler()}, HTTPListener: ln, Logger: slog.New(logs)})
		done <- result{rep, err}
	}()
	testutil.Eventually(t, 30*time.Second, "two failed attempts logged", func() bool {
		return logs.count("registry unreachable") >= 2
	})
	cancel()
	r := <-done
	if !errors.Is(r.err, client.ErrUnavailable) || !strings.Contains(r.err.Error(), "before any registration was confirmed") {
		t.Errorf("Run = %v, want an error saying it never registered, wrapping ErrUnavailable", r.err)
	}
	if r.rep.RegisterAttempts < 2 || r.rep.RegisterErr == nil || len(r.rep.Registered) != 0 {
		t.Errorf("report: %d attempts, last error %v, registered %v", r.rep.RegisterAttempts, r.rep.RegisterErr, r.rep.Registered)
	}
}

// grpc-health-probe -service=NAME works for the beacon service's name and
// for each gRPC service the server carries.
func TestNamedGRPCHealthServices(t *testing.T) {
	reg := memory.New("")
	defer reg.Close()
	ln := listen(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s := grpc.NewServer()
	testpb.RegisterTestServiceServer(s, testpb.UnimplementedTestServiceServer{})
	done := make(chan error, 1)
	go func() {
		_, err := lifecycle.Run(ctx, lifecycle.Config{Backend: reg, Instance: registry.Instance{Service: "echo"}, GRPC: s, GRPCListener: ln})
		done <- err
	}()
	conn, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	for _, name := range []string{"", "echo", "grpc.testing.TestService"} {
		testutil.Eventually(t, 30*time.Second, "health of "+name+" is SERVING", func() bool {
			resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: name})
			return err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING
		})
	}
	if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: "nosuch"}); err == nil {
		t.Error("health of an unknown service answered")
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run = %v", err)
	}
}

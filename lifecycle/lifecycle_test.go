package lifecycle_test

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"

	"beacon.dev/beacon/backend/memory"
	"beacon.dev/beacon/beaconhttp"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/lifecycle"
	"beacon.dev/beacon/registry"
)

func listen(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

func newClient(t *testing.T, addr string) *client.Client {
	t.Helper()
	c, err := client.New([]string{addr})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestConfigErrorsNameTheField(t *testing.T) {
	c := newClient(t, "127.0.0.1:1")
	ln := listen(t)
	defer ln.Close()
	for _, tc := range []struct {
		cfg   lifecycle.Config
		field string
	}{
		{lifecycle.Config{Instance: registry.Instance{Service: "a"}, GRPC: grpc.NewServer(), GRPCListener: ln}, "Client/Backend"},
		{lifecycle.Config{Client: c, Instance: registry.Instance{Service: "a"}}, "GRPC/HTTP"},
		{lifecycle.Config{Client: c, Instance: registry.Instance{Service: "a"}, GRPC: grpc.NewServer()}, "listeners"},
		{lifecycle.Config{Client: c, Instance: registry.Instance{Service: "A!"}, GRPC: grpc.NewServer(), GRPCListener: ln}, "Instance.Service"},
	} {
		_, err := lifecycle.Run(context.Background(), tc.cfg)
		if err == nil || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("Run(%+v) = %v, want an error naming %s", tc.cfg, err, tc.field)
		}
	}
}

// A process with both servers registers one instance per protocol only
// once ready, drains on cancellation and leaves nothing behind.
func TestRunBothServers(t *testing.T) {
	srv := testutil.StartBeacon(t)
	c := newClient(t, srv.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	health := new(beaconhttp.Health)
	mux := http.NewServeMux()
	mux.Handle("/", health.Handler())
	grpcLn, httpLn := listen(t), listen(t)
	ready := make(chan struct{})
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	type result struct {
		rep lifecycle.Report
		err error
	}
	done := make(chan result, 1)
	go func() {
		rep, err := lifecycle.Run(runCtx, lifecycle.Config{
			Client: c, Instance: registry.Instance{Service: "orders", Zone: "z1"},
			GRPC: grpc.NewServer(), GRPCListener: grpcLn,
			HTTP: &http.Server{Handler: mux}, HTTPListener: httpLn, HTTPHealth: health,
			Ready: func(context.Context) error {
				select {
				case <-ready:
					return nil
				default:
					return errors.New("not yet")
				}
			},
			// Generous: the drain's DRAINING Register must fit in AckTimeout
			// (or DrainErr is set), and a session that lapsed under load would
			// re-register behind the test's back. Nobody watches, so the
			// acknowledgement wait itself returns at once.
			ReadyInterval: 20 * time.Millisecond, SessionTTL: 30 * time.Second, AckTimeout: 30 * time.Second,
		})
		done <- result{rep, err}
	}()

	readyz := func() int {
		resp, err := http.Get("http://" + httpLn.Addr().String() + "/readyz")
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	testutil.Eventually(t, 30*time.Second, "the HTTP server answers", func() bool { return readyz() != 0 })
	if code := readyz(); code != http.StatusServiceUnavailable {
		t.Fatalf("/readyz before ready = %d, want 503", code)
	}
	time.Sleep(200 * time.Millisecond)
	if snap, err := c.Instances(ctx, "orders", client.All()); err != nil || len(snap.Instances) != 0 {
		t.Fatalf("registered before ready: %+v, %v", snap, err)
	}
	close(ready)
	testutil.Eventually(t, 30*time.Second, "both instances registered", func() bool {
		a, err1 := c.Instances(ctx, "orders")
		b, err2 := c.Instances(ctx, "orders-http")
		return err1 == nil && err2 == nil && len(a.Instances) == 1 && len(b.Instances) == 1
	})
	a, _ := c.Instances(ctx, "orders")
	b, _ := c.Instances(ctx, "orders-http")
	if got := a.Instances[0]; got.Zone != "z1" || got.Port != grpcLn.Addr().(*net.TCPAddr).Port {
		t.Errorf("gRPC instance %+v", got)
	}
	if got := b.Instances[0]; got.ID != a.Instances[0].ID || got.Port != httpLn.Addr().(*net.TCPAddr).Port {
		t.Errorf("HTTP instance %+v, want the gRPC one's ID and the HTTP port", got)
	}
	if code := readyz(); code != http.StatusOK {
		t.Fatalf("/readyz when serving = %d", code)
	}

	stop()
	var res result
	select {
	case res = <-done:
	case <-ctx.Done():
		t.Fatal("Run did not return after cancellation")
	}
	if res.err != nil || !res.rep.StopClean || len(res.rep.Registered) != 2 || res.rep.DrainErr != nil {
		t.Fatalf("Run = %+v, %v", res.rep, res.err)
	}
	for _, svc := range []string{"orders", "orders-http"} {
		if snap, err := c.Instances(ctx, svc, client.All()); err != nil || len(snap.Instances) != 0 {
			t.Errorf("%s after stop: %+v, %v", svc, snap, err)
		}
	}
	if health.State() != beaconhttp.Stopped {
		t.Errorf("health state %v after Run", health.State())
	}
}

// With the registry unreachable at start, the service serves unregistered
// and registers as soon as the registry is back.
func TestRegistersOnceTheRegistryIsBack(t *testing.T) {
	srv := testutil.StartBeacon(t)
	proxy := testutil.NewProxy(t, srv.Addr())
	proxy.SetDown(true)
	c := newClient(t, proxy.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	var states []beaconhttp.State
	logs := &recordHandler{}
	go func() {
		_, err := lifecycle.Run(runCtx, lifecycle.Config{
			Client: c, Instance: registry.Instance{Service: "orders"},
			GRPC: grpc.NewServer(), GRPCListener: listen(t), SessionTTL: 3 * time.Second,
			OnState: func(s beaconhttp.State) { states = append(states, s) },
			Logger:  slog.New(logs),
		})
		done <- err
	}()
	testutil.Eventually(t, 30*time.Second, "a failed attempt", func() bool { return logs.count("registry unreachable") > 0 })
	proxy.SetDown(false)
	direct := newClient(t, srv.Addr())
	testutil.Eventually(t, 30*time.Second, "registered once the registry is back", func() bool {
		snap, err := direct.Instances(ctx, "orders")
		return err == nil && len(snap.Instances) == 1 && logs.count("lifecycle: registered") == 1
	})
	stop()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	want := []beaconhttp.State{beaconhttp.Starting, beaconhttp.Serving, beaconhttp.Draining, beaconhttp.Stopped}
	if len(states) != len(want) {
		t.Fatalf("states %v, want %v", states, want)
	}
	for i := range want {
		if states[i] != want[i] {
			t.Fatalf("states %v, want %v", states, want)
		}
	}
}

// Any backend: here the in-memory registry (no acknowledgements: the drain
// waits DrainDelay only).
func TestRunOnAnotherBackend(t *testing.T) {
	reg := memory.New("")
	defer reg.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	var rep lifecycle.Report
	go func() {
		var err error
		rep, err = lifecycle.Run(runCtx, lifecycle.Config{
			Backend: reg, Instance: registry.Instance{Service: "orders"},
			GRPC: grpc.NewServer(), GRPCListener: listen(t), SessionTTL: 2 * time.Second,
			DrainDelay: 100 * time.Millisecond,
		})
		done <- err
	}()
	testutil.Eventually(t, 30*time.Second, "registered in memory", func() bool {
		snap, err := reg.Instances(ctx, "orders")
		return err == nil && len(snap.Instances) == 1 && snap.Instances[0].Status == registry.StatusUp
	})
	stop()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if snap, _ := reg.Instances(ctx, "orders"); len(snap.Instances) != 0 {
		t.Errorf("still registered after the stop: %v", snap.Instances)
	}
	if rep.AckWait < 100*time.Millisecond || rep.Acks.Watchers != 0 {
		t.Errorf("report %+v: want the drain delay and no acknowledgements", rep)
	}
	_, err := lifecycle.Run(ctx, lifecycle.Config{Backend: reg, Client: newClient(t, "127.0.0.1:1"), Instance: registry.Instance{Service: "orders"},
		GRPC: grpc.NewServer(), GRPCListener: listen(t)})
	if err == nil || !strings.Contains(err.Error(), "Client/Backend") {
		t.Errorf("both Client and Backend: %v", err)
	}
}

// A worker runs beside the server until the drain: its context ends only
// once the instance is DRAINING, and Run returns after it finished, with
// an error it returned then in the report. A worker that fails before
// stops the service with its error.
func TestWorkersStopWithTheDrain(t *testing.T) {
	reg := memory.New("")
	defer reg.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	runCtx, stop := context.WithCancel(ctx)
	var state atomic.Value
	state.Store(beaconhttp.Starting)
	var stateAtStop atomic.Value
	finished := make(chan struct{})
	done := make(chan error, 1)
	var rep lifecycle.Report
	lastCommit := errors.New("the last commit failed")
	go func() {
		var err error
		rep, err = lifecycle.Run(runCtx, lifecycle.Config{
			Backend: reg, Instance: registry.Instance{Service: "tracking"},
			GRPC: grpc.NewServer(), GRPCListener: listen(t),
			OnState: func(s beaconhttp.State) { state.Store(s) },
			Workers: []func(context.Context) error{func(ctx context.Context) error {
				<-ctx.Done()
				stateAtStop.Store(state.Load())
				close(finished) // the worker's own drain
				return lastCommit
			}},
		})
		done <- err
	}()
	testutil.Eventually(t, 30*time.Second, "registered", func() bool {
		snap, err := reg.Instances(ctx, "tracking")
		return err == nil && len(snap.Instances) == 1
	})
	stop()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	select {
	case <-finished:
	default:
		t.Fatal("Run returned before its worker finished")
	}
	if got := stateAtStop.Load(); got != beaconhttp.Draining {
		t.Errorf("the worker was stopped in state %v, want DRAINING", got)
	}
	if !errors.Is(rep.WorkerErr, lastCommit) {
		t.Errorf("Report.WorkerErr = %v, want the worker's error during the drain", rep.WorkerErr)
	}

	boom := errors.New("broker gone")
	_, err := lifecycle.Run(ctx, lifecycle.Config{
		Backend: reg, Instance: registry.Instance{Service: "tracking"},
		GRPC: grpc.NewServer(), GRPCListener: listen(t),
		Workers: []func(context.Context) error{func(context.Context) error { return boom }},
	})
	if !errors.Is(err, boom) || !strings.Contains(err.Error(), "worker 0") {
		t.Errorf("Run with a failing worker = %v, want its error", err)
	}

	// Two workers failing at once: one error stops the service, the other
	// (sent before the drain began, read after) is the report's — neither
	// is lost, whichever comes first.
	other := errors.New("dead-letter topic gone")
	for range 20 {
		rep, err := lifecycle.Run(ctx, lifecycle.Config{
			Backend: reg, Instance: registry.Instance{Service: "tracking"},
			GRPC: grpc.NewServer(), GRPCListener: listen(t),
			Workers: []func(context.Context) error{
				func(context.Context) error { return boom },
				func(context.Context) error { return other },
			},
		})
		if !(errors.Is(err, boom) && errors.Is(rep.WorkerErr, other) || errors.Is(err, other) && errors.Is(rep.WorkerErr, boom)) {
			t.Fatalf("two failing workers: Run = %v, Report.WorkerErr = %v; want one each", err, rep.WorkerErr)
		}
	}
}

package health

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"beacon.dev/beacon/internal/testutil/blackhole"
	"beacon.dev/beacon/registry"
)

// eventually polls cond until it holds or timeout passes (testutil, which
// imports the server, would make an import cycle here).
func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// An accepting listener whose connections stay open until the test ends.
func acceptingListener(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c)
		}
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return ln.Addr().String()
}

func TestConnLimiter(t *testing.T) {
	addr := acceptingListener(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	l := newConnLimiter(2)
	a, err := l.dial(ctx, nil, 30*time.Second, "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	b, err := l.dial(ctx, nil, 30*time.Second, "tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	if n := l.inUse(); n != 2 {
		t.Errorf("inUse() = %d, want 2", n)
	}
	_, err = l.dial(ctx, nil, 30*time.Second, "tcp", addr)
	var le *connLimitError
	if !errors.As(err, &le) || !strings.Contains(err.Error(), "--check-max-conns 2") {
		t.Fatalf("dial at the limit: err = %v, want a *connLimitError naming --check-max-conns 2", err)
	}
	a.Close()
	a.Close() // a second Close gives nothing back twice
	if n := l.inUse(); n != 1 {
		t.Errorf("inUse() after closing one twice = %d, want 1", n)
	}
	c, err := l.dial(ctx, nil, 30*time.Second, "tcp", addr)
	if err != nil {
		t.Fatalf("dial after a Close: %v", err)
	}

	// At the limit, the longest idle prober gives its connection up; the
	// dialing one is spared.
	idleB := &fakeIdler{conn: b}
	idleC := &fakeIdler{conn: c}
	l.markIdle(idleB)
	l.markIdle(idleC)
	d, err := l.dial(ctx, idleB, 30*time.Second, "tcp", addr)
	if err != nil {
		t.Fatalf("dial at the limit with idle connections: %v", err)
	}
	if idleB.closed || !idleC.closed {
		t.Errorf("evicted: self %v, other %v; want the other only", idleB.closed, idleC.closed)
	}
	l.markBusy(idleB)
	if _, err := l.dial(ctx, nil, 30*time.Second, "tcp", addr); !errors.As(err, &le) {
		t.Errorf("dial at the limit, nothing idle: err = %v, want a *connLimitError", err)
	}
	b.Close()
	d.Close()
	if n := l.inUse(); n != 0 {
		t.Errorf("inUse() after closing all = %d, want 0", n)
	}
}

type fakeIdler struct {
	conn   net.Conn
	closed bool
}

func (f *fakeIdler) closeIdle() { f.closed = true; f.conn.Close() }

// Each prober's dial goes through the cap: at the limit, the probe gets
// no verdict and says why.
func TestProbeAtTheLimitGivesNoVerdict(t *testing.T) {
	addr := acceptingListener(t)
	for _, kind := range []registry.CheckKind{registry.CheckHTTP, registry.CheckTCP, registry.CheckGRPC} {
		t.Run(kind.String(), func(t *testing.T) {
			l := newConnLimiter(1)
			if !l.acquire() { // the only slot is taken
				t.Fatal("acquire() = false on an empty limiter")
			}
			spec := registry.Check{Kind: kind, Interval: time.Second, Timeout: 5 * time.Second}
			target := addr
			if kind == registry.CheckHTTP {
				target = "http://" + addr + "/healthz"
			}
			p := newProber(spec, target, nil, l)
			defer p.close()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			v, out := p.probe(ctx)
			if v != noVerdict || !strings.Contains(out, "--check-max-conns 1") {
				t.Errorf("probe() = %v, %q; want no verdict, naming --check-max-conns 1", v, out)
			}
		})
	}
}

// A probe to a host that drops SYNs ends with its timeout, dial included:
// once it has returned, no dial of it lingers (net/http dials on after the
// request is cancelled; gRPC's connect deadline is 20 s or more).
func TestProbeLeavesNoDialBehind(t *testing.T) {
	addr := blackhole.Listener(t)
	for _, kind := range []registry.CheckKind{registry.CheckHTTP, registry.CheckTCP, registry.CheckGRPC} {
		t.Run(kind.String(), func(t *testing.T) {
			l := newConnLimiter(DefaultMaxConns)
			spec := registry.Check{Kind: kind, Interval: time.Second, Timeout: 100 * time.Millisecond}
			target := addr
			if kind == registry.CheckHTTP {
				target = "http://" + addr + "/healthz"
			}
			p := newProber(spec, target, nil, l)
			defer p.close()
			for range 3 {
				ctx, cancel := context.WithTimeout(context.Background(), spec.Timeout)
				v, out := p.probe(ctx)
				cancel()
				if v != fail {
					t.Fatalf("probe() = %v, %q; want a failure", v, out)
				}
			}
			eventually(t, 30*time.Second, "no probe connection open or dialing", func() bool { return l.inUse() == 0 })
		})
	}
}

// A refused probe leaves the check's counters alone: the limit is the
// server's, and must not turn targets CRITICAL.
func TestRefusedProbeMovesNoCounter(t *testing.T) {
	c := New(Config{})
	st := &state{spec: registry.Check{Kind: registry.CheckHTTP, FailuresBeforeCritical: 1, SuccessesBeforePassing: 1},
		status: registry.HealthPassing, successes: 3, running: true, index: -1}
	c.handle(context.Background(), result{st: st, refused: true, output: "health: probe connections at the limit (--check-max-conns 1)"})
	if st.running || st.failures != 0 || st.successes != 3 || st.status != registry.HealthPassing || st.writing {
		t.Errorf("after a refused probe: running %v, failures %d, successes %d, status %v, writing %v; want false, 0, 3, PASSING, false",
			st.running, st.failures, st.successes, st.status, st.writing)
	}
}

// The gRPC prober talks to a real health server, keeps its channel while
// the target answers and drops it when a probe fails.
func TestGRPCProberKeepsItsChannelWhileHealthy(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	hs := health.NewServer()
	healthpb.RegisterHealthServer(gs, hs)
	done := make(chan struct{})
	go func() { defer close(done); gs.Serve(ln) }()
	defer func() { gs.Stop(); <-done }()

	l := newConnLimiter(4)
	p := newProber(registry.Check{Kind: registry.CheckGRPC, Interval: 30 * time.Second, Timeout: 30 * time.Second}, ln.Addr().String(), nil, l)
	defer p.close()
	probe := func() verdict {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		v, _ := p.probe(ctx)
		return v
	}
	for range 3 {
		if v := probe(); v != pass {
			t.Fatalf("probe() = %v, want pass", v)
		}
	}
	if n := l.inUse(); n != 1 {
		t.Errorf("inUse() after 3 probes = %d, want 1 (one channel kept)", n)
	}
	p.close()
	eventually(t, 30*time.Second, "the closed prober's connection released", func() bool { return l.inUse() == 0 })
}

package health_test

import (
	"context"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m, testutil.LeakOptions()...) }

// A target that hangs: its check goes CRITICAL after its failures, and the
// probes never pile up at the target — one at a time, each cut at its
// timeout.
func TestHungTargetDoesNotPileUpProbes(t *testing.T) {
	srv := testutil.StartServer(t, testutil.ServerConfig(t, ""))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var inflight, peak, total atomic.Int64
	release := make(chan struct{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		total.Add(1)
		n := inflight.Add(1)
		defer inflight.Add(-1)
		for {
			p := peak.Load()
			if n <= p || peak.CompareAndSwap(p, n) {
				break
			}
		}
		select { // hang until the probe gives up (or the test ends)
		case <-r.Context().Done():
		case <-release:
		}
	})}
	go hs.Serve(ln)
	defer hs.Close()
	defer close(release)
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	in := registry.Instance{Service: "slow", ID: "s-1", Address: "127.0.0.1", Port: port, Checks: []registry.Check{{
		Kind: registry.CheckHTTP, Interval: 200 * time.Millisecond, Timeout: 100 * time.Millisecond, FailuresBeforeCritical: 2}}}
	if _, err := c.Register(ctx, in); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 10*time.Second, "the hung target's check is CRITICAL", func() bool {
		snap, err := c.Instances(ctx, "slow", client.All())
		return err == nil && len(snap.Instances) == 1 && snap.Instances[0].Health == registry.HealthCritical
	})
	time.Sleep(time.Second)
	if p := peak.Load(); p > 1 {
		t.Errorf("%d probes were at the hung target at once, want 1", p)
	}
	if n := total.Load(); n > 12 {
		t.Errorf("%d probes in ~1.5 s at a 200 ms interval: they pile up", n)
	}
	snap, _ := c.Instances(ctx, "slow", client.All())
	if out := snap.Instances[0].Checks[0].Output; out == "" {
		t.Error("a critical check carries no output")
	} else {
		t.Logf("output: %s", out)
	}
}

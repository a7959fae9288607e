package e2e

import (
	"context"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/servertest"
)

// A gray failure: the server node that live instances use for their
// sessions, calls and watches is frozen (SIGSTOP) for 60 s — it accepts
// connections and answers nothing. Nobody may lose a session over it:
// the instances' heartbeats, a registration, a watch and a drain all move
// to the healthy nodes while it is frozen. The figures (how long the
// registration took, when the watch moved, the drain's ack wait) are
// logged; the assertions are about what happened before the node was
// resumed. The session TTL (10 s) stays below the freeze, so a session
// left on the frozen node would expire; the freeze is long enough for
// each step to get 30 s or more.
func TestFrozenServerCostsNoSession(t *testing.T) {
	const ttl, freeze, ackTimeout = 10 * time.Second, 60 * time.Second, 15 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	ms := startCluster(t, 3)
	// The harder case: the frozen node also hosts the etcd leader, so the
	// cluster elects another while the clients move.
	leader := servertest.Leader(ctx, t, ms)
	for i, nd := range ms {
		if nd == leader {
			ms[0], ms[i] = ms[i], ms[0]
		}
	}
	frozen, healthy := ms[0], ms[1:]
	servers := strings.Join(testutil.APIs(ms, 0), ",") // the frozen node first

	// Three instances that stay, and one that is stopped during the freeze.
	live := []string{"e0", "e1", "e2"}
	var echos []*echoProc
	for _, id := range live {
		echos = append(echos, startEcho(t, servers, "--service", "gray", "--id", id, "--ttl", ttl.String()))
	}
	leaving := startEcho(t, servers, "--service", "gray", "--id", "e3", "--ttl", ttl.String(), "--ack-timeout", ackTimeout.String())

	// Sessions as the healthy nodes see them before the freeze.
	var observers []*client.Client
	for _, nd := range healthy {
		observers = append(observers, newClient(t, nd.API))
	}
	sessions := map[string]int64{}
	testutil.Eventually(t, 60*time.Second, "both healthy nodes list the four instances", func() bool {
		for _, o := range observers {
			snap, err := o.Instances(ctx, "gray", client.All())
			if err != nil || len(snap.Instances) != 4 {
				return false
			}
			for _, in := range snap.Instances {
				sessions[in.ID] = in.SessionID
			}
		}
		return true
	})

	// A watcher and a writer whose streams and calls go to the frozen node
	// first. The watcher acknowledges what it applies, for the drain.
	wc := newClient(t, testutil.APIs(ms, 0)...)
	w := watch(ctx, t, wc, "gray")
	waitInstances(ctx, t, w, "gray", "e0", "e1", "e2", "e3")
	var seenMu sync.Mutex
	seen := map[string]time.Time{} // instance id → first seen by the watcher
	go func() {
		for {
			snaps, err := w.Next(ctx)
			if err != nil {
				return
			}
			seenMu.Lock()
			for _, s := range snaps {
				for _, in := range s.Instances {
					if _, ok := seen[in.ID]; !ok {
						seen[in.ID] = time.Now()
					}
				}
			}
			seenMu.Unlock()
		}
	}()
	writer := newClient(t, testutil.APIs(ms, 0)...)
	if _, err := writer.Services(ctx); err != nil { // its calls now go to the frozen node
		t.Fatal(err)
	}

	frozen.Freeze(t)
	frozenAt := time.Now()
	resumed := false
	defer func() {
		if !resumed {
			frozen.Signal(syscall.SIGCONT)
		}
	}()

	// A registration issued during the freeze.
	registered := make(chan time.Duration, 1)
	go func() {
		start := time.Now()
		_, err := writer.Register(ctx, registry.Instance{Service: "gray", ID: "during", Address: "127.0.0.1", Port: 9999})
		if err != nil {
			t.Errorf("registration during the freeze: %v", err)
		}
		registered <- time.Since(start)
	}()
	// A drain during the freeze, once the watcher has moved to a healthy
	// node (where its acknowledgement can be counted).
	testutil.Eventually(t, 30*time.Second, "the watcher sees the registration made during the freeze", func() bool {
		seenMu.Lock()
		defer seenMu.Unlock()
		_, ok := seen["during"]
		return ok
	})
	testutil.Eventually(t, 30*time.Second, "the watcher streams from a healthy node", func() bool {
		st := w.Status()
		return st.Connected && st.Server != frozen.API
	})
	leaving.signal(syscall.SIGTERM)

	// For the whole freeze, every live instance is listed by both healthy
	// nodes, on the session it had, not suspect.
	missing, polls := 0, 0
	for time.Since(frozenAt) < freeze {
		for i, o := range observers {
			snap, err := o.Instances(ctx, "gray", client.All())
			if err != nil {
				t.Errorf("listing on healthy node %s: %v", healthy[i].Name, err)
				continue
			}
			polls++
			byID := map[string]*registry.Instance{}
			for _, in := range snap.Instances {
				byID[in.ID] = in
			}
			for _, id := range live {
				in, ok := byID[id]
				if !ok || in.SessionID != sessions[id] || in.Suspect {
					if missing++; missing <= 5 {
						t.Errorf("%.1fs into the freeze, %s lists %s as %+v (present %v), want it on session %d", time.Since(frozenAt).Seconds(), healthy[i].Name, id, in, ok, sessions[id])
					}
				}
			}
		}
		time.Sleep(250 * time.Millisecond)
	}

	// Everything below happened while the node was still frozen.
	var regTook time.Duration
	select {
	case regTook = <-registered:
	default:
		t.Error("the registration issued during the freeze had not returned when the freeze ended")
	}
	select {
	case <-leaving.done:
	default:
		t.Error("the instance stopped during the freeze had not exited when the freeze ended")
	}
	seenMu.Lock()
	watchMoved, ok := seen["during"]
	seenMu.Unlock()
	if !ok {
		t.Errorf("the watcher that started on the frozen node never saw the registration made during the freeze (status %+v)", w.Status())
	}
	frozen.Signal(syscall.SIGCONT)
	resumed = true
	rep := leaving.stopReport(t)
	if missing > 0 {
		t.Errorf("%d times a live instance was missing, suspect or on another session (first 5 above)", missing)
	}
	if rep.Unreachable != 1 || rep.Watchers < 1 || rep.Acknowledged != rep.Watchers {
		t.Errorf("the drain saw %+v, want the frozen server unreachable and the moved watcher acknowledging", rep)
	}
	t.Logf("freeze %v at TTL %v: %d polls of the healthy nodes, %d live instances missing; registration took %v; the watch saw it %.1fs after the freeze began; the drain's ack wait %.0f ms (ack timeout %v, %d/%d watchers acknowledged, %d server unreachable)",
		freeze, ttl, polls, missing, regTook.Round(time.Millisecond), watchMoved.Sub(frozenAt).Seconds(), rep.AckWaitMS, ackTimeout, rep.Acknowledged, rep.Watchers, rep.Unreachable)
	for _, e := range echos {
		if out := e.output(); strings.Contains(out, "session expired") {
			t.Errorf("an instance lost its session:\n%s", out)
		}
	}
}

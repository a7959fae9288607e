package e2e

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime/pprof"
	"slices"
	"sync"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/servertest"
)

// recorder follows a watcher and checks every snapshot it hands out.
type recorder struct {
	name string
	w    *client.Watcher
	mu   sync.Mutex
	last map[string]int64 // guarded by mu
	errs []string         // guarded by mu
	n    int              // guarded by mu
}

func (r *recorder) run(ctx context.Context) {
	for {
		snaps, err := r.w.Next(ctx)
		if err != nil {
			return
		}
		r.mu.Lock()
		for _, s := range snaps {
			r.n++
			if s.Revision <= r.last[s.Service] {
				r.errs = append(r.errs, fmt.Sprintf("%s: %s went from revision %d to %d", r.name, s.Service, r.last[s.Service], s.Revision))
			}
			r.last[s.Service] = s.Revision
		}
		r.mu.Unlock()
	}
}

// Behaviour 3: watches never miss a change. 1,000 random registrations and
// deregistrations, interleaved with server restarts, cut client connections
// and a partition, end with every watcher holding exactly the server's
// state, with revisions strictly increasing per service.
func TestWatchersConvergeThroughDisconnects(t *testing.T) {
	const (
		ops      = 1000
		services = 8
		ids      = 10
	)
	cfg := servertest.Config(t, "")
	srv, err := servertest.StartErr(cfg)
	if err != nil {
		t.Fatal(err)
	}
	var srvMu sync.Mutex
	defer func() {
		srvMu.Lock()
		srv.Close()
		srvMu.Unlock()
	}()
	proxy := testutil.NewProxy(t, cfg.Addr)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	writer := newClient(t, cfg.Addr)
	svcName := func(i int) string { return fmt.Sprintf("svc-%d", i) }
	watchSets := [][]string{nil, nil, {svcName(0), svcName(1), svcName(2)}, {svcName(5)}}
	var recs []*recorder
	var wg sync.WaitGroup
	rctx, rcancel := context.WithCancel(ctx)
	for i, set := range watchSets {
		w, err := newClient(t, proxy.Addr()).Watch(ctx, set)
		if err != nil {
			t.Fatal(err)
		}
		r := &recorder{name: fmt.Sprintf("watcher %d %v", i, set), w: w, last: map[string]int64{}}
		recs = append(recs, r)
		wg.Add(1)
		go func() { defer wg.Done(); r.run(rctx) }()
	}
	defer func() {
		rcancel()
		wg.Wait()
		for _, r := range recs {
			r.w.Close()
		}
	}()

	// want is the model of what the registry holds: service -> id -> port.
	want := make(map[string]map[string]int)
	rng := rand.New(rand.NewPCG(1, 2))
	retry := func(what string, f func() error) {
		for {
			err := f()
			if err == nil {
				return
			}
			if !errors.Is(err, client.ErrUnavailable) || ctx.Err() != nil {
				t.Fatalf("%s: %v", what, err)
			}
			time.Sleep(20 * time.Millisecond) // the server is restarting
		}
	}
	disruptions := 0
	for op := range ops {
		svc, id := svcName(rng.IntN(services)), fmt.Sprintf("i-%d", rng.IntN(ids))
		if want[svc] == nil {
			want[svc] = map[string]int{}
		}
		if rng.IntN(3) > 0 {
			port := 1 + rng.IntN(60000)
			retry("register", func() error {
				_, err := writer.Register(ctx, registry.Instance{Service: svc, ID: id, Address: "127.0.0.1", Port: port})
				return err
			})
			want[svc][id] = port
		} else {
			retry("deregister", func() error { _, err := writer.Deregister(ctx, svc, id); return err })
			delete(want[svc], id)
		}
		if op%100 == 99 {
			disruptions++
			switch disruptions % 3 {
			case 0: // server restart: every stream breaks, the view is rebuilt
				srvMu.Lock()
				srv.Close()
				srv, err = servertest.StartErr(cfg)
				srvMu.Unlock()
				if err != nil {
					t.Fatalf("restarting server: %v", err)
				}
			case 1: // client-side connection drop
				proxy.Cut()
			case 2: // a partition while writes go on
				proxy.SetDown(true)
				for range 20 {
					s, i := svcName(rng.IntN(services)), fmt.Sprintf("i-%d", rng.IntN(ids))
					retry("register during partition", func() error {
						_, err := writer.Register(ctx, registry.Instance{Service: s, ID: i, Address: "127.0.0.1", Port: 7})
						return err
					})
					if want[s] == nil {
						want[s] = map[string]int{}
					}
					want[s][i] = 7
				}
				proxy.SetDown(false)
			}
		}
	}

	// Every watcher must converge on the model, and so must the server.
	for svc, m := range want {
		snap, err := writer.Instances(ctx, svc, client.All())
		if err != nil {
			t.Fatal(err)
		}
		if got := portsOf(snap); !mapsEqual(got, m) {
			t.Fatalf("server holds %s = %v, want %v", svc, got, m)
		}
	}
	for _, r := range recs {
		testutil.Eventually(t, 30*time.Second, r.name+" to converge", func() bool {
			for svc, m := range want {
				if r.w != nil && watches(watchSets, r, recs, svc) {
					s, ok := r.w.Snapshot(svc)
					if !ok && len(m) > 0 || ok && !mapsEqual(portsOf(s), m) {
						return false
					}
				}
			}
			return true
		})
		r.mu.Lock()
		if len(r.errs) > 0 {
			t.Errorf("%s saw revisions go backwards:\n%v", r.name, r.errs)
		}
		st := r.w.Status()
		t.Logf("%s: %d snapshots, %d reconnects", r.name, r.n, st.Reconnects)
		if st.Stale != 0 {
			t.Errorf("%s: the server sent %d stale snapshots", r.name, st.Stale)
		}
		if st.Reconnects < disruptions*2/3 {
			t.Errorf("%s reconnected %d times, want at least %d: the disruptions did not reach it", r.name, st.Reconnects, disruptions*2/3)
		}
		r.mu.Unlock()
	}
}

func watches(sets [][]string, r *recorder, recs []*recorder, svc string) bool {
	set := sets[slices.Index(recs, r)]
	return set == nil || slices.Contains(set, svc)
}

func portsOf(s *registry.Snapshot) map[string]int {
	m := map[string]int{}
	for _, in := range s.Instances {
		m[in.ID] = in.Port
	}
	return m
}

func mapsEqual(a, b map[string]int) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// Behaviour 8: 100 sessions registering 1,000 instances with 200 watchers
// on one server, all converging.
func TestScaleSmoke(t *testing.T) {
	const (
		sessions     = 100
		perSession   = 10
		watchers     = 200
		serviceCount = 10
	)
	srv := servertest.Start(t, servertest.Config(t, ""))
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	var ws []*client.Watcher
	for i := range watchers {
		// Like real clients, most watch the one service they call; some
		// (gateways, dashboards) watch everything.
		var set []string
		if i%20 != 0 {
			set = []string{fmt.Sprintf("svc-%d", i%serviceCount)}
		}
		w, err := newClient(t, srv.Addr()).Watch(ctx, set)
		if err != nil {
			t.Fatal(err)
		}
		defer w.Close()
		ws = append(ws, w)
	}
	var wg sync.WaitGroup
	errc := make(chan error, sessions)
	var sessMu sync.Mutex
	var all []*client.Session
	for s := range sessions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := client.New([]string{srv.Addr()})
			if err != nil {
				errc <- err
				return
			}
			sess, err := c.NewSession(ctx)
			if err != nil {
				errc <- err
				return
			}
			sessMu.Lock()
			all = append(all, sess)
			sessMu.Unlock()
			for i := range perSession {
				n := s*perSession + i
				in := registry.Instance{Service: fmt.Sprintf("svc-%d", n%serviceCount), ID: fmt.Sprintf("i-%d", n), Address: "127.0.0.1", Port: 1 + n}
				if _, err := sess.Register(ctx, in); err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	defer func() {
		for _, s := range all {
			s.Close(context.Background())
		}
	}()
	perService := sessions * perSession / serviceCount
	defer func() {
		if !t.Failed() {
			return
		}
		if f, err := os.Create("/tmp/goroutines.txt"); err == nil {
			pprof.Lookup("goroutine").WriteTo(f, 2)
			f.Close()
		}
		for i, w := range ws {
			var got []string
			for svc, s := range w.State() {
				got = append(got, fmt.Sprintf("%s=%d@%d", svc, len(s.Instances), s.Revision))
			}
			t.Logf("watcher %d: %v %+v", i, got, w.Status())
		}
	}()
	testutil.Eventually(t, 60*time.Second, "all watchers to converge", func() bool {
		for i, w := range ws {
			for svc := range serviceCount {
				if i%20 != 0 && svc != i%serviceCount {
					continue
				}
				s, ok := w.Snapshot(fmt.Sprintf("svc-%d", svc))
				if !ok || len(s.Instances) != perService {
					return false
				}
			}
		}
		return true
	})
	for _, w := range ws {
		if st := w.Status(); st.Stale != 0 {
			t.Errorf("watcher got %d stale snapshots", st.Stale)
		}
	}
}

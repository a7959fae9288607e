package balancer_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"

	"beacon.dev/beacon/balancer"
	"beacon.dev/beacon/balancer/random"
	"beacon.dev/beacon/balancer/roundrobin"
	"beacon.dev/beacon/balancer/wrr"
	"beacon.dev/beacon/endpoint"
	"beacon.dev/beacon/internal/chisq"
	"beacon.dev/beacon/outlier"
)

type spec struct {
	id, zone, version string
	weight, tier      int
}

func set(rev int64, specs ...spec) endpoint.Set {
	s := endpoint.Set{Service: "svc", Revision: rev}
	for i, sp := range specs {
		w := sp.weight
		if w == 0 {
			w = 100
		}
		s.Endpoints = append(s.Endpoints, &endpoint.Endpoint{
			ID: sp.id, Addr: fmt.Sprintf("127.0.0.1:%d", 20000+i), Weight: w, Zone: sp.zone, Version: sp.version, Tier: sp.tier,
		})
	}
	return s
}

func newBalancer(t *testing.T, b balancer.Builder, cfg balancer.Config, opts ...balancer.Option) *balancer.Balancer {
	t.Helper()
	opts = append([]balancer.Option{balancer.WithRand(seeded(11))}, opts...)
	bal, err := balancer.New(b, cfg, opts...)
	if err != nil {
		t.Fatalf("balancer.New() error = %v", err)
	}
	t.Cleanup(bal.Close)
	return bal
}

// share picks n times (finishing every call) and counts by ID.
func share(t *testing.T, bal *balancer.Balancer, n int) map[string]int {
	t.Helper()
	got := map[string]int{}
	for range n {
		e, err := bal.Pick(balancer.PickInfo{})
		if err != nil {
			t.Fatalf("Pick() error = %v", err)
		}
		got[e.ID]++
		e.Done(nil)
	}
	return got
}

func fit(t *testing.T, got map[string]int, want map[string]float64) {
	t.Helper()
	var obs []int
	var probs []float64
	for id, p := range want {
		obs = append(obs, got[id])
		probs = append(probs, p)
	}
	for id := range got {
		if _, ok := want[id]; !ok {
			t.Errorf("%s picked %d times, want never", id, got[id])
		}
	}
	if err := chisq.Fit(obs, probs); err != nil {
		t.Errorf("shares %v: %v", got, err)
	}
}

func TestNoEndpointsUntilUpdate(t *testing.T) {
	bal := newBalancer(t, roundrobin.Builder{}, balancer.Config{})
	if _, err := bal.Pick(balancer.PickInfo{}); !errors.Is(err, balancer.ErrNoEndpoint) {
		t.Fatalf("Pick() before Update = %v, want ErrNoEndpoint", err)
	}
	bal.Update(set(5, spec{id: "a"}))
	bal.Update(set(4, spec{id: "b"})) // older: ignored
	if got := share(t, bal, 3); got["a"] != 3 {
		t.Errorf("after an older update, picks = %v, want all on a", got)
	}
	bal.Update(set(6))
	if _, err := bal.Pick(balancer.PickInfo{}); !errors.Is(err, balancer.ErrNoEndpoint) {
		t.Errorf("Pick() after scale to zero = %v, want ErrNoEndpoint", err)
	}
}

func TestCanarySplit(t *testing.T) {
	bal := newBalancer(t, roundrobin.Builder{}, balancer.Config{Subsets: []balancer.Subset{
		{Name: "stable", Weight: 90, Match: balancer.Selector{Version: "v1"}},
		{Name: "canary", Weight: 10, Match: balancer.Selector{Version: "v2"}},
	}})
	bal.Update(set(1, spec{id: "s1", version: "v1"}, spec{id: "s2", version: "v1"}, spec{id: "c1", version: "v2"}))
	fit(t, share(t, bal, 20000), map[string]float64{"s1": 45, "s2": 45, "c1": 10})

	// A key always lands in the same subset.
	info := balancer.PickInfo{Key: balancer.HashKey("user-7"), HasKey: true}
	first, _ := bal.Pick(info)
	first.Done(nil)
	for range 50 {
		e, _ := bal.Pick(info)
		e.Done(nil)
		if (e.Version == "v2") != (first.Version == "v2") {
			t.Fatalf("key moved between subsets: %s then %s", first.ID, e.ID)
		}
	}

	// Without canary endpoints, stable takes everything.
	bal.Update(set(2, spec{id: "s1", version: "v1"}, spec{id: "s2", version: "v1"}))
	fit(t, share(t, bal, 1000), map[string]float64{"s1": 1, "s2": 1})
	st := bal.State()
	if len(st.Subsets) != 2 || st.Subsets[1].Endpoints != 0 {
		t.Errorf("State().Subsets = %+v, want canary with 0 endpoints", st.Subsets)
	}
}

// A pick reports the route and subset it was made on, with empty
// subsets (no endpoint matches) before and between the others.
func TestPickReportsItsRouteAndSubset(t *testing.T) {
	bal := newBalancer(t, roundrobin.Builder{}, balancer.Config{Subsets: []balancer.Subset{
		{Name: "ghost", Weight: 10, Match: balancer.Selector{Version: "v9"}},
		{Name: "stable", Weight: 50, Match: balancer.Selector{Version: "v1"}},
		{Name: "empty", Weight: 10, Match: balancer.Selector{Version: "v8"}},
		{Name: "canary", Weight: 50, Match: balancer.Selector{Version: "v2"}},
	}})
	bal.Update(set(7, spec{id: "s1", version: "v1"}, spec{id: "c1", version: "v2"}))
	seen := map[string]bool{}
	for range 200 {
		p, err := bal.Pick(balancer.PickInfo{})
		if err != nil {
			t.Fatal(err)
		}
		rev, sub := p.Route()
		want := map[string]string{"s1": "stable", "c1": "canary"}[p.ID]
		if rev != 7 || sub.Name != want || sub.Endpoints != 1 {
			t.Fatalf("pick %s: Route() = %d, %+v; want revision 7 and subset %s with 1 endpoint", p.ID, rev, sub, want)
		}
		seen[sub.Name] = true
		p.Done(nil)
	}
	if !seen["stable"] || !seen["canary"] {
		t.Errorf("subsets seen %v, want both", seen)
	}
	if rev, sub := (balancer.Pick{}).Route(); rev != 0 || sub.Name != "" {
		t.Errorf("the zero Pick's Route() = %d, %+v; want zeros", rev, sub)
	}
}

// ejectAll fails calls to the given endpoints until the detector ejects them.
func ejectAll(t *testing.T, bal *balancer.Balancer, ids ...string) {
	t.Helper()
	want := map[string]bool{}
	for _, id := range ids {
		want[id] = true
	}
	for i := 0; len(want) > 0 && i < 10000; i++ {
		e, err := bal.Pick(balancer.PickInfo{})
		if err != nil {
			t.Fatal(err)
		}
		e.Done(failIf(want[e.ID]))
		if want[e.ID] && bal.Outlier().Ejected(e.ID) {
			delete(want, e.ID)
		}
	}
	if len(want) > 0 {
		t.Fatalf("not ejected: %v", want)
	}
}

var testOutlier = outlier.Config{Interval: time.Hour, ConsecutiveFailures: 2, BaseEjection: time.Minute, MaxEjected: 1}

func TestBackupTierAndPanic(t *testing.T) {
	clock := clockwork.NewFakeClock()
	bal := newBalancer(t, roundrobin.Builder{}, balancer.Config{PanicThreshold: 0.5},
		balancer.WithClock(clock), balancer.WithOutlierDetection(testOutlier))
	bal.Update(set(1, spec{id: "p1"}, spec{id: "p2"}, spec{id: "p3"}, spec{id: "b1", tier: 1}, spec{id: "b2", tier: 1}))

	// Primaries healthy: backups idle.
	fit(t, share(t, bal, 3000), map[string]float64{"p1": 1, "p2": 1, "p3": 1})

	// One of three primaries out: still above the threshold.
	ejectAll(t, bal, "p1")
	fit(t, share(t, bal, 3000), map[string]float64{"p2": 1, "p3": 1})

	// Two of three out (33% < 50%): the backup tier takes over.
	ejectAll(t, bal, "p2")
	fit(t, share(t, bal, 3000), map[string]float64{"b1": 1, "b2": 1})
	if st := bal.State().Subsets[0]; st.Tier != 1 || st.Panic {
		t.Errorf("State() = %+v, want tier 1 without panic", st)
	}

	// A backup fails too (50% left is still enough) and then the other:
	// no tier is trusted, so panic spreads over everything.
	ejectAll(t, bal, "b1", "b2")
	fit(t, share(t, bal, 5000), map[string]float64{"p1": 1, "p2": 1, "p3": 1, "b1": 1, "b2": 1})
	if st := bal.State().Subsets[0]; !st.Panic {
		t.Errorf("State() = %+v, want panic", st)
	}

	// Ejections end: back to the primaries.
	clock.Advance(time.Minute)
	bal.Outlier().Sweep()
	fit(t, share(t, bal, 3000), map[string]float64{"p1": 1, "p2": 1, "p3": 1})
}

func TestZoneAware(t *testing.T) {
	clock := clockwork.NewFakeClock()
	bal := newBalancer(t, roundrobin.Builder{}, balancer.Config{Zone: "a", ZoneMinHealthy: 0.6},
		balancer.WithClock(clock), balancer.WithOutlierDetection(testOutlier))
	bal.Update(set(1, spec{id: "a1", zone: "a"}, spec{id: "a2", zone: "a"}, spec{id: "a3", zone: "a"},
		spec{id: "b1", zone: "b"}, spec{id: "b2", zone: "b"}))
	fit(t, share(t, bal, 3000), map[string]float64{"a1": 1, "a2": 1, "a3": 1})

	ejectAll(t, bal, "a1") // 2 of 3 local healthy ≥ 60%
	fit(t, share(t, bal, 3000), map[string]float64{"a2": 1, "a3": 1})

	ejectAll(t, bal, "a2") // 1 of 3 < 60%: every zone
	fit(t, share(t, bal, 3000), map[string]float64{"a3": 1, "b1": 1, "b2": 1})
	if st := bal.State().Subsets[0]; st.Local {
		t.Errorf("State() = %+v, want zone fallback", st)
	}
}

func TestZoneSpill(t *testing.T) {
	bal := newBalancer(t, roundrobin.Builder{}, balancer.Config{Zone: "a", ZoneSpill: 2})
	bal.Update(set(1, spec{id: "a1", zone: "a"}, spec{id: "b1", zone: "b"}))
	// Calls pile up in flight: a1 takes each one while it holds at most
	// 2 × (b1's + 1), and the next spills to b1.
	got := map[string]int{}
	for range 30 {
		e, err := bal.Pick(balancer.PickInfo{})
		if err != nil {
			t.Fatal(err)
		}
		got[e.ID]++
	}
	if got["a1"] != 21 || got["b1"] != 9 {
		t.Errorf("30 pending calls went %v, want a1:21 b1:9", got)
	}
}

func TestSlowStart(t *testing.T) {
	clock := clockwork.NewFakeClock()
	bal := newBalancer(t, random.Builder{}, balancer.Config{SlowStart: 100 * time.Second, SlowStartMin: 0.1},
		balancer.WithClock(clock))
	bal.Update(set(0)) // an empty first set (a cache not yet synced)
	bal.Update(set(1, spec{id: "old"}))
	if got := bal.State().Ramping; got != 0 {
		t.Errorf("State().Ramping = %d after the first endpoints, want 0", got)
	}
	bal.Update(set(2, spec{id: "old"}, spec{id: "new"}))
	// At once the newcomer has the minimum weight: 10 against 100.
	fit(t, share(t, bal, 20000), map[string]float64{"old": 100, "new": 10})
	if got := bal.State().Ramping; got != 1 {
		t.Errorf("State().Ramping = %d, want 1", got)
	}
	// Halfway through, linear ramp: 50 against 100.
	clock.Advance(50 * time.Second)
	bal.Update(set(2, spec{id: "old"}, spec{id: "new"}))
	fit(t, share(t, bal, 20000), map[string]float64{"old": 100, "new": 50})
	// Done ramping.
	clock.Advance(50 * time.Second)
	bal.Update(set(2, spec{id: "old"}, spec{id: "new"}))
	fit(t, share(t, bal, 20000), map[string]float64{"old": 1, "new": 1})
	if got := bal.State().Ramping; got != 0 {
		t.Errorf("State().Ramping = %d, want 0", got)
	}
}

func TestAvoidThePreviousEndpoint(t *testing.T) {
	bal := newBalancer(t, random.Builder{}, balancer.Config{})
	bal.Update(set(1, spec{id: "a"}, spec{id: "b"}))
	avoided := 0
	for range 1000 {
		e, err := bal.Pick(balancer.PickInfo{Avoid: "a"})
		if err != nil {
			t.Fatal(err)
		}
		if e.ID == "b" {
			avoided++
		}
		e.Done(nil)
	}
	// Four draws at 1/2 each: a is picked only when all four land on it.
	fit(t, map[string]int{"a": 1000 - avoided, "b": avoided}, map[string]float64{"a": 1.0 / 16, "b": 15.0 / 16})
	bal.Update(set(2, spec{id: "a"}))
	if e, err := bal.Pick(balancer.PickInfo{Avoid: "a"}); err != nil || e.ID != "a" {
		t.Errorf("Pick(avoid the only endpoint) = %v, %v; want it anyway", e, err)
	}
}

func TestRoundRobinNeverReturnsTheAvoidedEndpoint(t *testing.T) {
	bal := newBalancer(t, roundrobin.Builder{}, balancer.Config{})
	bal.Update(set(1, spec{id: "a"}, spec{id: "b"}, spec{id: "c"}))
	for range 1000 {
		e, err := bal.Pick(balancer.PickInfo{Avoid: "a"})
		if err != nil {
			t.Fatal(err)
		}
		if e.ID == "a" {
			t.Fatal("Pick(avoid a) = a")
		}
		e.Done(nil)
	}
}

func TestStatsSurviveUpdates(t *testing.T) {
	bal := newBalancer(t, wrr.Builder{}, balancer.Config{})
	bal.Update(set(1, spec{id: "a"}))
	e, _ := bal.Pick(balancer.PickInfo{})
	bal.Update(set(2, spec{id: "a"}, spec{id: "b"}))
	e2, _ := bal.Pick(balancer.PickInfo{Key: 0})
	for e2.ID != "a" {
		e2.Done(nil)
		e2, _ = bal.Pick(balancer.PickInfo{})
	}
	if e.Stats != e2.Stats || e.Stats.Inflight() != 2 {
		t.Errorf("a's stats after an update: same=%v inflight=%d, want same, 2", e.Stats == e2.Stats, e2.Stats.Inflight())
	}
	e.Done(nil)
	e2.Done(nil)
}

type chanSource struct {
	ch  chan struct{}
	set endpoint.Set
}

func (s *chanSource) Changed() <-chan struct{} { return s.ch }
func (s *chanSource) Endpoints() endpoint.Set  { return s.set }

func TestRunStopsWithContext(t *testing.T) {
	bal := newBalancer(t, roundrobin.Builder{}, balancer.Config{})
	src := &chanSource{ch: make(chan struct{}), set: set(1, spec{id: "a"})}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- bal.Run(ctx, src) }()
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("Run() = %v, want context.Canceled", err)
	}
	if _, err := bal.Pick(balancer.PickInfo{}); err != nil {
		t.Errorf("Pick() after Run applied a set = %v", err)
	}
}

func TestConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		cfg  balancer.Config
		want string
	}{
		{balancer.Config{PanicThreshold: 1.01}, "panic threshold 1.01"},
		{balancer.Config{ZoneMinHealthy: -1}, "zone min healthy -1"},
		{balancer.Config{ZoneSpill: -1}, "zone spill -1"},
		{balancer.Config{SlowStart: -time.Second}, "slow start -1s"},
		{balancer.Config{SlowStartMin: 2}, "slow start min 2"},
		{balancer.Config{Subsets: []balancer.Subset{{Name: "x", Weight: 0}}}, `subsets[0] ("x") weight 0`},
		{balancer.Config{Subsets: []balancer.Subset{{Name: "x", Weight: 1}, {Name: "x", Weight: 1}}}, `subsets[1] name "x"`},
	} {
		_, err := balancer.New(roundrobin.Builder{}, tc.cfg)
		if !errors.Is(err, balancer.ErrInvalidConfig) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New(%+v) = %v, want ErrInvalidConfig naming %q", tc.cfg, err, tc.want)
		}
	}
}

func TestSelector(t *testing.T) {
	e := &endpoint.Endpoint{Version: "v2", Tags: []string{"gpu", "eu"}, Metadata: map[string]string{"track": "beta"}}
	for _, tc := range []struct {
		sel  balancer.Selector
		want bool
	}{
		{balancer.Selector{}, true},
		{balancer.Selector{Version: "v2"}, true},
		{balancer.Selector{Version: "v1"}, false},
		{balancer.Selector{Tags: []string{"gpu"}}, true},
		{balancer.Selector{Tags: []string{"gpu", "us"}}, false},
		{balancer.Selector{Metadata: map[string]string{"track": "beta"}}, true},
		{balancer.Selector{Metadata: map[string]string{"track": ""}}, false},
		{balancer.Selector{Version: "v2", Tags: []string{"eu"}, Metadata: map[string]string{"track": "beta"}}, true},
	} {
		if got := tc.sel.Matches(e); got != tc.want {
			t.Errorf("%+v.Matches() = %v, want %v", tc.sel, got, tc.want)
		}
	}
}

// An update that removes an ejected endpoint must not deadlock: the
// detector's change callback takes the balancer's lock, which Update holds
// (the chaos scorecard's hang scenario found this: a hung instance,
// ejected, then dropped by the registry).
func TestUpdateRemovingAnEjectedEndpoint(t *testing.T) {
	bal := newBalancer(t, roundrobin.Builder{}, balancer.Config{}, balancer.WithOutlierDetection(testOutlier))
	bal.Update(set(1, spec{id: "a"}, spec{id: "b"}, spec{id: "c"}))
	ejectAll(t, bal, "a")
	done := make(chan struct{})
	go func() {
		defer close(done)
		bal.Update(set(2, spec{id: "b"}, spec{id: "c"}))
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Update removing an ejected endpoint did not return in 10 s (deadlock)")
	}
	fit(t, share(t, bal, 2000), map[string]float64{"b": 1, "c": 1})
	if st := bal.State(); st.Endpoints != 2 {
		t.Errorf("State().Endpoints = %d, want 2", st.Endpoints)
	}
}

// failIf is the outcome Done wants for a call that failed or not.
func failIf(failed bool) error {
	if failed {
		return errors.New("failed")
	}
	return nil
}

// FirstOfRevision answers true once per newer registry revision, whatever
// the number of callers asking at once.
func TestFirstOfRevisionOncePerRevision(t *testing.T) {
	// Picks from many goroutines: math/rand/v2's global source, which is
	// safe for concurrent use, not the test's seeded one.
	bal := newBalancer(t, roundrobin.Builder{}, balancer.Config{}, balancer.WithRand(rand.Uint64))
	claims := func(n int) int {
		var wg sync.WaitGroup
		var got atomic.Int32
		for range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				p, err := bal.Pick(balancer.PickInfo{})
				if err != nil {
					t.Error(err)
					return
				}
				if p.FirstOfRevision() {
					got.Add(1)
				}
				p.Done(nil)
			}()
		}
		wg.Wait()
		return int(got.Load())
	}
	bal.Update(set(10, spec{id: "a"}, spec{id: "b"}))
	if n := claims(16); n != 1 {
		t.Errorf("revision 10: %d first uses, want 1", n)
	}
	if n := claims(16); n != 0 {
		t.Errorf("revision 10 again: %d first uses, want 0", n)
	}
	bal.Update(set(11, spec{id: "a"}))
	if n := claims(16); n != 1 {
		t.Errorf("revision 11: %d first uses, want 1", n)
	}
}

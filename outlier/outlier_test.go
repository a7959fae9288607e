package outlier_test

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"go.uber.org/goleak"

	"beacon.dev/beacon/endpoint"
	"beacon.dev/beacon/outlier"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type recorder struct {
	mu     sync.Mutex
	events []string
}

func (r *recorder) add(ev outlier.Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if ev.Ejected {
		r.events = append(r.events, fmt.Sprintf("eject %s %s %v", ev.ID, ev.Reason, ev.For))
	} else {
		r.events = append(r.events, "readmit "+ev.ID)
	}
}

func (r *recorder) take() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := strings.Join(r.events, "; ")
	r.events = nil
	return s
}

func setup(t *testing.T, cfg outlier.Config, n int) (*outlier.Detector, []*endpoint.Endpoint, *clockwork.FakeClock, *recorder) {
	t.Helper()
	clock := clockwork.NewFakeClock()
	rec := &recorder{}
	// The sweep timer is far away; tests call Sweep themselves.
	cfg.Interval = time.Hour
	d, err := outlier.New(cfg, outlier.WithClock(clock), outlier.WithEvents(rec.add))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Close)
	eps := make([]*endpoint.Endpoint, n)
	for i := range eps {
		eps[i] = &endpoint.Endpoint{ID: fmt.Sprintf("e%d", i), Weight: 1, Stats: new(endpoint.Stats)}
	}
	d.SetEndpoints(eps)
	return d, eps, clock, rec
}

// call records one call outcome the way a balancer's Done does.
func call(d *outlier.Detector, e *endpoint.Endpoint, failed bool) {
	e.Stats.Begin()
	if streak := e.Stats.End(0, time.Millisecond, failed); failed {
		d.Observe(e, streak)
	}
}

func TestConsecutiveFailuresEjectWithGrowingBackoff(t *testing.T) {
	d, eps, clock, rec := setup(t, outlier.Config{ConsecutiveFailures: 3, BaseEjection: 10 * time.Second, MaxEjection: 25 * time.Second}, 4)
	call(d, eps[0], true)
	call(d, eps[0], true)
	call(d, eps[0], false) // a success breaks the streak
	call(d, eps[0], true)
	call(d, eps[0], true)
	if d.Ejected("e0") {
		t.Fatal("ejected after 2 consecutive failures, threshold 3")
	}
	call(d, eps[0], true)
	if !d.Ejected("e0") {
		t.Fatal("not ejected after 3 consecutive failures")
	}
	if got, want := rec.take(), "eject e0 consecutive_failures 10s"; got != want {
		t.Errorf("events = %q, want %q", got, want)
	}
	clock.Advance(9 * time.Second)
	d.Sweep()
	if !d.Ejected("e0") {
		t.Fatal("re-admitted before the ejection ended")
	}
	clock.Advance(time.Second)
	d.Sweep()
	if d.Ejected("e0") {
		t.Fatal("still ejected after the ejection ended")
	}
	// Failing again at once: twice as long, then capped.
	call(d, eps[0], true)
	clock.Advance(20 * time.Second)
	d.Sweep()
	call(d, eps[0], true)
	if got, want := rec.take(), "readmit e0; eject e0 consecutive_failures 20s; readmit e0; eject e0 consecutive_failures 25s"; got != want {
		t.Errorf("events = %q, want %q", got, want)
	}
	if st := d.Stats(); st.Ejections != 3 || st.Readmitted != 2 || len(st.Ejected) != 1 {
		t.Errorf("Stats() = %+v, want 3 ejections, 2 re-admissions, 1 ejected", st)
	}
}

func TestFailureRate(t *testing.T) {
	d, eps, _, rec := setup(t, outlier.Config{ConsecutiveFailures: -1, FailureRate: 0.5, MinRequests: 10}, 4)
	// e1: 4 failures in 8 calls: too few calls to judge.
	// e2: 5 of 10 failed, never consecutively: ejected by rate.
	// e3: 4 of 10: below the rate.
	for i := range 8 {
		call(d, eps[1], i%2 == 0)
	}
	for i := range 10 {
		call(d, eps[2], i%2 == 0)
		call(d, eps[3], i%5 < 2)
	}
	d.Sweep()
	if got, want := rec.take(), "eject e2 failure_rate 30s"; got != want {
		t.Errorf("events = %q, want %q", got, want)
	}
	// A new interval starts empty.
	d.Sweep()
	if got := rec.take(); got != "" {
		t.Errorf("events after an empty interval = %q, want none", got)
	}
}

func TestEjectionCap(t *testing.T) {
	d, eps, _, _ := setup(t, outlier.Config{ConsecutiveFailures: 1, MaxEjected: 0.5}, 5)
	for _, e := range eps {
		call(d, e, true)
	}
	if got := len(d.EjectedSet()); got != 2 {
		t.Errorf("%d of 5 ejected with a 50%% cap, want 2", got)
	}
	// A single endpoint can always be ejected.
	d1, eps1, _, _ := setup(t, outlier.Config{ConsecutiveFailures: 1, MaxEjected: 0.1}, 3)
	call(d1, eps1[0], true)
	call(d1, eps1[1], true)
	if got := len(d1.EjectedSet()); got != 1 {
		t.Errorf("%d of 3 ejected with a 10%% cap, want 1", got)
	}
}

func TestRemovedEndpointsAreForgotten(t *testing.T) {
	d, eps, _, _ := setup(t, outlier.Config{ConsecutiveFailures: 1}, 3)
	call(d, eps[0], true)
	d.SetEndpoints(eps[1:])
	if d.Ejected("e0") || len(d.EjectedSet()) != 0 {
		t.Errorf("removed endpoint still ejected: %v", d.EjectedSet())
	}
	if st := d.Stats(); st.Endpoints != 2 {
		t.Errorf("Stats().Endpoints = %d, want 2", st.Endpoints)
	}
}

func TestPeriodicSweepRuns(t *testing.T) {
	clock := clockwork.NewFakeClock()
	readmitted := make(chan string, 1)
	d, err := outlier.New(outlier.Config{Interval: time.Second, ConsecutiveFailures: 1, BaseEjection: time.Second},
		outlier.WithClock(clock), outlier.WithEvents(func(ev outlier.Event) {
			if !ev.Ejected {
				readmitted <- ev.ID
			}
		}))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	e := &endpoint.Endpoint{ID: "e", Stats: new(endpoint.Stats)}
	d.SetEndpoints([]*endpoint.Endpoint{e})
	call(d, e, true)
	clock.Advance(time.Second)
	select {
	case id := <-readmitted:
		if id != "e" {
			t.Errorf("re-admitted %q, want e", id)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the periodic sweep did not re-admit the endpoint")
	}
}

func TestConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		cfg  outlier.Config
		want string
	}{
		{outlier.Config{Interval: time.Microsecond}, "interval 1µs"},
		{outlier.Config{ConsecutiveFailures: -2}, "consecutive failures -2"},
		{outlier.Config{FailureRate: 1.5}, "failure rate 1.5"},
		{outlier.Config{MinRequests: -1}, "min requests -1"},
		{outlier.Config{BaseEjection: time.Minute, MaxEjection: time.Second}, "ejection 1m0s..1s"},
		{outlier.Config{MaxEjected: 1.01}, "max ejected 1.01"},
	} {
		_, err := outlier.New(tc.cfg)
		if !errors.Is(err, outlier.ErrInvalidConfig) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New(%+v) = %v, want ErrInvalidConfig naming %q", tc.cfg, err, tc.want)
		}
	}
}

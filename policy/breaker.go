package policy

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jonboulle/clockwork"
)

// State is a circuit breaker's state.
type State int32

const (
	Closed   State = iota // calls flow; outcomes are counted
	Open                  // calls fail fast with ErrOpen
	HalfOpen              // a few probe calls decide
)

func (s State) String() string {
	switch s {
	case Closed:
		return "closed"
	case Open:
		return "open"
	case HalfOpen:
		return "half-open"
	}
	return fmt.Sprintf("State(%d)", int32(s))
}

// BreakerConfig tunes a circuit breaker. Zero fields take defaults.
type BreakerConfig struct {
	// WindowSize: the failure rate is judged over the last WindowSize calls
	// (count-based, default 100) ...
	WindowSize int
	// ... or, when WindowDuration > 0, over the calls of the last
	// WindowDuration (time-based, in 10 buckets).
	WindowDuration time.Duration
	// FailureRate in (0, 1] opens the breaker (default 0.5) once the window
	// holds at least MinCalls calls (default 20).
	FailureRate float64
	MinCalls    int
	// OpenFor is how long the breaker stays open before probing (default
	// 10 s).
	OpenFor time.Duration
	// HalfOpenProbes calls are let through when half-open (default 3); all
	// must succeed to close the breaker, one failure re-opens it.
	HalfOpenProbes int
	// IsFailure classifies outcomes (default: every non-nil error except
	// context.Canceled and the policies' own rejections).
	IsFailure func(error) bool
	// OnStateChange is called after each transition, outside the breaker's
	// lock, from the goroutine that caused it; it must not block.
	OnStateChange func(from, to State)
	// Clock replaces the clock (tests); without it the time window uses
	// the process's cheap monotonic clock.
	Clock clockwork.Clock
}

// Breaker is a circuit breaker. Use Allow before a call and Done after it.
type Breaker struct {
	cfg   BreakerConfig
	state atomic.Int32
	gen   atomic.Uint32 // bumped on every transition; stale outcomes are dropped
	count *countWindow  // one of count/timed is set
	timed *timeWindow
	now   func() int64 // for the time window

	probes   atomic.Int32 // half-open: permits handed out
	probeOKs atomic.Int32 // half-open: successes

	mu       sync.Mutex
	openedAt time.Time // guarded by mu
}

// NewBreaker returns a closed breaker.
func NewBreaker(cfg BreakerConfig) (*Breaker, error) {
	if cfg.WindowSize == 0 {
		cfg.WindowSize = 100
	}
	if cfg.FailureRate == 0 {
		cfg.FailureRate = 0.5
	}
	if cfg.MinCalls == 0 {
		cfg.MinCalls = 20
	}
	if cfg.OpenFor == 0 {
		cfg.OpenFor = 10 * time.Second
	}
	if cfg.HalfOpenProbes == 0 {
		cfg.HalfOpenProbes = 3
	}
	if cfg.IsFailure == nil {
		cfg.IsFailure = defaultIsFailure
	}
	var now func() int64
	cfg.Clock, now = clocks(cfg.Clock)
	switch {
	case cfg.WindowSize < 1 || cfg.WindowSize > 1<<20:
		return nil, fmt.Errorf("policy: breaker window size %d must be in [1, %d]", cfg.WindowSize, 1<<20)
	case cfg.WindowDuration < 0 || (cfg.WindowDuration > 0 && cfg.WindowDuration < 10*time.Millisecond):
		return nil, fmt.Errorf("policy: breaker window duration %v must be 0 or at least 10ms", cfg.WindowDuration)
	case cfg.FailureRate <= 0 || cfg.FailureRate > 1:
		return nil, fmt.Errorf("policy: breaker failure rate %v must be in (0, 1]", cfg.FailureRate)
	case cfg.MinCalls < 1:
		return nil, fmt.Errorf("policy: breaker min calls %d must be at least 1", cfg.MinCalls)
	case cfg.OpenFor < 0:
		return nil, fmt.Errorf("policy: breaker open duration %v must not be negative", cfg.OpenFor)
	case cfg.HalfOpenProbes < 1:
		return nil, fmt.Errorf("policy: breaker half-open probes %d must be at least 1", cfg.HalfOpenProbes)
	}
	b := &Breaker{cfg: cfg, now: now}
	if cfg.WindowDuration > 0 {
		b.timed = &timeWindow{bucketDur: int64(cfg.WindowDuration / timeBuckets)}
	} else {
		b.count = &countWindow{slots: make([]atomic.Uint32, cfg.WindowSize)}
	}
	return b, nil
}

func defaultIsFailure(err error) bool {
	return err != nil && !IsRejection(err) && !errorsIsCanceled(err)
}

// State returns the current state; an open breaker whose time is up still
// reads Open until the next Allow moves it to HalfOpen.
func (b *Breaker) State() State { return State(b.state.Load()) }

// Permit is handed out by Allow and given back to Done.
type Permit struct {
	gen   uint32
	probe bool
}

// Allow asks whether a call may go. On ErrOpen the call must not be made
// and Done must not be called.
func (b *Breaker) Allow() (Permit, error) {
	gen := b.gen.Load()
	switch State(b.state.Load()) {
	case Closed:
		return Permit{gen: gen}, nil
	case Open:
		if !b.toHalfOpen() {
			return Permit{}, ErrOpen
		}
		gen = b.gen.Load()
	}
	if b.probes.Add(1) > int32(b.cfg.HalfOpenProbes) {
		b.probes.Add(-1)
		return Permit{}, ErrOpen
	}
	return Permit{gen: gen, probe: true}, nil
}

// Abandon returns a permit for a call that was not made after all.
func (b *Breaker) Abandon(p Permit) {
	if p.probe && p.gen == b.gen.Load() {
		b.probes.Add(-1)
	}
}

// Done records the outcome of a permitted call.
func (b *Breaker) Done(p Permit, err error) {
	if p.gen != b.gen.Load() {
		return // the breaker moved on since this call started
	}
	failed := b.cfg.IsFailure(err)
	if p.probe {
		if failed {
			b.transition(HalfOpen, Open, p.gen)
		} else if b.probeOKs.Add(1) >= int32(b.cfg.HalfOpenProbes) {
			b.transition(HalfOpen, Closed, p.gen)
		}
		return
	}
	var calls, failures int64
	if b.count != nil {
		calls, failures = b.count.record(failed)
	} else {
		calls, failures = b.timed.record(b.now(), failed)
	}
	if failed && calls >= int64(b.cfg.MinCalls) && float64(failures) >= b.cfg.FailureRate*float64(calls) {
		b.transition(Closed, Open, p.gen)
	}
}

func (b *Breaker) toHalfOpen() bool {
	b.mu.Lock()
	ready := b.cfg.Clock.Since(b.openedAt) >= b.cfg.OpenFor
	b.mu.Unlock()
	if !ready {
		return false
	}
	b.transition(Open, HalfOpen, b.gen.Load())
	return State(b.state.Load()) == HalfOpen
}

// transition moves from → to if the breaker is still in generation gen.
func (b *Breaker) transition(from, to State, gen uint32) {
	b.mu.Lock()
	if State(b.state.Load()) != from || b.gen.Load() != gen {
		b.mu.Unlock()
		return
	}
	switch to {
	case Open:
		b.openedAt = b.cfg.Clock.Now()
	case HalfOpen:
		b.probes.Store(0)
		b.probeOKs.Store(0)
	case Closed:
		if b.count != nil {
			b.count.reset()
		} else {
			b.timed.reset()
		}
	}
	b.gen.Add(1)
	b.state.Store(int32(to))
	b.mu.Unlock()
	if b.cfg.OnStateChange != nil {
		b.cfg.OnStateChange(from, to)
	}
}

// countWindow remembers the outcomes of the last len(slots) calls.
type countWindow struct {
	slots    []atomic.Uint32 // 0 empty, 1 success, 2 failure
	pos      atomic.Uint64
	calls    atomic.Int64
	failures atomic.Int64
}

func (w *countWindow) record(failed bool) (calls, failures int64) {
	// A full window of successes stays the same after another success,
	// wherever it is written: skip the writes that two cores would fight
	// over.
	if !failed && w.failures.Load() == 0 && w.calls.Load() == int64(len(w.slots)) {
		return int64(len(w.slots)), 0
	}
	v := uint32(1)
	if failed {
		v = 2
	}
	i := w.pos.Add(1) - 1
	old := w.slots[i%uint64(len(w.slots))].Swap(v)
	if old == 0 {
		calls = w.calls.Add(1)
	} else {
		calls = w.calls.Load()
	}
	switch {
	case v == 2 && old != 2:
		failures = w.failures.Add(1)
	case v != 2 && old == 2:
		failures = w.failures.Add(-1)
	default:
		failures = w.failures.Load()
	}
	return calls, failures
}

func (w *countWindow) reset() {
	for i := range w.slots {
		w.slots[i].Store(0)
	}
	w.calls.Store(0)
	w.failures.Store(0)
}

const timeBuckets = 10

// timeWindow counts outcomes over the last timeBuckets × bucketDur.
type timeWindow struct {
	bucketDur int64
	buckets   [timeBuckets]struct {
		epoch           atomic.Int64
		calls, failures atomic.Int64
	}
}

func (w *timeWindow) record(now int64, failed bool) (calls, failures int64) {
	epoch := now / w.bucketDur
	bk := &w.buckets[epoch%timeBuckets]
	if old := bk.epoch.Load(); old != epoch && bk.epoch.CompareAndSwap(old, epoch) {
		bk.calls.Store(0)
		bk.failures.Store(0)
	}
	bk.calls.Add(1)
	if failed {
		bk.failures.Add(1)
	} else {
		return 0, 0 // only failures can open the breaker: skip the sum
	}
	for i := range w.buckets {
		b := &w.buckets[i]
		if e := b.epoch.Load(); e > epoch-timeBuckets && e <= epoch {
			calls += b.calls.Load()
			failures += b.failures.Load()
		}
	}
	return calls, failures
}

func (w *timeWindow) reset() {
	for i := range w.buckets {
		w.buckets[i].epoch.Store(0)
		w.buckets[i].calls.Store(0)
		w.buckets[i].failures.Store(0)
	}
}

// Package outlier implements passive health checking: it watches the
// outcome of real calls per endpoint and ejects endpoints that fail, the
// way Envoy's outlier detection does — without needing xDS.
//
// Two detectors run: consecutive failures eject at once, from the call
// path; the failure rate over an interval is judged by a periodic sweep.
// An ejection lasts BaseEjection × the number of recent ejections (capped
// by MaxEjection) and at most the MaxEjected share of the endpoints is out at
// a time (never fewer than one). A Detector is safe for concurrent use.
package outlier

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jonboulle/clockwork"

	"beacon.dev/beacon/endpoint"
)

// Config tunes detection. The zero value of a field means its default.
type Config struct {
	// Interval between failure-rate sweeps, which also re-admit endpoints
	// whose ejection ended (default 10 s).
	Interval time.Duration
	// ConsecutiveFailures ejects at once after this many failures in a row
	// (default 5; -1 disables).
	ConsecutiveFailures int
	// FailureRate ejects an endpoint whose failures/requests over one
	// interval reach this fraction (default 0.5; -1 disables) ...
	FailureRate float64
	// ... once it served at least MinRequests in the interval (default 10).
	MinRequests int
	// BaseEjection is the first ejection's length (default 30 s); the n-th
	// recent ejection lasts n times as long, up to MaxEjection (default 5 m).
	BaseEjection time.Duration
	MaxEjection  time.Duration
	// MaxEjectedPercent caps the share of endpoints out at once (default
	// 50); one endpoint may always be ejected.
	MaxEjected float64
}

// DefaultConfig is the configuration used for zero fields.
var DefaultConfig = Config{
	Interval:            10 * time.Second,
	ConsecutiveFailures: 5,
	FailureRate:         0.5,
	MinRequests:         10,
	BaseEjection:        30 * time.Second,
	MaxEjection:         5 * time.Minute,
	MaxEjected:          0.5,
}

// ErrInvalidConfig wraps every configuration error.
var ErrInvalidConfig = errors.New("outlier: invalid config")

// withDefaults fills zero fields and checks ranges.
func (c Config) withDefaults() (Config, error) {
	d := DefaultConfig
	if c.Interval == 0 {
		c.Interval = d.Interval
	}
	if c.ConsecutiveFailures == 0 {
		c.ConsecutiveFailures = d.ConsecutiveFailures
	}
	if c.FailureRate == 0 {
		c.FailureRate = d.FailureRate
	}
	if c.MinRequests == 0 {
		c.MinRequests = d.MinRequests
	}
	if c.BaseEjection == 0 {
		c.BaseEjection = d.BaseEjection
	}
	if c.MaxEjection == 0 {
		c.MaxEjection = max(d.MaxEjection, c.BaseEjection)
	}
	if c.MaxEjected == 0 {
		c.MaxEjected = d.MaxEjected
	}
	switch {
	case c.Interval < time.Millisecond:
		return c, fmt.Errorf("%w: interval %v must be at least 1ms", ErrInvalidConfig, c.Interval)
	case c.ConsecutiveFailures < -1:
		return c, fmt.Errorf("%w: consecutive failures %d must be ≥ 1 or -1 (off)", ErrInvalidConfig, c.ConsecutiveFailures)
	case c.FailureRate != -1 && (c.FailureRate <= 0 || c.FailureRate > 1):
		return c, fmt.Errorf("%w: failure rate %v must be in (0, 1] or -1 (off)", ErrInvalidConfig, c.FailureRate)
	case c.MinRequests < 1:
		return c, fmt.Errorf("%w: min requests %d must be ≥ 1", ErrInvalidConfig, c.MinRequests)
	case c.BaseEjection < 0 || c.MaxEjection < c.BaseEjection:
		return c, fmt.Errorf("%w: ejection %v..%v must be positive and ordered", ErrInvalidConfig, c.BaseEjection, c.MaxEjection)
	case !(c.MaxEjected > 0 && c.MaxEjected <= 1):
		return c, fmt.Errorf("%w: max ejected %v must be a fraction in (0, 1]", ErrInvalidConfig, c.MaxEjected)
	}
	return c, nil
}

// Reason says why an endpoint was ejected.
type Reason string

const (
	ReasonConsecutive Reason = "consecutive_failures"
	ReasonRate        Reason = "failure_rate"
)

// Event reports an ejection or a re-admission.
type Event struct {
	ID, Addr string
	Ejected  bool          // false: re-admitted
	Reason   Reason        // for ejections
	For      time.Duration // ejection length
	At       time.Time
}

// Stats is a point-in-time view of the detector.
type Stats struct {
	Endpoints  int
	Ejected    []string // IDs, in ejection order
	Ejections  int64    // since the detector started
	Readmitted int64
}

// Option configures a Detector.
type Option func(*Detector)

// WithClock replaces the wall clock (tests).
func WithClock(c clockwork.Clock) Option { return func(d *Detector) { d.clock = c } }

// WithEvents calls f for every ejection and re-admission, after the change
// is in effect, from the goroutine that caused it; f must not block.
func WithEvents(f func(Event)) Option { return func(d *Detector) { d.onEvent = f } }

// WithOnChange calls f whenever the detector changes the set of ejected
// endpoints on its own (an ejection or a re-admission; balancers rebuild
// their picker), like WithEvents. SetEndpoints does not call it: its
// caller holds the new set already, and may hold the lock f takes.
func WithOnChange(f func()) Option { return func(d *Detector) { d.onChange = f } }

type state struct {
	ep        *endpoint.Endpoint
	ejected   bool
	until     time.Time
	ejections int // recent ejections: multiplies the next ejection's length
}

// Detector tracks one service's endpoints.
type Detector struct {
	cfg      Config
	clock    clockwork.Clock
	onEvent  func(Event)
	onChange func()
	name     string // metrics label

	mu         sync.Mutex
	eps        map[string]*state // guarded by mu
	order      []string          // guarded by mu; ejected IDs in order
	ejections  int64             // guarded by mu
	readmitted int64             // guarded by mu
	timer      clockwork.Timer   // guarded by mu
	closed     bool              // guarded by mu
}

// New starts a detector; Close stops its sweeps.
func New(cfg Config, opts ...Option) (*Detector, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	d := &Detector{cfg: cfg, clock: clockwork.NewRealClock(), eps: make(map[string]*state)}
	for _, o := range opts {
		o(d)
	}
	d.timer = d.clock.AfterFunc(cfg.Interval, d.sweepAndRearm)
	return d, nil
}

// Config returns the effective configuration.
func (d *Detector) Config() Config { return d.cfg }

// Close stops the periodic sweep.
func (d *Detector) Close() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.closed = true
	d.timer.Stop()
}

// SetEndpoints replaces the tracked endpoints. Known IDs keep their state;
// removed IDs are forgotten. It reports whether that changed the ejected
// set (an ejected endpoint was removed).
func (d *Detector) SetEndpoints(eps []*endpoint.Endpoint) (ejectedChanged bool) {
	d.mu.Lock()
	changed := false
	seen := make(map[string]bool, len(eps))
	for _, e := range eps {
		seen[e.ID] = true
		if st, ok := d.eps[e.ID]; ok {
			st.ep = e
		} else {
			d.eps[e.ID] = &state{ep: e}
		}
	}
	for id, st := range d.eps {
		if !seen[id] {
			delete(d.eps, id)
			changed = changed || st.ejected
		}
	}
	if changed {
		d.rebuildOrderLocked()
	}
	d.mu.Unlock()
	return changed
}

// Observe feeds one call's failure streak (from endpoint.Stats.End). It is
// free until the streak reaches the threshold, which ejects at once.
func (d *Detector) Observe(ep *endpoint.Endpoint, streak int32) {
	if d.cfg.ConsecutiveFailures < 0 || int(streak) < d.cfg.ConsecutiveFailures {
		return
	}
	d.eject([]*endpoint.Endpoint{ep}, ReasonConsecutive)
}

// Ejected reports whether the endpoint is ejected now.
func (d *Detector) Ejected(id string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	st, ok := d.eps[id]
	return ok && st.ejected
}

// EjectedSet returns the IDs ejected now.
func (d *Detector) EjectedSet() map[string]bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make(map[string]bool, len(d.order))
	for _, id := range d.order {
		out[id] = true
	}
	return out
}

// Stats returns counters and the ejected IDs.
func (d *Detector) Stats() Stats {
	d.mu.Lock()
	defer d.mu.Unlock()
	return Stats{Endpoints: len(d.eps), Ejected: append([]string(nil), d.order...), Ejections: d.ejections, Readmitted: d.readmitted}
}

func (d *Detector) eject(eps []*endpoint.Endpoint, why Reason) {
	now := d.clock.Now()
	var events []Event
	d.mu.Lock()
	limit := max(1, int(float64(len(d.eps))*d.cfg.MaxEjected))
	for _, e := range eps {
		st, ok := d.eps[e.ID]
		if !ok || st.ejected || len(d.order) >= limit {
			continue
		}
		st.ejections++
		length := min(d.cfg.BaseEjection*time.Duration(st.ejections), d.cfg.MaxEjection)
		st.ejected, st.until = true, now.Add(length)
		d.order = append(d.order, e.ID)
		d.ejections++
		events = append(events, Event{ID: e.ID, Addr: e.Addr, Ejected: true, Reason: why, For: length, At: now})
	}
	d.mu.Unlock()
	d.notify(events)
}

func (d *Detector) notify(events []Event) {
	if len(events) == 0 {
		return
	}
	if d.onChange != nil {
		d.onChange()
	}
	if d.onEvent != nil {
		for _, ev := range events {
			d.onEvent(ev)
		}
	}
}

func (d *Detector) sweepAndRearm() {
	d.Sweep()
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.closed {
		d.timer.Reset(d.cfg.Interval)
	}
}

// Sweep re-admits endpoints whose ejection ended, judges failure rates over
// the interval just ended and starts a new interval. It runs every Interval
// on its own; tests with a fake clock may call it directly.
func (d *Detector) Sweep() {
	now := d.clock.Now()
	var events []Event
	var failing []*endpoint.Endpoint
	d.mu.Lock()
	for id, st := range d.eps {
		var ok, failed int64
		if st.ep.Stats != nil {
			ok, failed = st.ep.Stats.TakeWindow()
		}
		if st.ejected {
			if !now.Before(st.until) {
				st.ejected = false
				d.readmitted++
				events = append(events, Event{ID: id, Addr: st.ep.Addr, At: now})
			}
			continue
		}
		total := ok + failed
		switch {
		case d.cfg.FailureRate > 0 && total >= int64(d.cfg.MinRequests) && float64(failed) >= d.cfg.FailureRate*float64(total):
			failing = append(failing, st.ep)
		case failed == 0 && st.ejections > 0:
			st.ejections-- // a clean interval earns back one step of backoff
		}
	}
	if len(events) > 0 {
		d.rebuildOrderLocked()
	}
	d.mu.Unlock()
	d.notify(events)
	if len(failing) > 0 {
		slices.SortFunc(failing, func(a, b *endpoint.Endpoint) int { return strings.Compare(a.ID, b.ID) })
		d.eject(failing, ReasonRate)
	}
}

func (d *Detector) rebuildOrderLocked() {
	kept := d.order[:0]
	for _, id := range d.order {
		if st, ok := d.eps[id]; ok && st.ejected {
			kept = append(kept, id)
		}
	}
	d.order = kept
}

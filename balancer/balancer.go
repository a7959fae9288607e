package balancer

import (
	"context"
	"math"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jonboulle/clockwork"

	"beacon.dev/beacon/endpoint"
	"beacon.dev/beacon/internal/mono"
	"beacon.dev/beacon/outlier"
)

// Balancer turns a service's endpoint sets into pickers. Updates (new sets,
// ejections, slow-start steps) are serialised and each publishes a new
// immutable route; Pick reads the current one without locking. A Balancer is
// safe for concurrent use.
type Balancer struct {
	builder  Builder
	cfg      Config
	clock    clockwork.Clock
	rand     func() uint64
	detector *outlier.Detector
	group    endpoint.Group
	coarse   endpoint.Clock // advanced by latency samples; ages P2C costs
	// boundedLoad: the builder compares endpoints with the group's
	// average, so Stats must count towards the group (a shared counter the
	// other algorithms need not pay for).
	boundedLoad bool
	latency     bool   // the builder uses latency: Done reads the clock
	sampleMask  uint32 // latency sampled when rand & mask == 0
	route       atomic.Pointer[route]
	// The newest registry revision a pick has claimed (FirstOfRevision).
	claimedRevision atomic.Int64

	outlierCfg  *outlier.Config
	outlierOpts []outlier.Option

	mu        sync.Mutex
	set       endpoint.Set
	updated   bool                       // guarded by mu; an update arrived
	stats     map[string]*endpoint.Stats // guarded by mu; by ID, kept across updates
	firstSeen map[string]time.Time       // guarded by mu; zero: present from the start
	ramp      clockwork.Timer            // guarded by mu; next slow-start step
	closed    bool                       // guarded by mu
}

// Option configures a Balancer.
type Option func(*Balancer)

// WithClock replaces the wall clock (tests).
func WithClock(c clockwork.Clock) Option { return func(b *Balancer) { b.clock = c } }

// WithRand replaces the random source (tests). f need not be safe for
// concurrent use only if Pick is called from one goroutine.
func WithRand(f func() uint64) Option { return func(b *Balancer) { b.rand = f } }

// WithOutlierDetection ejects failing endpoints, fed by Done. The
// detector's clock is the balancer's.
func WithOutlierDetection(cfg outlier.Config, opts ...outlier.Option) Option {
	return func(b *Balancer) { b.outlierCfg, b.outlierOpts = &cfg, opts }
}

// New returns a balancer with no endpoints; Pick fails with ErrNoEndpoint
// until the first Update.
func New(builder Builder, cfg Config, opts ...Option) (*Balancer, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	b := &Balancer{
		builder: builder, cfg: cfg, clock: clockwork.NewRealClock(), sampleMask: 3,
		stats: make(map[string]*endpoint.Stats), firstSeen: make(map[string]time.Time),
	}
	for _, o := range opts {
		o(b)
	}
	if l, ok := builder.(LatencyUser); ok {
		b.latency = l.UsesLatency()
	}
	if lb, ok := builder.(LoadBounder); ok {
		b.boundedLoad = lb.BoundedLoad()
	}
	if b.rand == nil {
		b.rand = BuildOptions{}.RandFunc()
	}
	if b.outlierCfg != nil {
		dopts := append([]outlier.Option{outlier.WithClock(b.clock), outlier.WithOnChange(b.rebuild)}, b.outlierOpts...)
		if b.detector, err = outlier.New(*b.outlierCfg, dopts...); err != nil {
			return nil, err
		}
	}
	b.route.Store(&route{})
	return b, nil
}

// Name returns the algorithm's name.
func (b *Balancer) Name() string { return b.builder.Name() }

// Outlier returns the outlier detector, nil without WithOutlierDetection.
func (b *Balancer) Outlier() *outlier.Detector { return b.detector }

// Close stops the timers of slow start and outlier detection.
func (b *Balancer) Close() {
	b.mu.Lock()
	b.closed = true
	if b.ramp != nil {
		b.ramp.Stop()
	}
	b.mu.Unlock()
	if b.detector != nil {
		b.detector.Close()
	}
}

// Pick is one call's endpoint, from Balancer.Pick to its Done: a small
// value (picking allocates nothing) that carries what Done needs, so the
// call's start, its endpoint and its outcome cannot be mismatched.
type Pick struct {
	*endpoint.Endpoint // the chosen one: p.Addr, p.ID, …
	b                  *Balancer
	r                  *route // the route it was picked on
	split              int32  // the subset it was picked in
	start              int64  // Now() when the latency of this call is measured, else 0
}

// Route describes the route the pick was made on (for tracing): its
// revision, and the subset the endpoint was picked in — its name, tier,
// zone routing and panic mode (the zero SubsetState when the route had
// none).
func (p Pick) Route() (revision int64, subset SubsetState) {
	if p.r == nil {
		return 0, SubsetState{}
	}
	if int(p.split) < len(p.r.stateOf) {
		subset = p.r.state.Subsets[p.r.stateOf[p.split]]
	}
	return p.r.state.Revision, subset
}

// FirstOfRevision reports true to the first caller that asks about a pick
// made on a route of a newer registry revision than any asked about
// before, and false to every other. Tracing asks on every traced pick,
// which marks the first call that used a registry change.
func (p Pick) FirstOfRevision() bool {
	if p.r == nil || p.b == nil {
		return false
	}
	rev := p.r.state.Revision
	for {
		old := p.b.claimedRevision.Load()
		if rev <= old {
			return false
		}
		if p.b.claimedRevision.CompareAndSwap(old, rev) {
			return true
		}
	}
}

// Pick chooses an endpoint and counts the call as in flight on it. Every
// successful Pick must be followed by exactly one Done.
func (b *Balancer) Pick(info PickInfo) (Pick, error) {
	r := b.route.Load()
	ep, split, err := r.pick(info)
	if err != nil {
		return Pick{}, err
	}
	for i := 0; i < 3 && info.Avoid != "" && ep.ID == info.Avoid; i++ {
		info.HasKey = false // a keyed pick would land on the same endpoint
		if ep, split, err = r.pick(info); err != nil {
			return Pick{}, err
		}
	}
	ep.Stats.Begin()
	if !b.latency {
		return Pick{Endpoint: ep, b: b, r: r, split: int32(split)}, nil
	}
	return Pick{Endpoint: ep, b: b, r: r, split: int32(split), start: b.start()}, nil
}

// Now returns the clock latency is measured with: cheap monotonic
// nanoseconds.
func Now() int64 { return mono.Now() }

// start returns a reading of Now for the calls whose latency is sampled,
// 0 for the others. (Pick does not call it for algorithms that do not use
// latency: they never read the clock.)
func (b *Balancer) start() int64 {
	if b.sampleMask != 0 && rand.Uint32()&b.sampleMask != 0 {
		return 0
	}
	return mono.Now()
}

// WithLatencySampling measures the latency of one call in n (a power of
// two, default 4; 1 measures every call). A clock read costs ~50 ns on
// virtual machines and a call needs two; under load a quarter of the calls
// still gives the average more samples than it can use, while in-flight
// counts, which react first to a hang, are kept for every call.
func WithLatencySampling(n int) Option {
	return func(b *Balancer) {
		if n >= 1 && n&(n-1) == 0 {
			b.sampleMask = uint32(n - 1)
		}
	}
}

// Done records the call's outcome as it concerns the endpoint: latency
// for least-request balancing, and for outlier detection a failure when
// err is not nil. Pass nil for outcomes that say nothing about the
// endpoint (the caller's own cancellation, a request the server refused
// as invalid). Call it once.
func (p Pick) Done(err error) {
	ep, failed := p.Endpoint, err != nil
	var streak int32
	if p.start != 0 {
		now := mono.Now()
		p.b.coarse.Observe(now)
		streak = ep.Stats.End(now, time.Duration(now-p.start), failed)
	} else {
		streak = ep.Stats.Finish(failed)
	}
	if failed && p.b.detector != nil {
		p.b.detector.Observe(ep, streak)
	}
}

// Update replaces the endpoints. Endpoints keep their counters across
// updates by ID. Updates older than the current revision are ignored,
// unless the current set came from disk.
func (b *Balancer) Update(set endpoint.Set) {
	b.mu.Lock()
	defer b.mu.Unlock()
	// A set restored from disk may carry revisions of an etcd that was
	// since replaced; the registry's answer always wins over it.
	if b.closed || (b.updated && !b.set.FromDisk && set.Revision < b.set.Revision) {
		return
	}
	now := b.clock.Now()
	// Slow start ramps newcomers relative to endpoints already serving; the
	// first endpoints of an empty service start at full weight.
	ramp := len(b.set.Endpoints) > 0
	seen := make(map[string]bool, len(set.Endpoints))
	for _, e := range set.Endpoints {
		seen[e.ID] = true
		if _, ok := b.stats[e.ID]; !ok {
			st := new(endpoint.Stats)
			if b.boundedLoad {
				st.Join(&b.group)
			}
			b.stats[e.ID] = st
			if ramp {
				b.firstSeen[e.ID] = now
			} else {
				b.firstSeen[e.ID] = time.Time{}
			}
		}
	}
	for id := range b.stats {
		if !seen[id] {
			delete(b.stats, id)
			delete(b.firstSeen, id)
		}
	}
	b.set, b.updated = set, true
	b.rebuildLocked()
}

// Source is what Run follows: a notification channel that receives after
// every change, and the latest set.
type Source interface {
	Changed() <-chan struct{}
	Endpoints() endpoint.Set
}

// Run applies every set the source publishes until ctx ends.
func (b *Balancer) Run(ctx context.Context, src Source) error {
	for {
		b.Update(src.Endpoints())
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-src.Changed():
		}
	}
}

func (b *Balancer) rebuild() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.closed {
		b.rebuildLocked()
	}
}

// rebuildLocked publishes a new route from the current set, ejections and
// slow-start weights.
func (b *Balancer) rebuildLocked() {
	now := b.clock.Now()
	eps := make([]*endpoint.Endpoint, len(b.set.Endpoints))
	copies := make([]endpoint.Endpoint, len(b.set.Endpoints))
	ramping := 0
	for i, e := range b.set.Endpoints {
		copies[i] = *e
		c := &copies[i]
		c.Stats = b.stats[e.ID]
		if f, ok := b.rampFactor(now, b.firstSeen[e.ID]); ok {
			c.Weight = max(1, int(math.Round(float64(c.Weight)*f)))
			ramping++
		}
		eps[i] = c
	}
	var ejected map[string]bool
	if b.detector != nil {
		b.detector.SetEndpoints(eps)
		ejected = b.detector.EjectedSet()
	}
	r := buildRoute(b.cfg, b.builder, eps, ejected, BuildOptions{Rand: b.rand, Group: &b.group, Clock: &b.coarse})
	r.state.Revision, r.state.Ramping = b.set.Revision, ramping
	b.route.Store(r)
	if b.ramp != nil {
		b.ramp.Stop()
		b.ramp = nil
	}
	if ramping > 0 {
		b.ramp = b.clock.AfterFunc(max(b.cfg.SlowStart/20, 10*time.Millisecond), b.rebuild)
	}
}

// rampFactor returns the slow-start weight factor for an endpoint first
// seen at since, and whether it is still ramping.
func (b *Balancer) rampFactor(now, since time.Time) (float64, bool) {
	if b.cfg.SlowStart <= 0 || since.IsZero() {
		return 1, false
	}
	age := now.Sub(since)
	if age >= b.cfg.SlowStart {
		return 1, false
	}
	f := math.Pow(max(age.Seconds(), 0)/b.cfg.SlowStart.Seconds(), 1/b.cfg.SlowStartAggression)
	return max(f, b.cfg.SlowStartMin), true
}

// State describes how the balancer routes right now.
type State struct {
	Revision  int64
	Endpoints int
	Ejected   int
	Ramping   int // endpoints in slow start
	Subsets   []SubsetState
}

// SubsetState describes one subset's route.
type SubsetState struct {
	Name      string
	Endpoints int  // matching the subset
	Tier      int  // tier in use; -1 in panic
	Panic     bool // too few healthy: balancing over all endpoints
	Local     bool // routing within the caller's zone
	Picking   int  // endpoints the algorithm chooses among
}

// State returns how the current route was built.
func (b *Balancer) State() State {
	s := b.route.Load().state
	s.Subsets = slices.Clone(s.Subsets)
	return s
}

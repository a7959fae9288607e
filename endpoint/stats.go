package endpoint

import (
	"math"
	"sync/atomic"
	"time"
)

// DefaultDecay is the time constant of the latency average: a sample's
// influence falls to 1/e after this long. Finagle uses 10 s; 5 s lets an
// instance that was slow (or hung) win calls back within ~15 s once its
// peers are measured again, instead of ~35 s.
const DefaultDecay = 5 * time.Second

// unmeasuredCost is the cost of an endpoint with requests in flight but no
// latency sample yet: high enough that a new endpoint gets one request at a
// time until it has answered.
const unmeasuredCost = 1e12

// Stats counts what happens on one endpoint. All methods are safe for
// concurrent use and do not allocate.
type Stats struct {
	inflight atomic.Int64
	ewma     atomic.Uint64 // float64 bits: peak-EWMA latency in ns
	stamp    atomic.Int64  // mono.Now() of the last latency sample
	streak   atomic.Int32  // consecutive failures
	ok       atomic.Int64  // successes since the last TakeWindow
	failed   atomic.Int64  // failures since the last TakeWindow
	group    *Group        // set once by Join before sharing; may be nil
}

// Begin records a request sent to the endpoint.
func (s *Stats) Begin() {
	s.inflight.Add(1)
	if s.group != nil {
		s.group.inflight.Add(1)
	}
}

// End records the outcome of a request started with Begin and returns the
// number of consecutive failures including this one (0 on success).
// now comes from the same clock on every call (the balancer uses
// internal/mono).
func (s *Stats) End(now int64, rtt time.Duration, failed bool) (streak int32) {
	s.observe(now, float64(rtt))
	return s.Finish(failed)
}

// Finish is End without a latency sample, for balancers that do not use
// latency.
func (s *Stats) Finish(failed bool) (streak int32) {
	s.inflight.Add(-1)
	if s.group != nil {
		s.group.inflight.Add(-1)
	}
	if failed {
		s.failed.Add(1)
		return s.streak.Add(1)
	}
	s.ok.Add(1)
	if s.streak.Load() != 0 { // avoid dirtying the cache line on the common path
		s.streak.Store(0)
	}
	return 0
}

// observe folds a latency sample into the peak EWMA: a slower sample is
// taken at once, a faster one decays in with the time since the last one.
// Concurrent updates may lose a sample; the average stays valid.
func (s *Stats) observe(now int64, rtt float64) {
	prev := math.Float64frombits(s.ewma.Load())
	last := s.stamp.Swap(now)
	next := rtt
	if rtt < prev {
		elapsed := float64(now - last)
		if elapsed < 0 {
			elapsed = 0
		}
		w := decay(elapsed / float64(DefaultDecay))
		next = prev*w + rtt*(1-w)
	}
	s.ewma.Store(math.Float64bits(next))
}

// decay approximates exp(-x) for x ≥ 0 within 2% where it matters (x < 1)
// and stays positive and decreasing beyond; math.Exp costs several times
// more on the call path.
func decay(x float64) float64 {
	return 1 / (1 + x*(1+x*(0.5+x*(1.0/6))))
}

// Inflight returns the requests sent and not yet ended.
func (s *Stats) Inflight() int64 { return s.inflight.Load() }

// Latency returns the peak-EWMA latency, 0 before the first sample.
func (s *Stats) Latency() time.Duration {
	return time.Duration(math.Float64frombits(s.ewma.Load()))
}

// Cost is the P2C least-request score: latency times outstanding work
// (Finagle's peak EWMA). An endpoint never measured costs nothing while
// idle and a lot while busy, so it is probed one request at a time.
func (s *Stats) Cost() float64 { return s.CostAt(0) }

// CostAt is Cost with the latency decayed to now (a Clock reading; 0: no
// decay), as Finagle does when it reads the cost: an endpoint that was
// slow and then got no calls — because it was slow — would otherwise keep
// its peak for ever and never be tried again.
func (s *Stats) CostAt(now int64) float64 {
	n := float64(s.inflight.Load() + 1)
	lat := math.Float64frombits(s.ewma.Load())
	if lat == 0 {
		if n > 1 {
			return unmeasuredCost * n
		}
		return 0
	}
	if now != 0 {
		if idle := now - s.stamp.Load(); idle > int64(DefaultDecay)/16 {
			lat *= decay(float64(idle) / float64(DefaultDecay))
		}
	}
	return lat * n
}

// Clock is a coarse clock fed by the latency samples' clock readings, so
// that pickers can age costs without reading the clock on every pick
// (tens of nanoseconds on virtual machines). It lags by the gap between
// samples: microseconds under load.
type Clock struct{ now atomic.Int64 }

// Observe advances the clock to now, writing at most once a millisecond
// so that the value stays in every core's cache.
func (c *Clock) Observe(now int64) {
	if now-c.now.Load() > int64(time.Millisecond) {
		c.now.Store(now)
	}
}

// Now returns the latest reading, 0 before the first (or on a nil Clock).
func (c *Clock) Now() int64 {
	if c == nil {
		return 0
	}
	return c.now.Load()
}

// Streak returns the current run of consecutive failures.
func (s *Stats) Streak() int32 { return s.streak.Load() }

// TakeWindow returns the successes and failures since the previous call
// and starts a new window.
func (s *Stats) TakeWindow() (ok, failed int64) {
	return s.ok.Swap(0), s.failed.Swap(0)
}

// Group counts the requests in flight across a set of endpoints, so that
// bounded-load hashing can compare one endpoint with the average in O(1).
type Group struct{ inflight atomic.Int64 }

// Inflight returns the requests in flight across the group.
func (g *Group) Inflight() int64 { return g.inflight.Load() }

// Join makes s count towards g. Call it before s is shared.
func (s *Stats) Join(g *Group) { s.group = g }

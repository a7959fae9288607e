package endpoint

import (
	"math"
	"testing"
	"time"
)

func TestDecay(t *testing.T) {
	for _, x := range []float64{0, 0.01, 0.1, 0.5, 1} {
		if got, want := decay(x), math.Exp(-x); math.Abs(got-want)/want > 0.02 {
			t.Errorf("decay(%v) = %v, want %v ± 2%%", x, got, want)
		}
	}
	prev := 1.0
	for x := 0.0; x < 100; x += 0.5 {
		d := decay(x)
		if d <= 0 || d > prev {
			t.Fatalf("decay(%v) = %v: not positive and non-increasing (previous %v)", x, d, prev)
		}
		prev = d
	}
}

func TestPeakEWMA(t *testing.T) {
	var s Stats
	s.Begin()
	s.End(0, 10*time.Millisecond, false)
	// A slower sample is taken at once (peak sensitivity).
	s.Begin()
	s.End(int64(time.Millisecond), 50*time.Millisecond, false)
	if got := s.Latency(); got != 50*time.Millisecond {
		t.Errorf("Latency() after a slow sample = %v, want 50ms", got)
	}
	// Faster samples decay in with time: one decay constant later the old
	// value weighs about 1/e.
	s.Begin()
	s.End(int64(time.Millisecond+DefaultDecay), 10*time.Millisecond, false)
	want := 10e6 + 40e6*math.Exp(-1)
	if got := float64(s.Latency()); math.Abs(got-want)/want > 0.02 {
		t.Errorf("Latency() one decay constant later = %v, want ≈ %v", time.Duration(got), time.Duration(want))
	}
}

func TestCostAndStreak(t *testing.T) {
	var s Stats
	if c := s.Cost(); c != 0 {
		t.Errorf("idle unmeasured Cost() = %v, want 0", c)
	}
	s.Begin()
	s.Begin()
	if c := s.Cost(); c != unmeasuredCost*3 {
		t.Errorf("busy unmeasured Cost() = %v, want %v", c, unmeasuredCost*3)
	}
	if got := s.End(1, time.Millisecond, true); got != 1 {
		t.Errorf("End(failed) streak = %d, want 1", got)
	}
	if got := s.End(2, time.Millisecond, false); got != 0 || s.Streak() != 0 {
		t.Errorf("End(ok) streak = %d, Streak() = %d, want 0, 0", got, s.Streak())
	}
	if ok, failed := s.TakeWindow(); ok != 1 || failed != 1 {
		t.Errorf("TakeWindow() = %d, %d, want 1, 1", ok, failed)
	}
	if ok, failed := s.TakeWindow(); ok != 0 || failed != 0 {
		t.Errorf("second TakeWindow() = %d, %d, want 0, 0", ok, failed)
	}
	if s.Inflight() != 0 {
		t.Errorf("Inflight() = %d, want 0", s.Inflight())
	}
}

func TestFromInstanceTier(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int
	}{{"", 0}, {"0", 0}, {"1", 1}, {"12", 12}, {"-1", 0}, {"x", 0}, {"1234", 0}} {
		if got := parseTier(tc.in); got != tc.want {
			t.Errorf("parseTier(%q) = %d, want %d", tc.in, got, tc.want)
		}
	}
}

func TestCostAgesWhileAnEndpointGetsNoCalls(t *testing.T) {
	var s Stats
	s.Begin()
	const start = int64(time.Second)
	s.End(start, 50*time.Millisecond, false)
	if got := s.CostAt(start); got != float64(50*time.Millisecond) {
		t.Fatalf("CostAt(sample time) = %v, want the sample", got)
	}
	if got, want := s.CostAt(0), float64(50*time.Millisecond); got != want {
		t.Fatalf("CostAt(0) = %v, want no aging", got)
	}
	prev := s.CostAt(start)
	for _, after := range []time.Duration{time.Second, 5 * time.Second, 15 * time.Second, time.Minute} {
		got := s.CostAt(start + int64(after))
		if got >= prev {
			t.Errorf("cost %v after %v idle is not below %v", got, after, prev)
		}
		prev = got
	}
	// After three time constants a 50 ms peak costs less than a peer
	// measured just now at 2 ms with one call in flight: the endpoint is
	// tried again.
	now := start + int64(3*DefaultDecay)
	var peer Stats
	peer.Begin()
	peer.End(now, 2*time.Millisecond, false)
	peer.Begin()
	if a, b := s.CostAt(now), peer.CostAt(now); a >= b {
		t.Errorf("after %v idle the slow endpoint costs %v, its busy peer %v", 3*DefaultDecay, a, b)
	}
}

func TestClockAdvancesCoarsely(t *testing.T) {
	var c Clock
	if c.Now() != 0 || (*Clock)(nil).Now() != 0 {
		t.Fatal("a new clock reads 0")
	}
	c.Observe(int64(10 * time.Millisecond))
	c.Observe(int64(10*time.Millisecond + 500*time.Microsecond)) // under 1 ms later: not written
	if got := c.Now(); got != int64(10*time.Millisecond) {
		t.Fatalf("Now = %v", time.Duration(got))
	}
	c.Observe(int64(12 * time.Millisecond))
	if got := c.Now(); got != int64(12*time.Millisecond) {
		t.Fatalf("Now = %v", time.Duration(got))
	}
}

package balancer_test

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"beacon.dev/beacon/balancer"
	"beacon.dev/beacon/balancer/leastconn"
	"beacon.dev/beacon/balancer/maglev"
	"beacon.dev/beacon/balancer/p2c"
	"beacon.dev/beacon/balancer/random"
	"beacon.dev/beacon/balancer/ringhash"
	"beacon.dev/beacon/balancer/roundrobin"
	"beacon.dev/beacon/balancer/wrr"
	"beacon.dev/beacon/endpoint"
	"beacon.dev/beacon/internal/chisq"
)

// seeded returns a deterministic random source, so that a chi-squared
// test gives the same verdict on every run.
func seeded(seed uint64) func() uint64 {
	return rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)).Uint64
}

func endpoints(weights ...int) []*endpoint.Endpoint {
	eps := make([]*endpoint.Endpoint, len(weights))
	for i, w := range weights {
		eps[i] = &endpoint.Endpoint{ID: fmt.Sprintf("ep-%03d", i), Addr: fmt.Sprintf("127.0.0.1:%d", 10000+i), Weight: w, Stats: new(endpoint.Stats)}
	}
	return eps
}

func counts(t *testing.T, p balancer.Picker, eps []*endpoint.Endpoint, n int, key func() uint64) []int {
	t.Helper()
	index := make(map[*endpoint.Endpoint]int, len(eps))
	for i, e := range eps {
		index[e] = i
	}
	got := make([]int, len(eps))
	for range n {
		info := balancer.PickInfo{}
		if key != nil {
			info = balancer.PickInfo{Key: key(), HasKey: true}
		}
		e, err := p.Pick(info)
		if err != nil {
			t.Fatalf("Pick() error = %v", err)
		}
		got[index[e]]++
	}
	return got
}

func weightsOf(eps []*endpoint.Endpoint) []float64 {
	out := make([]float64, len(eps))
	for i, e := range eps {
		out[i] = float64(e.Weight)
	}
	return out
}

func uniform(n int) []float64 {
	out := make([]float64, n)
	for i := range out {
		out[i] = 1
	}
	return out
}

// TestDistributions checks each algorithm's long-run shares against its
// specification with a chi-squared test.
func TestDistributions(t *testing.T) {
	weights := []int{100, 200, 300, 400, 50, 950}
	for _, tc := range []struct {
		builder  balancer.Builder
		weighted bool
		keyed    bool
	}{
		{roundrobin.Builder{}, false, false},
		{wrr.Builder{}, true, false},
		{random.Builder{}, true, false},
		// Idle endpoints all cost 0, so P2C keeps the first of two distinct
		// uniform draws: uniform, whatever the weights.
		{p2c.Builder{}, false, false},
		{maglev.Builder{}, true, true},
	} {
		t.Run(tc.builder.Name(), func(t *testing.T) {
			eps := endpoints(weights...)
			want := weightsOf(eps)
			if !tc.weighted {
				want = uniform(len(eps))
			}
			p := tc.builder.Build(eps, balancer.BuildOptions{Rand: seeded(1)})
			var key func() uint64
			if tc.keyed {
				key = seeded(2)
			}
			got := counts(t, p, eps, 60000, key)
			if err := chisq.Fit(got, want); err != nil {
				t.Errorf("%s shares %v: %v", tc.builder.Name(), got, err)
			}
		})
	}
}

func TestRoundRobinIsExact(t *testing.T) {
	eps := endpoints(1, 1, 1, 1, 1)
	p := roundrobin.Builder{}.Build(eps, balancer.BuildOptions{Rand: seeded(3)})
	got := counts(t, p, eps, 5*1000, nil)
	for i, c := range got {
		// Each of the 64 counter shards cycles exactly; together they may
		// differ by one pick per shard.
		if c < 1000-64 || c > 1000+64 {
			t.Errorf("endpoint %d picked %d times in 5000, want 1000 ± 64", i, c)
		}
	}
}

func TestSmoothWeightedRoundRobin(t *testing.T) {
	// nginx's own example: weights 5, 1, 1 give a a b a c a a.
	if got, want := fmt.Sprint(wrr.Schedule([]int{5, 1, 1}, 7)), "[0 0 1 0 2 0 0]"; got != want {
		t.Errorf("Schedule(5,1,1) = %s, want %s", got, want)
	}
	// One period holds each endpoint exactly its weight times, for the
	// precomputed schedule and the locked fallback alike.
	for _, weights := range [][]int{{3, 1, 2}, {7919, 7907, 10000, 9973, 9967, 9949, 9941, 9931}} {
		eps := endpoints(weights...)
		period := 0
		for _, w := range weights {
			period += w
		}
		p := wrr.Builder{}.Build(eps, balancer.BuildOptions{Rand: seeded(4)})
		got := counts(t, p, eps, period, nil)
		for i, c := range got {
			if c != weights[i] {
				t.Errorf("period %d: endpoint %d picked %d times, want %d", period, i, c, weights[i])
			}
		}
	}
}

func TestP2CAvoidsLoadAndLatency(t *testing.T) {
	eps := endpoints(100, 100, 100)
	p := p2c.Builder{}.Build(eps, balancer.BuildOptions{Rand: seeded(5)})
	now := int64(1e9)
	// ep-000 answers in 50 ms, the others in 1 ms.
	for i, e := range eps {
		e.Stats.Begin()
		rtt := []time.Duration{50 * time.Millisecond, time.Millisecond, time.Millisecond}[i]
		e.Stats.End(now, rtt, false)
	}
	got := counts(t, p, eps, 3000, nil)
	// The slow endpoint can only win a draw against itself, which P2C never
	// makes: it gets nothing.
	if got[0] != 0 {
		t.Errorf("slow endpoint picked %d of 3000 times, want 0", got[0])
	}
	// Among equals, in-flight work decides: load ep-001.
	for range 5 {
		eps[1].Stats.Begin()
	}
	p = p2c.Builder{}.Build(eps[1:], balancer.BuildOptions{Rand: seeded(5)})
	got = counts(t, p, eps[1:], 1000, nil)
	if got[0] != 0 {
		t.Errorf("busy endpoint picked %d of 1000 times against an idle equal, want 0", got[0])
	}
}

// A retry's Avoid is certain for the two-choice pickers, whatever the
// costs: a fast-failing endpoint (cheapest by latency, or idle) is never
// the retry's pick while another is there.
func TestTwoChoicePickersHonourAvoid(t *testing.T) {
	for _, b := range []balancer.Builder{p2c.Builder{}, leastconn.Builder{}} {
		t.Run(b.Name(), func(t *testing.T) {
			eps := endpoints(100, 100)
			// ep-000 failed in 10 µs; ep-001 answers in 5 ms and is busy.
			eps[0].Stats.Begin()
			eps[0].Stats.End(1e9, 10*time.Microsecond, true)
			eps[1].Stats.Begin()
			eps[1].Stats.End(1e9, 5*time.Millisecond, false)
			eps[1].Stats.Begin()
			p := b.Build(eps, balancer.BuildOptions{Rand: seeded(9)})
			for i := range 1000 {
				e, err := p.Pick(balancer.PickInfo{Avoid: "ep-000"})
				if err != nil || e.ID != "ep-001" {
					t.Fatalf("pick %d avoiding ep-000 = %v, %v; want ep-001", i, e, err)
				}
			}
			if got := counts(t, p, eps, 1000, nil); got[0] != 1000 {
				t.Errorf("without Avoid the cheaper ep-000 got %d of 1000, want all", got[0])
			}
		})
	}
}

// Least request weighs connections in flight by weight and ignores
// latency: the busier endpoint loses every draw, the slower one does not.
func TestLeastConnFollowsInflight(t *testing.T) {
	eps := endpoints(100, 100, 100)
	eps[0].Stats.Begin()
	eps[0].Stats.End(1e9, 500*time.Millisecond, false) // slow, idle
	for range 3 {
		eps[1].Stats.Begin() // three connections open
	}
	p := leastconn.Builder{}.Build(eps, balancer.BuildOptions{Rand: seeded(3)})
	got := counts(t, p, eps, 3000, nil)
	if got[1] != 0 {
		t.Errorf("busy endpoint picked %d of 3000 times, want 0", got[1])
	}
	if err := chisq.Fit([]int{got[0], got[2]}, uniform(2)); err != nil {
		t.Errorf("the two idle endpoints' shares %v: %v (latency must not matter)", got, err)
	}
	// Weight divides the load: weight 200 with 2 open (3/200) is less
	// loaded than weight 100 with 1 open (2/100).
	heavy := endpoints(100, 200)
	heavy[0].Stats.Begin() // 1 open at weight 100: load 2/100
	for range 2 {
		heavy[1].Stats.Begin() // 2 open at weight 200: load 3/200
	}
	p = leastconn.Builder{}.Build(heavy, balancer.BuildOptions{Rand: seeded(4)})
	if got := counts(t, p, heavy, 1000, nil); got[1] != 1000 {
		t.Errorf("weight 200 with 2 open vs weight 100 with 1 open: %v, want all on the heavier", got)
	}
}

// TestConsistentHashRemapsMinimalShare adds and removes one endpoint of
// ten and checks which keys move.
func TestConsistentHashRemapsMinimalShare(t *testing.T) {
	for _, tc := range []struct {
		builder balancer.Builder
		// Keys that move between old endpoints, as a fraction: 0 for a ring;
		// maglev trades a little disruption for even spread.
		maxCollateral float64
	}{
		{ringhash.Builder{}, 0},
		{maglev.Builder{}, 0.02},
	} {
		t.Run(tc.builder.Name(), func(t *testing.T) {
			all := endpoints(100, 100, 100, 100, 100, 100, 100, 100, 100, 100, 100)
			before := tc.builder.Build(all[:10], balancer.BuildOptions{})
			after := tc.builder.Build(all, balancer.BuildOptions{})
			const n = 100000
			keys := seeded(6)
			moved, collateral := 0, 0
			for range n {
				info := balancer.PickInfo{Key: keys(), HasKey: true}
				a, _ := before.Pick(info)
				b, _ := after.Pick(info)
				if a.ID != b.ID {
					moved++
					if b.ID != all[10].ID {
						collateral++
					}
				}
			}
			// The new endpoint should take about 1/11 of the keys.
			if share := float64(moved) / n; share < 0.5/11 || share > 2.0/11 {
				t.Errorf("%.3f of keys moved on adding 1 endpoint to 10, want ≈ %.3f", share, 1.0/11)
			}
			if c := float64(collateral) / n; c > tc.maxCollateral {
				t.Errorf("%.4f of keys moved between old endpoints, want ≤ %.4f", c, tc.maxCollateral)
			}
		})
	}
}

func TestConsistentHashIsStableAcrossBuilds(t *testing.T) {
	for _, b := range []balancer.Builder{ringhash.Builder{}, maglev.Builder{}} {
		eps := endpoints(100, 300, 100)
		p1, p2 := b.Build(eps, balancer.BuildOptions{}), b.Build(endpoints(100, 300, 100), balancer.BuildOptions{})
		for _, k := range []string{"alice", "bob", "carol", "dave"} {
			info := balancer.PickInfo{Key: balancer.HashKey(k), HasKey: true}
			a, _ := p1.Pick(info)
			c, _ := p2.Pick(info)
			if a.ID != c.ID {
				t.Errorf("%s: key %q went to %s then %s", b.Name(), k, a.ID, c.ID)
			}
		}
	}
}

func TestRingHashWeights(t *testing.T) {
	// A ring's shares are fixed by where the points fall, not sampled, so
	// this checks them against the weights with the spread expected from
	// the number of points (≈ 1/sqrt(points) relative).
	eps := endpoints(100, 200, 300, 400)
	p := ringhash.Builder{PointsPerWeight: 10}.Build(eps, balancer.BuildOptions{})
	got := counts(t, p, eps, 100000, seeded(7))
	for i, c := range got {
		want := 100000 * float64(eps[i].Weight) / 1000
		if d := (float64(c) - want) / want; d < -0.1 || d > 0.1 {
			t.Errorf("endpoint %d (weight %d): %d keys, want %.0f ± 10%%", i, eps[i].Weight, c, want)
		}
	}
}

func TestBoundedLoad(t *testing.T) {
	for _, b := range []balancer.Builder{ringhash.Builder{LoadFactor: 1.25}, maglev.Builder{LoadFactor: 1.25}} {
		t.Run(b.Name(), func(t *testing.T) {
			var group endpoint.Group
			eps := endpoints(100, 100, 100, 100)
			for _, e := range eps {
				e.Stats.Join(&group)
			}
			p := b.Build(eps, balancer.BuildOptions{Group: &group})
			// Every call has the same key and none finishes: without a bound
			// one endpoint would hold all 40.
			info := balancer.PickInfo{Key: balancer.HashKey("hot"), HasKey: true}
			for range 40 {
				e, err := p.Pick(info)
				if err != nil {
					t.Fatal(err)
				}
				e.Stats.Begin()
			}
			limit := balancer.LoadLimit(1.25, 39, 4)
			for _, e := range eps {
				if e.Stats.Inflight() > limit {
					t.Errorf("%s holds %d in flight, bound %d", e.ID, e.Stats.Inflight(), limit)
				}
			}
		})
	}
}

func TestEmptyPickers(t *testing.T) {
	for _, b := range []balancer.Builder{roundrobin.Builder{}, wrr.Builder{}, random.Builder{}, p2c.Builder{}, leastconn.Builder{}, ringhash.Builder{}, maglev.Builder{}} {
		if _, err := b.Build(nil, balancer.BuildOptions{}).Pick(balancer.PickInfo{}); err != balancer.ErrNoEndpoint {
			t.Errorf("%s: Pick() on no endpoints = %v, want ErrNoEndpoint", b.Name(), err)
		}
	}
}

func TestHelpers(t *testing.T) {
	for _, tc := range []struct {
		r    uint64
		n    int
		want int
	}{{0, 10, 0}, {^uint64(0), 10, 9}, {1 << 63, 10, 5}, {1 << 63, 3, 1}} {
		if got := balancer.Bound(tc.r, tc.n); got != tc.want {
			t.Errorf("Bound(%#x, %d) = %d, want %d", tc.r, tc.n, got, tc.want)
		}
	}
	for _, tc := range []struct {
		factor   float64
		inflight int64
		n        int
		want     int64
	}{{1.25, 0, 4, 1}, {1.25, 39, 4, 13}, {1.25, 7, 4, 3}, {2, 99, 10, 20}} {
		if got := balancer.LoadLimit(tc.factor, tc.inflight, tc.n); got != tc.want {
			t.Errorf("LoadLimit(%v, %d, %d) = %d, want %d", tc.factor, tc.inflight, tc.n, got, tc.want)
		}
	}
	// HashKey must never change: keys would move on upgrade.
	if got, want := balancer.HashKey("user-42"), uint64(0x397e9d3a76af7c81); got != want {
		t.Errorf("HashKey(user-42) = %#x, want %#x", got, want)
	}
}

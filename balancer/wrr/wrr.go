// Package wrr implements nginx's smooth weighted round robin: over one
// period of sum(weights) picks every endpoint is chosen exactly weight
// times, interleaved rather than in bursts.
package wrr

import (
	"sync"
	"sync/atomic"

	"beacon.dev/beacon/balancer"
	"beacon.dev/beacon/endpoint"
)

// MaxPrecomputed bounds the schedule computed at build time. Services whose
// period (sum of weights divided by their GCD) is longer fall back to
// running the algorithm under a mutex on every pick.
const MaxPrecomputed = 1 << 16

// Builder builds smooth weighted round-robin pickers.
type Builder struct{}

var _ balancer.Builder = Builder{}

func (Builder) Name() string { return "weighted_round_robin" }

func (Builder) Build(eps []*endpoint.Endpoint, opts balancer.BuildOptions) balancer.Picker {
	if len(eps) == 0 {
		return &scheduled{}
	}
	weights := reducedWeights(eps)
	period := 0
	for _, w := range weights {
		period += w
	}
	start := uint64(balancer.Bound(opts.RandFunc()(), period))
	if period <= MaxPrecomputed {
		s := &scheduled{eps: eps, order: Schedule(weights, period)}
		s.next.Store(start)
		return s
	}
	l := &locked{eps: eps, state: newState(weights)}
	for range start % uint64(len(eps)) { // desynchronise clients cheaply
		l.state.next()
	}
	return l
}

// Schedule returns the first n picks of smooth weighted round robin over
// the given weights, as indexes.
func Schedule(weights []int, n int) []int32 {
	st := newState(weights)
	out := make([]int32, n)
	for i := range out {
		out[i] = int32(st.next())
	}
	return out
}

// state is nginx's algorithm: every pick adds each weight to its current
// value, takes the largest, and subtracts the total from it.
type state struct {
	weights, current []int
	total            int
}

func newState(weights []int) *state {
	st := &state{weights: weights, current: make([]int, len(weights))}
	for _, w := range weights {
		st.total += w
	}
	return st
}

func (st *state) next() int {
	best := 0
	for i, w := range st.weights {
		st.current[i] += w
		if st.current[i] > st.current[best] {
			best = i
		}
	}
	st.current[best] -= st.total
	return best
}

// reducedWeights divides the weights by their GCD, which shortens the
// period without changing the sequence.
func reducedWeights(eps []*endpoint.Endpoint) []int {
	g := 0
	for _, e := range eps {
		g = gcd(g, e.Weight)
	}
	out := make([]int, len(eps))
	for i, e := range eps {
		out[i] = e.Weight / g
	}
	return out
}

func gcd(a, b int) int {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

type scheduled struct {
	eps   []*endpoint.Endpoint
	order []int32
	next  atomic.Uint64
}

func (s *scheduled) Pick(balancer.PickInfo) (*endpoint.Endpoint, error) {
	if len(s.order) == 0 {
		return nil, balancer.ErrNoEndpoint
	}
	i := s.next.Add(1) - 1
	return s.eps[s.order[i%uint64(len(s.order))]], nil
}

type locked struct {
	eps   []*endpoint.Endpoint
	mu    sync.Mutex
	state *state // guarded by mu
}

func (l *locked) Pick(balancer.PickInfo) (*endpoint.Endpoint, error) {
	l.mu.Lock()
	i := l.state.next()
	l.mu.Unlock()
	return l.eps[i], nil
}

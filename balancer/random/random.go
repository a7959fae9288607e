// Package random picks endpoints at random in proportion to their weights,
// in O(1) per pick with Vose's alias method.
package random

import (
	"math/bits"

	"beacon.dev/beacon/balancer"
	"beacon.dev/beacon/endpoint"
)

// Builder builds weighted-random pickers.
type Builder struct{}

var _ balancer.Builder = Builder{}

func (Builder) Name() string { return "weighted_random" }

func (Builder) Build(eps []*endpoint.Endpoint, opts balancer.BuildOptions) balancer.Picker {
	p := &picker{eps: eps, rand: opts.RandFunc()}
	p.prob, p.alias = aliasTable(eps)
	return p
}

type picker struct {
	eps   []*endpoint.Endpoint
	prob  []uint64 // threshold on a 64-bit draw: keep column i below it
	alias []int32
	rand  func() uint64
}

func (p *picker) Pick(balancer.PickInfo) (*endpoint.Endpoint, error) {
	n := len(p.eps)
	if n == 0 {
		return nil, balancer.ErrNoEndpoint
	}
	i := balancer.Bound(p.rand(), n)
	if p.rand() < p.prob[i] {
		return p.eps[i], nil
	}
	return p.eps[p.alias[i]], nil
}

// aliasTable builds Vose's alias table in integer arithmetic: column i keeps
// its own endpoint with probability prob[i]/2^64 and otherwise yields
// alias[i]. Each column holds total/n of the weight, scaled by n so that
// every quantity stays an exact integer.
func aliasTable(eps []*endpoint.Endpoint) (prob []uint64, alias []int32) {
	n := len(eps)
	prob, alias = make([]uint64, n), make([]int32, n)
	total := 0
	for _, e := range eps {
		total += e.Weight
	}
	scaled := make([]int, n) // weight × n; a full column is total
	var small, large []int32
	for i, e := range eps {
		scaled[i] = e.Weight * n
		if scaled[i] < total {
			small = append(small, int32(i))
		} else {
			large = append(large, int32(i))
		}
	}
	for len(small) > 0 && len(large) > 0 {
		s, l := small[len(small)-1], large[len(large)-1]
		small = small[:len(small)-1]
		prob[s] = fraction(scaled[s], total)
		alias[s] = l
		scaled[l] -= total - scaled[s]
		if scaled[l] < total {
			large = large[:len(large)-1]
			small = append(small, l)
		}
	}
	for _, l := range large {
		prob[l], alias[l] = ^uint64(0), l
	}
	for _, s := range small { // only rounding leftovers: full columns
		prob[s], alias[s] = ^uint64(0), s
	}
	return prob, alias
}

// fraction returns num/den scaled to 2^64; num < den.
func fraction(num, den int) uint64 {
	q, _ := bits.Div64(uint64(num), 0, uint64(den))
	return q
}

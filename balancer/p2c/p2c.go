// Package p2c implements power-of-two-choices least-request balancing: pick
// two endpoints at random and send the call to the cheaper one, where cost
// is peak-EWMA latency times requests in flight, divided by weight
// (Finagle's and linkerd's "P2C + peak EWMA").
package p2c

import (
	"beacon.dev/beacon/balancer"
	"beacon.dev/beacon/endpoint"
)

// Builder builds P2C pickers.
type Builder struct{}

var _ interface {
	balancer.Builder
	balancer.LatencyUser
} = Builder{}

func (Builder) Name() string { return "p2c_ewma" }

// UsesLatency tells the balancer to measure every call.
func (Builder) UsesLatency() bool { return true }

func (Builder) Build(eps []*endpoint.Endpoint, opts balancer.BuildOptions) balancer.Picker {
	p := &picker{eps: eps, rand: opts.RandFunc(), invWeight: make([]float64, len(eps)), clock: opts.Clock}
	for i, e := range eps {
		p.invWeight[i] = 1 / float64(e.Weight)
	}
	return p
}

type picker struct {
	eps       []*endpoint.Endpoint
	invWeight []float64
	rand      func() uint64
	clock     *endpoint.Clock
}

// Pick draws two distinct endpoints and takes the cheaper; the one named
// by info.Avoid (a retry's failed endpoint) is never chosen when the
// other is there: a backend that fails fast (a refused connection) looks
// cheap to the latency average and would otherwise win the retry too.
func (p *picker) Pick(info balancer.PickInfo) (*endpoint.Endpoint, error) {
	n := len(p.eps)
	switch n {
	case 0:
		return nil, balancer.ErrNoEndpoint
	case 1:
		return p.eps[0], nil
	}
	a, b, decided := balancer.TwoChoices(p.eps, p.rand(), info)
	if decided {
		return p.eps[a], nil
	}
	now := p.clock.Now()
	if cost(p.eps[b], p.invWeight[b], now) < cost(p.eps[a], p.invWeight[a], now) {
		return p.eps[b], nil
	}
	return p.eps[a], nil
}

func cost(e *endpoint.Endpoint, invWeight float64, now int64) float64 {
	if e.Stats == nil {
		return 0
	}
	return e.Stats.CostAt(now) * invWeight
}

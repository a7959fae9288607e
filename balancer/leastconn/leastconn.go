// Package leastconn implements least-request balancing without latency:
// pick two endpoints at random and send the call to the one with fewer
// calls (or connections) in flight per unit of weight — Envoy's
// LEAST_REQUEST with two choices, nginx's least_conn. It suits long-lived
// connections (the proxy's TCP mode), whose duration says nothing about
// an endpoint's speed and would mislead a latency-weighted P2C.
package leastconn

import (
	"beacon.dev/beacon/balancer"
	"beacon.dev/beacon/endpoint"
)

// Builder builds least-request pickers.
type Builder struct{}

var _ balancer.Builder = Builder{}

func (Builder) Name() string { return "least_request" }

func (Builder) Build(eps []*endpoint.Endpoint, opts balancer.BuildOptions) balancer.Picker {
	p := &picker{eps: eps, rand: opts.RandFunc(), invWeight: make([]float64, len(eps))}
	for i, e := range eps {
		p.invWeight[i] = 1 / float64(e.Weight)
	}
	return p
}

type picker struct {
	eps       []*endpoint.Endpoint
	invWeight []float64
	rand      func() uint64
}

// Pick draws two distinct endpoints; the one named by info.Avoid (the one
// a retry just failed on) is never chosen when the other is there.
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
	if load(p.eps[b], p.invWeight[b]) < load(p.eps[a], p.invWeight[a]) {
		return p.eps[b], nil
	}
	return p.eps[a], nil
}

func load(e *endpoint.Endpoint, invWeight float64) float64 {
	if e.Stats == nil {
		return 0
	}
	return float64(e.Stats.Inflight()+1) * invWeight
}

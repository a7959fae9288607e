// Package roundrobin picks endpoints in turn, ignoring weights.
package roundrobin

import (
	"sync/atomic"

	"beacon.dev/beacon/balancer"
	"beacon.dev/beacon/endpoint"
)

// Builder builds round-robin pickers.
type Builder struct{}

var _ balancer.Builder = Builder{}

func (Builder) Name() string { return "round_robin" }

// Build starts at a random position so that clients built at the same
// moment do not all hit the first endpoint together.
func (Builder) Build(eps []*endpoint.Endpoint, opts balancer.BuildOptions) balancer.Picker {
	p := &picker{eps: eps}
	p.next.Store(uint64(balancer.Bound(opts.RandFunc()(), len(eps))))
	return p
}

type picker struct {
	eps  []*endpoint.Endpoint
	next atomic.Uint64
}

func (p *picker) Pick(balancer.PickInfo) (*endpoint.Endpoint, error) {
	if len(p.eps) == 0 {
		return nil, balancer.ErrNoEndpoint
	}
	i := p.next.Add(1) - 1
	return p.eps[i%uint64(len(p.eps))], nil
}

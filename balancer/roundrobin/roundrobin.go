// Package roundrobin picks endpoints in turn, ignoring weights.
package roundrobin

import (
	"math/bits"
	"sync/atomic"

	"beacon.dev/beacon/balancer"
	"beacon.dev/beacon/endpoint"
)

// Builder builds round-robin pickers.
type Builder struct{}

var _ balancer.Builder = Builder{}

func (Builder) Name() string { return "round_robin" }

// shards spread the position counter: one shared atomic counter costs
// ~50 ns per pick when two cores contend for it, and 8 or 16 shards still
// ~37–49 ns on this machine (random collisions, and the adjacent-line
// prefetcher pairs 64-byte lines); 64 shards of 128 bytes (8 KiB per
// picker) bring two callers to ~25 ns. Each shard cycles over every
// endpoint, so the spread stays even (counts differ by at most the number
// of shards); only the strict global order is given up, which concurrent
// callers could not observe anyway.
const shards = 64

// Build starts each shard at a random position so that clients built at
// the same moment do not all hit the first endpoint together.
func (Builder) Build(eps []*endpoint.Endpoint, opts balancer.BuildOptions) balancer.Picker {
	n := max(len(eps), 1)
	p := &picker{eps: eps, rand: opts.RandFunc(), next: new([shards]counter), n: uint32(n), m: ^uint64(0)/uint64(n) + 1}
	for i := range p.next {
		p.next[i].n.Store(uint32(balancer.Bound(p.rand(), n)))
	}
	return p
}

// counter fills two cache lines; the array is its own 8 KiB allocation,
// page-aligned by the Go allocator, so no two shards share a line pair.
type counter struct {
	n atomic.Uint32
	_ [124]byte
}

type picker struct {
	eps  []*endpoint.Endpoint
	rand func() uint64
	next *[shards]counter
	n    uint32 // len(eps), at least 1
	m    uint64 // Lemire's fastmod constant for n: a division costs more than the rest of a pick
}

func (p *picker) Pick(info balancer.PickInfo) (*endpoint.Endpoint, error) {
	if len(p.eps) == 0 {
		return nil, balancer.ErrNoEndpoint
	}
	i := p.next[p.rand()&(shards-1)].n.Add(1) - 1
	ep := p.eps[fastmod(i, p.m, p.n)]
	if info.Avoid != "" && ep.ID == info.Avoid && len(p.eps) > 1 {
		ep = p.eps[fastmod(i+1, p.m, p.n)] // the next one in turn, never the same
	}
	return ep, nil
}

// fastmod returns a % d given m = ^uint64(0)/d + 1 (Lemire, Kaser, Kurz:
// "Faster Remainder by Direct Computation", 2019).
func fastmod(a uint32, m uint64, d uint32) uint32 {
	lowbits := m * uint64(a)
	hi, _ := bits.Mul64(lowbits, uint64(d))
	return uint32(hi)
}

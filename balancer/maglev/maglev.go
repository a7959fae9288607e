// Package maglev implements Maglev consistent hashing (Eisenbud et al.,
// NSDI 2016; Envoy's maglev): a lookup table of prime size filled from each
// endpoint's permutation of the slots, in proportion to its weight. Picks
// are one table read; a change moves slightly more than the minimal share
// of keys, in exchange for faster picks and even spread than a ring.
package maglev

import (
	"github.com/cespare/xxhash/v2"

	"beacon.dev/beacon/balancer"
	"beacon.dev/beacon/endpoint"
)

// DefaultTableSize is Envoy's default; it must be prime and should be well
// above 100 × the number of endpoints.
const DefaultTableSize = 65537

// Builder builds maglev pickers. The zero value is usable.
type Builder struct {
	// TableSize must be prime (default 65537).
	TableSize uint64
	// LoadFactor > 1 bounds each endpoint's in-flight requests to
	// LoadFactor × the average; 0 disables (see package ringhash).
	LoadFactor float64
}

var _ interface {
	balancer.Builder
	balancer.LoadBounder
} = Builder{}

func (Builder) Name() string { return "maglev" }

// BoundedLoad tells the balancer to count in-flight requests per service.
func (b Builder) BoundedLoad() bool { return b.LoadFactor > 1 }

func (b Builder) Build(eps []*endpoint.Endpoint, opts balancer.BuildOptions) balancer.Picker {
	p := &picker{eps: eps, rand: opts.RandFunc(), loadFactor: b.LoadFactor, group: opts.Group}
	if len(eps) == 0 {
		return p
	}
	m := b.TableSize
	if m == 0 {
		m = DefaultTableSize
	}
	p.table = populate(eps, m)
	return p
}

// populate fills the table: in turns, each endpoint claims its next free
// preferred slot, as long as its claims stay within its weight's share
// (Envoy's weighted variant: claims ≤ turn × weight / max weight).
func populate(eps []*endpoint.Endpoint, m uint64) []int32 {
	n := len(eps)
	offset, skip, next := make([]uint64, n), make([]uint64, n), make([]uint64, n)
	share, claimed := make([]float64, n), make([]float64, n)
	maxWeight := 0
	for _, e := range eps {
		maxWeight = max(maxWeight, e.Weight)
	}
	for i, e := range eps {
		h := xxhash.Sum64String(e.ID)
		offset[i] = h % m
		skip[i] = (h>>32|h<<32)%(m-1) + 1
		share[i] = float64(e.Weight) / float64(maxWeight)
	}
	table := make([]int32, m)
	for i := range table {
		table[i] = -1
	}
	filled := uint64(0)
	for turn := 1.0; filled < m; turn++ {
		for i := range n {
			if claimed[i]+1 > turn*share[i] {
				continue
			}
			claimed[i]++
			for {
				slot := (offset[i] + next[i]*skip[i]) % m
				next[i]++
				if table[slot] < 0 {
					table[slot] = int32(i)
					filled++
					break
				}
			}
			if filled == m {
				break
			}
		}
	}
	return table
}

type picker struct {
	eps        []*endpoint.Endpoint
	table      []int32
	rand       func() uint64
	loadFactor float64
	group      *endpoint.Group
}

func (p *picker) Pick(info balancer.PickInfo) (*endpoint.Endpoint, error) {
	if len(p.table) == 0 {
		return nil, balancer.ErrNoEndpoint
	}
	key := info.Key
	if !info.HasKey {
		key = p.rand()
	}
	m := uint64(len(p.table))
	i := key % m
	if p.loadFactor <= 1 || p.group == nil {
		return p.eps[p.table[i]], nil
	}
	limit := balancer.LoadLimit(p.loadFactor, p.group.Inflight(), len(p.eps))
	// Probe following slots: their owners are a key-stable, well-mixed
	// sequence of other endpoints.
	for range min(m, uint64(4*len(p.eps))) {
		e := p.eps[p.table[i]]
		if e.Stats == nil || e.Stats.Inflight() < limit {
			return e, nil
		}
		if i++; i == m {
			i = 0
		}
	}
	return p.eps[p.table[key%m]], nil
}

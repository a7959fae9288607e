// Package ringhash implements consistent hashing on a ring of virtual
// nodes (Karger et al.; Envoy's ring_hash): each endpoint owns points on a
// 64-bit ring in proportion to its weight, and a key goes to the first point
// at or after its hash. Adding or removing an endpoint moves only the keys
// of the points it gains or loses.
//
// With a load bound (Mirrokni et al., "Consistent Hashing with Bounded
// Loads"), a key whose endpoint already carries more than Factor times the
// average in-flight requests walks on to the next endpoint on the ring.
package ringhash

import (
	"math"
	"slices"
	"strconv"

	"github.com/cespare/xxhash/v2"

	"beacon.dev/beacon/balancer"
	"beacon.dev/beacon/endpoint"
)

// Builder builds ring-hash pickers. The zero value is usable.
type Builder struct {
	// PointsPerWeight sets an endpoint's points on the ring: weight ×
	// PointsPerWeight, at least 1 (default 1: 100 points at the default
	// weight). It does not depend on the other endpoints, which is what
	// keeps remapping minimal.
	PointsPerWeight float64
	// MaxRingSize caps the points (default 1<<20); beyond it every endpoint
	// is scaled down alike, and a change then moves more keys than needed.
	MaxRingSize int
	// LoadFactor > 1 bounds each endpoint's in-flight requests to
	// LoadFactor × the average (1.25 is the paper's example); 0 disables.
	LoadFactor float64
}

var _ interface {
	balancer.Builder
	balancer.LoadBounder
} = Builder{}

func (Builder) Name() string { return "ring_hash" }

// BoundedLoad tells the balancer to count in-flight requests per service.
func (b Builder) BoundedLoad() bool { return b.LoadFactor > 1 }

type point struct {
	hash uint64
	ep   int32
}

func (b Builder) Build(eps []*endpoint.Endpoint, opts balancer.BuildOptions) balancer.Picker {
	p := &picker{eps: eps, rand: opts.RandFunc(), loadFactor: b.LoadFactor, group: opts.Group}
	if len(eps) == 0 {
		return p
	}
	perWeight := b.PointsPerWeight
	if perWeight <= 0 {
		perWeight = 1
	}
	total := 0
	for _, e := range eps {
		total += e.Weight
	}
	maxSize := cmpOr(b.MaxRingSize, 1<<20)
	scale := min(perWeight, float64(maxSize)/float64(total))
	p.ring = make([]point, 0, int(float64(total)*scale)+len(eps))
	var buf []byte
	for i, e := range eps {
		n := max(1, int(math.Round(float64(e.Weight)*scale)))
		for v := range n {
			buf = strconv.AppendInt(append(append(buf[:0], e.ID...), '_'), int64(v), 10)
			p.ring = append(p.ring, point{hash: xxhash.Sum64(buf), ep: int32(i)})
		}
	}
	slices.SortFunc(p.ring, func(a, b point) int {
		if a.hash != b.hash {
			if a.hash < b.hash {
				return -1
			}
			return 1
		}
		return int(a.ep - b.ep) // deterministic on (improbable) collisions
	})
	return p
}

func cmpOr(v, def int) int {
	if v > 0 {
		return v
	}
	return def
}

type picker struct {
	eps        []*endpoint.Endpoint
	ring       []point
	rand       func() uint64
	loadFactor float64
	group      *endpoint.Group
}

func (p *picker) Pick(info balancer.PickInfo) (*endpoint.Endpoint, error) {
	if len(p.ring) == 0 {
		return nil, balancer.ErrNoEndpoint
	}
	key := info.Key
	if !info.HasKey {
		key = p.rand()
	}
	i, _ := slices.BinarySearchFunc(p.ring, key, func(pt point, k uint64) int {
		switch {
		case pt.hash < k:
			return -1
		case pt.hash > k:
			return 1
		}
		return 0
	})
	if i == len(p.ring) {
		i = 0
	}
	if p.loadFactor <= 1 || p.group == nil {
		return p.eps[p.ring[i].ep], nil
	}
	limit := balancer.LoadLimit(p.loadFactor, p.group.Inflight(), len(p.eps))
	first := p.ring[i].ep
	for range len(p.ring) {
		e := p.eps[p.ring[i].ep]
		if e.Stats == nil || e.Stats.Inflight() < limit {
			return e, nil
		}
		if i++; i == len(p.ring) {
			i = 0
		}
	}
	return p.eps[first], nil // every endpoint is at its bound: stay consistent
}

package balancer

import (
	"slices"

	"beacon.dev/beacon/endpoint"
)

// route is one immutable generation of routing: per subset, the pickers
// for the tier and zone chosen at build time.
type route struct {
	splits  []split
	stateOf []int // split i is state.Subsets[stateOf[i]]
	cum     []int // cumulative subset weights
	rand    func() uint64
	state   State
}

type split struct {
	all           Picker // nil when zone routing is active
	local, remote Picker // local zone; remote may be nil
	spill         float64
}

// pick returns an endpoint and the index of the split it came from.
func (r *route) pick(info PickInfo) (*endpoint.Endpoint, int, error) {
	i := 0
	switch len(r.splits) {
	case 0:
		return nil, 0, ErrNoEndpoint
	case 1:
	default:
		x := r.rand()
		if info.HasKey { // sticky: a key stays in its subset
			x = mix(info.Key)
		}
		t := Bound(x, r.cum[len(r.cum)-1])
		for r.cum[i] <= t {
			i++
		}
	}
	s := &r.splits[i]
	if s.all != nil {
		ep, err := s.all.Pick(info)
		return ep, i, err
	}
	ep, err := s.local.Pick(info)
	if err != nil || s.remote == nil || s.spill == 0 {
		return ep, i, err
	}
	other, err := s.remote.Pick(info)
	if err != nil {
		return ep, i, nil
	}
	if float64(ep.Stats.Inflight()) > s.spill*float64(other.Stats.Inflight()+1) {
		return other, i, nil
	}
	return ep, i, nil
}

// mix decorrelates the subset choice from the key's position on a hash
// ring (splitmix64's finaliser).
func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	return x ^ x>>31
}

func buildRoute(cfg Config, builder Builder, eps []*endpoint.Endpoint, ejected map[string]bool, opts BuildOptions) *route {
	r := &route{rand: opts.RandFunc(), state: State{Endpoints: len(eps), Ejected: len(ejected)}}
	subsets := cfg.Subsets
	if len(subsets) == 0 {
		subsets = []Subset{{Weight: 1}}
	}
	total := 0
	for _, sub := range subsets {
		var members []*endpoint.Endpoint
		for _, e := range eps {
			if sub.Match.Matches(e) {
				members = append(members, e)
			}
		}
		st := SubsetState{Name: sub.Name, Endpoints: len(members), Tier: -1}
		if len(members) > 0 {
			r.splits = append(r.splits, buildSplit(cfg, builder, members, ejected, opts, &st))
			r.stateOf = append(r.stateOf, len(r.state.Subsets))
			total += sub.Weight
			r.cum = append(r.cum, total)
		}
		r.state.Subsets = append(r.state.Subsets, st)
	}
	return r
}

// buildSplit chooses the tier (or panic) and the zone for one subset.
func buildSplit(cfg Config, builder Builder, members []*endpoint.Endpoint, ejected map[string]bool, opts BuildOptions, st *SubsetState) split {
	tiers := make([]int, 0, 2)
	for _, e := range members {
		if !slices.Contains(tiers, e.Tier) {
			tiers = append(tiers, e.Tier)
		}
	}
	slices.Sort(tiers)
	var chosen, inTier []*endpoint.Endpoint
	for _, t := range tiers {
		inTier = inTier[:0]
		var healthy []*endpoint.Endpoint
		for _, e := range members {
			if e.Tier == t {
				inTier = append(inTier, e)
				if !ejected[e.ID] {
					healthy = append(healthy, e)
				}
			}
		}
		if len(healthy) > 0 && float64(len(healthy)) >= cfg.PanicThreshold*float64(len(inTier)) {
			chosen, st.Tier = healthy, t
			break
		}
	}
	if chosen == nil {
		st.Panic, st.Picking = true, len(members)
		return split{all: builder.Build(members, opts)}
	}
	st.Picking = len(chosen)
	if cfg.Zone == "" {
		return split{all: builder.Build(chosen, opts)}
	}
	var local, remote []*endpoint.Endpoint
	localInTier := 0
	for _, e := range inTier {
		if e.Zone == cfg.Zone {
			localInTier++
		}
	}
	for _, e := range chosen {
		if e.Zone == cfg.Zone {
			local = append(local, e)
		} else {
			remote = append(remote, e)
		}
	}
	if len(local) == 0 || float64(len(local)) < cfg.ZoneMinHealthy*float64(localInTier) {
		return split{all: builder.Build(chosen, opts)}
	}
	st.Local, st.Picking = true, len(local)
	s := split{local: builder.Build(local, opts), spill: cfg.ZoneSpill}
	if len(remote) > 0 {
		s.remote = builder.Build(remote, opts)
	}
	return s
}

package balancer

import (
	"errors"
	"fmt"
	"maps"
	"time"

	"beacon.dev/beacon/endpoint"
)

// ErrInvalidConfig wraps every configuration error.
var ErrInvalidConfig = errors.New("balancer: invalid config")

// Config says how a Balancer narrows a service's endpoints before its
// algorithm picks among them. The steps run in this order: subset split,
// priority tier (with the panic threshold), zone, algorithm. The zero value
// balances across every healthy endpoint.
type Config struct {
	// Subsets split traffic between groups of endpoints by weight — a
	// canary gets 5 while stable gets 95. A group with no endpoints gives its
	// share to the others. Empty means one group of every endpoint.
	Subsets []Subset

	// PanicThreshold, a fraction in [0, 1]: when fewer than this share of
	// a tier's endpoints are healthy, that tier is not trusted with the
	// traffic; if no tier is, traffic goes to all endpoints, healthy or
	// not, rather than overloading the few survivors (Envoy's panic mode).
	// 0 disables. (Every share in the SDK is a fraction.)
	PanicThreshold float64

	// Zone is the caller's zone; "" disables zone-aware routing. Calls stay
	// in the zone while at least the ZoneMinHealthy share (default 0.7) of its
	// endpoints in the chosen tier are healthy, and go to every zone
	// otherwise.
	Zone           string
	ZoneMinHealthy float64
	// ZoneSpill > 0 also sends a call out of the zone when the local pick
	// has more than ZoneSpill × (in flight + 1) requests in flight compared
	// with a random remote endpoint: an overloaded zone sheds to the others.
	ZoneSpill float64

	// SlowStart ramps a new endpoint's weight from the SlowStartMin share
	// (default 0.1) to full over this window, along (age/window)^(1/
	// SlowStartAggression) (default aggression 1: linear). Endpoints that
	// join an empty service start at full weight. 0 disables.
	SlowStart           time.Duration
	SlowStartMin        float64
	SlowStartAggression float64
}

// Subset is one weighted group of endpoints.
type Subset struct {
	Name   string
	Weight int // > 0
	Match  Selector
}

// Selector matches endpoints by tags, metadata and version; every given
// condition must hold. The zero Selector matches everything.
type Selector struct {
	Tags     []string
	Metadata map[string]string
	Version  string
}

// Matches reports whether e satisfies s.
func (s Selector) Matches(e *endpoint.Endpoint) bool {
	if s.Version != "" && e.Version != s.Version {
		return false
	}
	for _, t := range s.Tags {
		if !e.HasTag(t) {
			return false
		}
	}
	for k, v := range s.Metadata {
		if got, ok := e.Metadata[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// MaxSubsets bounds Config.Subsets.
const MaxSubsets = 64

func (c Config) withDefaults() (Config, error) {
	if c.ZoneMinHealthy == 0 {
		c.ZoneMinHealthy = 0.7
	}
	if c.SlowStartMin == 0 {
		c.SlowStartMin = 0.1
	}
	if c.SlowStartAggression == 0 {
		c.SlowStartAggression = 1
	}
	c.Subsets = append([]Subset(nil), c.Subsets...)
	for i := range c.Subsets {
		c.Subsets[i].Match.Metadata = maps.Clone(c.Subsets[i].Match.Metadata)
	}
	switch {
	case !(c.PanicThreshold >= 0 && c.PanicThreshold <= 1):
		return c, fmt.Errorf("%w: panic threshold %v must be a fraction in [0, 1]", ErrInvalidConfig, c.PanicThreshold)
	case !(c.ZoneMinHealthy > 0 && c.ZoneMinHealthy <= 1):
		return c, fmt.Errorf("%w: zone min healthy %v must be a fraction in (0, 1]", ErrInvalidConfig, c.ZoneMinHealthy)
	case c.ZoneSpill < 0:
		return c, fmt.Errorf("%w: zone spill %v must not be negative", ErrInvalidConfig, c.ZoneSpill)
	case c.SlowStart < 0:
		return c, fmt.Errorf("%w: slow start %v must not be negative", ErrInvalidConfig, c.SlowStart)
	case !(c.SlowStartMin > 0 && c.SlowStartMin <= 1):
		return c, fmt.Errorf("%w: slow start min %v must be a fraction in (0, 1]", ErrInvalidConfig, c.SlowStartMin)
	case c.SlowStartAggression <= 0:
		return c, fmt.Errorf("%w: slow start aggression %v must be positive", ErrInvalidConfig, c.SlowStartAggression)
	case len(c.Subsets) > MaxSubsets:
		return c, fmt.Errorf("%w: %d subsets, at most %d", ErrInvalidConfig, len(c.Subsets), MaxSubsets)
	}
	names := make(map[string]bool, len(c.Subsets))
	for i, s := range c.Subsets {
		if s.Weight <= 0 {
			return c, fmt.Errorf("%w: subsets[%d] (%q) weight %d must be positive", ErrInvalidConfig, i, s.Name, s.Weight)
		}
		if names[s.Name] {
			return c, fmt.Errorf("%w: subsets[%d] name %q is used twice", ErrInvalidConfig, i, s.Name)
		}
		names[s.Name] = true
	}
	return c, nil
}

package endpoint

import (
	"slices"

	"beacon.dev/beacon/registry"
)

// MetaTier is the metadata key that places an endpoint in a priority tier:
// "0" (the default) for primaries, "1" and up for backups that take traffic
// only when the tiers before them cannot (nginx's "backup").
const MetaTier = "tier"

// Endpoint is one routable address of a service. Do not modify an Endpoint
// after handing it to a balancer; build a new one instead.
type Endpoint struct {
	ID       string
	Addr     string // "host:port"
	Weight   int    // ≥ 1
	Zone     string
	Tier     int // 0 primary; higher tiers are backups
	Version  string
	Tags     []string
	Metadata map[string]string
	// Suspect marks an endpoint used although the registry does not vouch
	// for it: it vanished in an unexplained mass loss and is kept for a
	// grace period, or it is unhealthy and used because its service fell
	// under its protection threshold (see package discovery).
	Suspect bool
	// Stats is shared by every generation of this endpoint; nil until a
	// balancer adopts the endpoint.
	Stats *Stats
}

// FromInstance converts a registry instance. A malformed tier is treated
// as 0.
func FromInstance(in *registry.Instance) *Endpoint {
	ep := &Endpoint{
		ID: in.ID, Addr: in.HostPort(), Weight: in.Weight, Zone: in.Zone,
		Version: in.Version, Tags: in.Tags, Metadata: in.Metadata, Suspect: in.Suspect,
	}
	if ep.Weight < 1 {
		ep.Weight = registry.DefaultWeight
	}
	ep.Tier = TierOf(in)
	return ep
}

// TierOf reads an instance's tier (metadata MetaTier): what the balancers
// and the server's DNS answers use.
func TierOf(in *registry.Instance) int { return parseTier(in.Metadata[MetaTier]) }

// parseTier reads a small non-negative integer; anything else is tier 0.
func parseTier(s string) int {
	if s == "" || len(s) > 3 {
		return 0
	}
	n := 0
	for _, c := range []byte(s) {
		if c < '0' || c > '9' {
			return 0
		}
		n = n*10 + int(c-'0')
	}
	return n
}

// HasTag reports whether the endpoint carries tag.
func (e *Endpoint) HasTag(tag string) bool { return slices.Contains(e.Tags, tag) }

// Set is the state of one service as the discovery cache sees it: a full
// list, never a delta, stamped with the registry revision it reflects.
type Set struct {
	Service   string
	Revision  int64
	Endpoints []*Endpoint // sorted by ID
	// FromDisk marks a set restored from the on-disk snapshot during a cold
	// start with the registry unreachable.
	FromDisk bool
}

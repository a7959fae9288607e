package balancer

import (
	"errors"
	"math"
	"math/bits"
	"math/rand/v2"

	"github.com/cespare/xxhash/v2"

	"beacon.dev/beacon/endpoint"
)

// ErrNoEndpoint means the service has no endpoint to send the call to. The
// caller may wait for discovery or fail the call.
var ErrNoEndpoint = errors.New("balancer: no endpoint available")

// PickInfo is what a picker may use from the call.
type PickInfo struct {
	// Key routes calls with the same key to the same endpoint under the
	// consistent-hashing pickers (ringhash, maglev); see HashKey. Others
	// ignore it.
	Key    uint64
	HasKey bool
	// Avoid names an endpoint a retry should not go back to (the one that
	// just failed). Round robin moves to the next endpoint; for the others
	// the balancer picks again, three times at most, so avoidance is likely
	// rather than certain (as with Envoy's previous_hosts predicate).
	Avoid string
}

// Picker chooses an endpoint for one call. Pickers are immutable: Pick never
// blocks, does no I/O and is safe for concurrent use.
type Picker interface {
	Pick(info PickInfo) (*endpoint.Endpoint, error)
}

// Builder makes a picker from a non-empty list of endpoints whose weights
// are final (slow start already applied).
type Builder interface {
	Name() string
	Build(eps []*endpoint.Endpoint, opts BuildOptions) Picker
}

// LatencyUser is a Builder whose pickers read latency: the balancer then
// measures every call's latency into the endpoints' Stats (the others
// skip that cost).
type LatencyUser interface {
	UsesLatency() bool
}

// LoadBounder is a Builder that bounds each endpoint's load against the
// average (consistent hashing with bounded loads): the balancer then
// counts requests in flight across the service (BuildOptions.Group).
type LoadBounder interface {
	BoundedLoad() bool
}

// BuildOptions carries what the balancer shares with every picker.
type BuildOptions struct {
	// Rand returns uniformly random 64-bit values. Nil means math/rand/v2,
	// which is safe for concurrent use; tests pass a seeded source.
	Rand func() uint64
	// Group counts requests in flight across the service, for bounded load.
	// Nil disables load bounds.
	Group *endpoint.Group
	// Clock, a coarse clock the balancer advances with its latency
	// samples, lets latency-aware pickers age costs (Stats.CostAt). Nil
	// means no aging.
	Clock *endpoint.Clock
}

// RandFunc returns o.Rand or the shared concurrent-safe source.
func (o BuildOptions) RandFunc() func() uint64 {
	if o.Rand != nil {
		return o.Rand
	}
	return rand.Uint64
}

// HashKey hashes a request key (a user ID, a session, a cache key) for
// PickInfo.Key. It is stable across processes and releases.
func HashKey(key string) uint64 { return xxhash.Sum64String(key) }

// Bound reduces a random 64-bit value to [0, n) without modulo bias worth
// measuring (Lemire's multiply-shift).
func Bound(r uint64, n int) int {
	hi, _ := bits.Mul64(r, uint64(n))
	return int(hi)
}

// TwoChoices draws two distinct indices in [0, n), n ≥ 2, from one random
// value, for the power-of-two-choices pickers. When info.Avoid names the
// endpoint at one of them (a retry's failed endpoint), decided is true and
// first is the other: a retry never goes back while another is drawn.
func TwoChoices(eps []*endpoint.Endpoint, r uint64, info PickInfo) (first, second int, decided bool) {
	n := len(eps)
	a := Bound(r, n)
	b := Bound(r<<32|r>>32, n-1) // a second draw from the same value
	if b >= a {
		b++
	}
	switch info.Avoid {
	case "":
	case eps[a].ID:
		return b, a, true
	case eps[b].ID:
		return a, b, true
	}
	return a, b, false
}

// LoadLimit is the bounded-load cap: no endpoint may carry more than
// ceil(factor × (inflight+1) / n) requests, counting the one being placed.
func LoadLimit(factor float64, inflight int64, n int) int64 {
	return int64(math.Ceil(factor * float64(inflight+1) / float64(n)))
}

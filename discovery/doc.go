// Package discovery keeps the client's view of services: it follows the
// registry through a watch and turns each full snapshot into an
// endpoint.Set for the balancers, stamped with the registry revision.
//
// The cache is built to survive the registry: a registry error or outage
// never empties a set (last-known-good, with its staleness exposed); an
// optional on-disk snapshot serves a cold start while the registry is
// unreachable; and a sudden loss of a large share of a service's
// endpoints by lease expiry is held back for a grace period, because it
// is more often the registry's own trouble than the fleet's. A Cache is
// safe for concurrent use.
package discovery

// Package view is the beacon server's in-memory replica of the registry and
// its watch fan-out.
//
// A View loads everything under the store prefix with one Get, then watches
// from that revision + 1. If etcd compacts past it (or the watch ends for any
// other reason) it lists again and publishes only what differs: it never goes
// quiet. Each change yields a new immutable registry.Snapshot per service.
//
// Subscribers never slow the View down: each holds at most one pending
// snapshot per service (the newest; older ones are coalesced away) and a
// size-1 wake-up channel, so a reader that stalls costs memory bounded by the
// number of services it watches, and the others are not delayed.
//
// View and Subscription are safe for concurrent use.
package view

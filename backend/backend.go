// Package backend is the one registry interface the SDK runs on, whatever
// keeps the registry: a beacon server (backend/beacon), memory
// (backend/memory), and — later — etcd directly and Consul. Every
// implementation passes the same conformance suite (backend/backendtest),
// so they behave the same.
package backend

import (
	"context"
	"time"

	"beacon.dev/beacon/discovery"
	"beacon.dev/beacon/registry"
)

// Backend is a registry in one namespace. It is a discovery.Source, so a
// discovery cache (and every balancer and integration on it) can follow
// it.
type Backend interface {
	discovery.Source
	// Register writes a persistent instance; it stays until Deregister.
	// Invalid instances are refused with an error matching
	// registry.ErrInvalid that names the field.
	Register(ctx context.Context, in registry.Instance) (revision int64, err error)
	Deregister(ctx context.Context, service, id string) (found bool, err error)
	// NewSession opens a session of ttl: its instances vanish when it is
	// closed, or ttl after its owner stops keeping it alive.
	NewSession(ctx context.Context, ttl time.Duration) (Session, error)
	// Instances returns every instance of a service, whatever its status.
	Instances(ctx context.Context, service string) (*registry.Snapshot, error)
	// Close releases the backend (not the sessions: close them first).
	Close() error
}

// Session is a lease held by this process, kept alive in the background.
type Session interface {
	Register(ctx context.Context, in registry.Instance) (revision int64, err error)
	Deregister(ctx context.Context, service, id string) (found bool, err error)
	// Close ends the session; its instances go at once. When the registry
	// cannot be told (ctx already done, registry unreachable) keepalives
	// stop anyway and the instances go when the TTL runs out — which is
	// also what a crashed process looks like.
	Close(ctx context.Context) error
	// Done is closed once the session is closed.
	Done() <-chan struct{}
}

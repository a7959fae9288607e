// Package backend is the one registry interface the SDK runs on, whatever
// keeps the registry: a beacon server (backend/beacon), memory
// (backend/memory), and — later — etcd directly and Consul. Every
// implementation passes the same conformance suite (backend/backendtest),
// so they behave the same.
package backend

import (
	"context"

	"beacon.dev/beacon/discovery"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/session"
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
	// NewSession opens a session (package session: TTL, events,
	// recovery): its instances vanish when it is closed, or a TTL after
	// its owner stops keeping it alive.
	NewSession(ctx context.Context, opts ...session.Option) (*session.Session, error)
	// Instances returns every instance of a service, whatever its status.
	Instances(ctx context.Context, service string) (*registry.Snapshot, error)
	// Close releases the backend (not the sessions: close them first).
	Close() error
}

// Session is a lease held by this process, kept alive in the background:
// the one session of the SDK, whatever the backend.
type Session = session.Session

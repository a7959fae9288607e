// Package beacon runs the backend interface on beacon servers through the
// SDK's client.
package beacon

import (
	"context"

	"beacon.dev/beacon/backend"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/discovery"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/session"
)

// Backend is a beacon server (or several) in the client's namespace.
type Backend struct {
	discovery.Source
	c *client.Client
}

var _ backend.Backend = (*Backend)(nil)

// New returns a backend on c; Close closes c.
func New(c *client.Client) *Backend {
	return &Backend{Source: discovery.FromClient(c, ""), c: c}
}

// WatchFrom implements discovery.Resumer: a new watch sends only what
// changed since the snapshots the caller holds.
func (b *Backend) WatchFrom(ctx context.Context, services []string, have []*registry.Snapshot) (discovery.Stream, error) {
	return b.Source.(discovery.Resumer).WatchFrom(ctx, services, have)
}

// Client returns the underlying client (for what only beacon offers:
// acknowledged drains, checks, maintenance).
func (b *Backend) Client() *client.Client { return b.c }

func (b *Backend) Register(ctx context.Context, in registry.Instance) (int64, error) {
	in.Namespace = b.c.Namespace()
	return b.c.Register(ctx, in)
}

func (b *Backend) Deregister(ctx context.Context, service, id string) (bool, error) {
	return b.c.Deregister(ctx, service, id)
}

func (b *Backend) NewSession(ctx context.Context, opts ...session.Option) (*session.Session, error) {
	return b.c.NewSession(ctx, opts...)
}

func (b *Backend) Instances(ctx context.Context, service string) (*registry.Snapshot, error) {
	return b.c.Instances(ctx, service, client.All())
}

func (b *Backend) Close() error { return b.c.Close() }

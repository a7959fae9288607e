package discovery

import (
	"context"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/registry"
)

// Source is a registry the cache can follow.
type Source interface {
	// Namespace names the namespace followed (it also names the disk
	// snapshot file).
	Namespace() string
	// Watch follows the services until ctx ends or the stream is closed.
	Watch(ctx context.Context, services []string) (Stream, error)
}

// Resumer is a Source that can start a watch from the snapshots the cache
// already holds and send only what changed since: following one more
// service then costs that service, not a new download of every other.
type Resumer interface {
	WatchFrom(ctx context.Context, services []string, have []*registry.Snapshot) (Stream, error)
}

// Stream delivers full snapshots of the services that changed.
type Stream interface {
	Next(ctx context.Context) ([]*registry.Snapshot, error)
	// Synced is closed once the stream has caught up with the registry;
	// from then on, Snapshot reports every followed service that has
	// instances, so one it does not report has none.
	Synced() <-chan struct{}
	Snapshot(service string) (*registry.Snapshot, bool)
	Status() client.WatchStatus
	Close()
}

// FromClient follows a namespace through beacon servers.
func FromClient(c *client.Client, namespace string) Source {
	if namespace == "" {
		namespace = c.Namespace()
	}
	return clientSource{c: c, ns: namespace}
}

type clientSource struct {
	c  *client.Client
	ns string
}

func (s clientSource) Namespace() string { return s.ns }

func (s clientSource) Watch(ctx context.Context, services []string) (Stream, error) {
	return s.c.Watch(ctx, services, client.InNamespace(s.ns))
}

func (s clientSource) WatchFrom(ctx context.Context, services []string, have []*registry.Snapshot) (Stream, error) {
	return s.c.Watch(ctx, services, client.InNamespace(s.ns), client.WatchFrom(have))
}

// Package etcd runs the backend interface directly on an etcd cluster, no
// beacon server in between. It uses beacon's own key layout, so a beacon
// server on the same etcd and prefix sees the same registry:
//
//	PREFIX/ns/NAMESPACE/svc/SERVICE/inst/ID  → the instance (JSON), bound to
//	                                          its session's lease if ephemeral
//	PREFIX/sessions/LEASE_ID_HEX            → the session (JSON), on its lease
//
// (PREFIX is /beacon/v1/ unless configured; `etcdctl get --prefix
// /beacon/v1/ns/` lists every instance.) Sessions are leases kept alive by
// clientv3; a session whose lease is lost is replaced and its instances
// registered again. Watches are Get-then-Watch from the next revision,
// listing again after a compaction; each stream follows its namespace only.
package etcd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"beacon.dev/beacon/backend"
	"beacon.dev/beacon/internal/store"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/session"
)

// Backend is a registry namespace on an etcd cluster.
type Backend struct {
	ns    string
	cli   *clientv3.Client
	store *store.Store
	log   *slog.Logger
}

var _ backend.Backend = (*Backend)(nil)

// New follows namespace ("" = default) under prefix ("" = /beacon/v1/) on
// cli. Close stops it; it does not close cli.
func New(cli *clientv3.Client, namespace, prefix string, log *slog.Logger) (*Backend, error) {
	if namespace == "" {
		namespace = registry.DefaultNamespace
	}
	if err := registry.ValidateNamespace(namespace); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.Default()
	}
	return &Backend{ns: namespace, cli: cli, store: store.New(cli, prefix), log: log}, nil
}

// Namespace implements discovery.Source.
func (b *Backend) Namespace() string { return b.ns }

// Close stops the backend's writer; close streams and sessions first.
func (b *Backend) Close() error {
	b.store.Close()
	return nil
}

func (b *Backend) prepare(in registry.Instance, session int64) (*registry.Instance, error) {
	if in.Namespace == "" {
		in.Namespace = b.ns
	}
	in = in.Clone()
	in.SessionID, in.Revision, in.Suspect = session, 0, false
	in.ApplyDefaults()
	if err := in.Validate(); err != nil {
		return nil, fmt.Errorf("beacon/etcd: %w", err)
	}
	return &in, nil
}

// Register implements backend.Backend. Like a beacon server it keeps what
// the registry observed of the record it replaces (an operator's
// OUT_OF_SERVICE, check states), read from etcd and written with a compare
// on its revision (store.Register).
func (b *Backend) Register(ctx context.Context, in registry.Instance) (int64, error) {
	p, err := b.prepare(in, 0)
	if err != nil {
		return 0, err
	}
	return b.store.Register(ctx, p)
}

// Deregister implements backend.Backend.
func (b *Backend) Deregister(ctx context.Context, service, id string) (bool, error) {
	if err := registry.ValidateName("service", service); err != nil {
		return false, err
	}
	_, found, err := b.store.Deregister(ctx, registry.InstanceKey{Namespace: b.ns, Service: service, ID: id})
	return found, err
}

// Instances implements backend.Backend with a linearizable read straight
// from etcd. (Waiting for the view with a requested progress notification
// is not safe before etcd 3.4.25/3.5.8, whose notification can run ahead of
// the events — etcd issue 15220; Debian ships 3.4.23.) The snapshot's
// revision is its newest instance's.
func (b *Backend) Instances(ctx context.Context, service string) (*registry.Snapshot, error) {
	if err := registry.ValidateName("service", service); err != nil {
		return nil, err
	}
	prefix := b.store.NamespacesPrefix() + b.ns + "/svc/" + service + "/inst/"
	resp, err := b.cli.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("beacon/etcd: listing %s: %w", service, err)
	}
	snap := &registry.Snapshot{Namespace: b.ns, Service: service}
	for _, kv := range resp.Kvs {
		in, err := b.store.DecodeInstance(string(kv.Key), kv.Value, kv.ModRevision)
		if err != nil {
			continue // unreadable records are ignored, as the view does
		}
		snap.Instances = append(snap.Instances, in)
		snap.Revision = max(snap.Revision, kv.ModRevision)
	}
	return snap, nil // etcd returns keys sorted: instances sorted by ID
}

// NewSession implements backend.Backend: a session on an etcd lease (the
// state machine is package session's).
func (b *Backend) NewSession(ctx context.Context, opts ...session.Option) (*session.Session, error) {
	opts = append([]session.Option{session.WithNamespace(b.ns), session.WithName("beacon/etcd")}, opts...)
	return session.New(ctx, etcdLease{b}, opts...)
}

// etcdLease is a session's lease: an etcd lease with a session record.
type etcdLease struct{ b *Backend }

func (l etcdLease) Grant(ctx context.Context, ttl time.Duration, name string) (int64, time.Duration, error) {
	return l.b.store.CreateSession(ctx, ttl, name)
}

func (l etcdLease) KeepAlive(ctx context.Context, id int64) error {
	r := l.b.store.KeepAliveMany(ctx, []int64{id})[0]
	return lost(r.Err)
}

func (l etcdLease) Put(ctx context.Context, id int64, in registry.Instance) (int64, error) {
	p, err := l.b.prepare(in, id)
	if err != nil {
		return 0, err
	}
	rev, err := l.b.store.Register(ctx, p)
	return rev, lost(err)
}

// Delete removes the instance only if it is still bound to the lease: one
// registered again since by someone else is theirs.
func (l etcdLease) Delete(ctx context.Context, id int64, k registry.InstanceKey) (bool, error) {
	_, found, err := l.b.store.DeregisterSession(ctx, k, id)
	return found, err
}

// Revoke revokes the lease, which removes only the keys still bound to it.
func (l etcdLease) Revoke(ctx context.Context, id int64) error {
	return l.b.store.CloseSession(ctx, id)
}

// lost marks the store's "no such lease" as the session's.
func lost(err error) error {
	if errors.Is(err, store.ErrSessionNotFound) {
		return fmt.Errorf("beacon/etcd: %w: %w", err, session.ErrLost)
	}
	return err
}

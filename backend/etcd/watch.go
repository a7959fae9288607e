package etcd

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/discovery"
	"beacon.dev/beacon/internal/backoff"
	"beacon.dev/beacon/registry"
)

// Watch implements discovery.Source: a replica of this namespace only (not
// the whole registry, as a server's view holds), loaded with one Get and
// kept with a Watch from the next revision. After a compaction, or any
// other end of the watch, it lists again and publishes only the services
// whose content differs, so it never goes quiet and never repeats.
func (b *Backend) Watch(ctx context.Context, services []string) (discovery.Stream, error) {
	var only map[string]bool
	for i, s := range services {
		if err := registry.ValidateName(fmt.Sprintf("services[%d]", i), s); err != nil {
			return nil, err
		}
		if only == nil {
			only = map[string]bool{}
		}
		only[s] = true
	}
	wctx, cancel := context.WithCancel(ctx)
	s := &stream{
		b: b, only: only, ctx: wctx, cancel: cancel,
		synced: make(chan struct{}), done: make(chan struct{}), wake: make(chan struct{}, 1),
		instances: map[string]map[string]*registry.Instance{}, protection: map[string]float64{},
		state: map[string]*registry.Snapshot{}, pending: map[string]*registry.Snapshot{},
	}
	go s.run() // owned: ends when the stream is closed or ctx ends
	return s, nil
}

// stream is one Watch's replica and its pending, coalesced snapshots.
type stream struct {
	b      *Backend
	only   map[string]bool // nil: every service of the namespace
	ctx    context.Context
	cancel context.CancelFunc
	synced chan struct{} // closed after the first listing
	done   chan struct{} // closed when run returns
	wake   chan struct{} // size 1: something is pending

	// Owned by run: the replica's records.
	instances  map[string]map[string]*registry.Instance // service → id → instance
	protection map[string]float64                       // service → threshold
	loaded     bool

	mu        sync.Mutex
	state     map[string]*registry.Snapshot // guarded by mu: newest per service
	pending   map[string]*registry.Snapshot // guarded by mu: not yet returned by Next
	order     []string                      // guarded by mu: pending's services, oldest first
	connected bool                          // guarded by mu
	since     time.Time                     // guarded by mu
	relists   int                           // guarded by mu: watches ended
	lastErr   error                         // guarded by mu
}

func (s *stream) instancesPrefix() string { return s.b.store.NamespacesPrefix() + s.b.ns + "/svc/" }
func (s *stream) configPrefix() string    { return s.b.store.ServiceConfigPrefix() + s.b.ns + "/" }

func (s *stream) run() {
	defer close(s.done)
	bo := backoff.New(backoff.Config{})
	for s.ctx.Err() == nil {
		rev, err := s.list()
		if err != nil {
			s.setStatus(false, err)
			if bo.Wait(s.ctx) != nil {
				return
			}
			continue
		}
		bo.Reset()
		s.setStatus(true, nil)
		err = s.follow(rev + 1)
		s.setStatus(false, err)
		s.mu.Lock()
		s.relists++
		s.mu.Unlock()
		if err != nil && !isCompacted(err) && bo.Wait(s.ctx) != nil {
			return
		}
	}
}

func isCompacted(err error) bool { return err == rpctypes.ErrCompacted }

// list reads the namespace's instances and settings at one revision and
// publishes each service whose content changed (at that revision).
func (s *stream) list() (int64, error) {
	ctx, cancel := context.WithTimeout(s.ctx, 30*time.Second)
	defer cancel()
	resp, err := s.b.cli.Get(ctx, s.instancesPrefix(), clientv3.WithPrefix())
	if err != nil {
		return 0, err
	}
	rev := resp.Header.Revision
	conf, err := s.b.cli.Get(ctx, s.configPrefix(), clientv3.WithPrefix(), clientv3.WithRev(rev))
	if err != nil {
		return 0, err
	}
	fresh := map[string]map[string]*registry.Instance{}
	for _, kv := range resp.Kvs {
		if in, ok := s.decode(kv); ok {
			if fresh[in.Service] == nil {
				fresh[in.Service] = map[string]*registry.Instance{}
			}
			fresh[in.Service][in.ID] = in
		}
	}
	protection := map[string]float64{}
	for _, kv := range conf.Kvs {
		if svc, threshold, ok := s.decodeConfig(kv.Key, kv.Value); ok {
			protection[svc] = threshold
		}
	}
	var changed []string
	for svc, insts := range fresh {
		if !s.loaded || !sameRecords(s.instances[svc], insts) || s.protection[svc] != protection[svc] {
			changed = append(changed, svc)
		}
	}
	for svc, insts := range s.instances {
		if _, ok := fresh[svc]; !ok && len(insts) > 0 {
			changed = append(changed, svc)
		}
	}
	s.instances, s.protection = fresh, protection
	slices.Sort(changed)
	snaps := make([]*registry.Snapshot, 0, len(changed))
	for _, svc := range changed {
		snaps = append(snaps, s.snapshot(svc, rev))
	}
	s.publish(snaps)
	if !s.loaded {
		s.loaded = true
		close(s.synced)
	}
	return rev, nil
}

// follow applies the namespace's changes from rev on, until the watch
// ends: its error says why (ErrCompacted: list again).
func (s *stream) follow(rev int64) error {
	ctx, cancel := context.WithCancel(clientv3.WithRequireLeader(s.ctx))
	defer cancel()
	insts := s.b.cli.Watch(ctx, s.instancesPrefix(), clientv3.WithPrefix(), clientv3.WithRev(rev))
	confs := s.b.cli.Watch(ctx, s.configPrefix(), clientv3.WithPrefix(), clientv3.WithRev(rev))
	for {
		var resp clientv3.WatchResponse
		var ok bool
		select {
		case resp, ok = <-insts:
		case resp, ok = <-confs:
		}
		if !ok {
			if s.ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("beacon/etcd: watch of namespace %s ended", s.b.ns)
		}
		if err := resp.Err(); err != nil {
			return err
		}
		s.apply(resp.Events)
	}
}

// apply publishes the services the events change, each at the revision of
// its newest event.
func (s *stream) apply(events []*clientv3.Event) {
	revs := map[string]int64{}
	var order []string
	touch := func(svc string, rev int64) {
		if _, seen := revs[svc]; !seen {
			order = append(order, svc)
		}
		revs[svc] = max(revs[svc], rev)
	}
	for _, ev := range events {
		key := string(ev.Kv.Key)
		if strings.HasPrefix(key, s.configPrefix()) {
			value := ev.Kv.Value
			if ev.Type == mvccpb.DELETE {
				value = []byte(`{}`)
			}
			if svc, threshold, ok := s.decodeConfig(ev.Kv.Key, value); ok {
				s.protection[svc] = threshold
				touch(svc, ev.Kv.ModRevision)
			}
			continue
		}
		k, err := s.b.store.ParseInstanceKey(key)
		if err != nil || !s.wants(k.Service) {
			continue
		}
		delete(s.instances[k.Service], k.ID)
		if ev.Type == mvccpb.PUT {
			if in, ok := s.decode(ev.Kv); ok {
				if s.instances[k.Service] == nil {
					s.instances[k.Service] = map[string]*registry.Instance{}
				}
				s.instances[k.Service][k.ID] = in
			}
		}
		touch(k.Service, ev.Kv.ModRevision)
	}
	snaps := make([]*registry.Snapshot, 0, len(order))
	for _, svc := range order {
		snaps = append(snaps, s.snapshot(svc, revs[svc]))
	}
	s.publish(snaps)
}

func (s *stream) wants(service string) bool { return s.only == nil || s.only[service] }

// decode reads an instance record; an unreadable one is treated as absent
// rather than served half-understood, as the server's view does.
func (s *stream) decode(kv *mvccpb.KeyValue) (*registry.Instance, bool) {
	in, err := s.b.store.DecodeInstance(string(kv.Key), kv.Value, kv.ModRevision)
	if err != nil {
		s.b.log.Warn("beacon/etcd: ignoring unreadable record", "key", string(kv.Key), "err", err)
		return nil, false
	}
	return in, s.wants(in.Service)
}

func (s *stream) decodeConfig(key, value []byte) (string, float64, bool) {
	sk, cfg, err := s.b.store.DecodeServiceConfig(string(key), value)
	if err != nil {
		s.b.log.Warn("beacon/etcd: ignoring unreadable service settings", "key", string(key), "err", err)
		return "", 0, false
	}
	return sk.Service, cfg.ProtectionThreshold, s.wants(sk.Service)
}

// snapshot is a service's current content, instances sorted by ID.
func (s *stream) snapshot(svc string, rev int64) *registry.Snapshot {
	snap := &registry.Snapshot{Namespace: s.b.ns, Service: svc, Revision: rev, ProtectionThreshold: s.protection[svc]}
	for _, in := range s.instances[svc] {
		snap.Instances = append(snap.Instances, in)
	}
	slices.SortFunc(snap.Instances, func(a, b *registry.Instance) int { return cmp.Compare(a.ID, b.ID) })
	return snap
}

func sameRecords(a, b map[string]*registry.Instance) bool {
	if len(a) != len(b) {
		return false
	}
	for id, x := range a {
		if y, ok := b[id]; !ok || x.Revision != y.Revision {
			return false
		}
	}
	return true
}

// publish makes snaps the services' newest, replacing any not yet taken
// by Next (a slow reader holds at most one snapshot per service).
func (s *stream) publish(snaps []*registry.Snapshot) {
	if len(snaps) == 0 {
		return
	}
	s.mu.Lock()
	for _, snap := range snaps {
		if old, ok := s.state[snap.Service]; ok && snap.Revision < old.Revision {
			continue
		}
		s.state[snap.Service] = snap
		if _, queued := s.pending[snap.Service]; !queued {
			s.order = append(s.order, snap.Service)
		}
		s.pending[snap.Service] = snap
	}
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func (s *stream) setStatus(connected bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if connected != s.connected {
		s.connected, s.since = connected, time.Now()
	}
	if err != nil {
		s.lastErr = err
	}
}

// Next implements discovery.Stream: the services changed since the last
// call, oldest change first, each at its newest content.
func (s *stream) Next(ctx context.Context) ([]*registry.Snapshot, error) {
	for {
		s.mu.Lock()
		if len(s.order) > 0 {
			out := make([]*registry.Snapshot, len(s.order))
			for i, svc := range s.order {
				out[i] = s.pending[svc]
				delete(s.pending, svc)
			}
			s.order = s.order[:0]
			s.mu.Unlock()
			return out, nil
		}
		s.mu.Unlock()
		select {
		case <-s.wake:
		case <-s.done:
			return nil, client.ErrClosed
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

func (s *stream) Synced() <-chan struct{} { return s.synced }

// Snapshot implements discovery.Stream; only services with instances are
// reported.
func (s *stream) Snapshot(service string) (*registry.Snapshot, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	snap, ok := s.state[service]
	if !ok || len(snap.Instances) == 0 {
		return nil, false
	}
	return snap, true
}

func (s *stream) Status() client.WatchStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	return client.WatchStatus{Connected: s.connected, Since: s.since, Reconnects: s.relists, LastErr: s.lastErr}
}

// Close stops the stream and waits for its goroutine.
func (s *stream) Close() {
	s.cancel()
	<-s.done
}

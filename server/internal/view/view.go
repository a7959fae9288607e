package view

import (
	"cmp"
	"context"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"beacon.dev/beacon/internal/store"
	"beacon.dev/beacon/registry"
)

// Hooks let the server observe the view without the view knowing about
// metrics. Every hook may be nil and must not block.
type Hooks struct {
	Relisted  func(compacted bool)
	BadRecord func(key string, err error)
	// Published receives every batch of new snapshots, in order, after
	// the view applied them (the server's health checker follows it).
	Published func(snaps []*registry.Snapshot)
	// KVListed hands the KV store's current values and rollouts (under
	// the layout's KVPrefix and KVRolloutPrefix) to its replica, and Changed every watch response's events
	// and revision (the KV replica and the locks follow them): the view's
	// one listing and etcd watch serve all, in one revision order.
	// Changed runs on the view's goroutine: it must not block.
	KVListed func(kvs []*mvccpb.KeyValue, rev int64)
	Changed  func(events []*clientv3.Event, rev int64)
}

// View is the in-memory replica. Create it with New and start it with Run.
type View struct {
	cli    *clientv3.Client
	layout store.Layout
	log    *slog.Logger
	hooks  Hooks

	mu       sync.RWMutex
	services map[registry.ServiceKey]*registry.Snapshot // guarded by mu; empty snapshots are kept as tombstones
	encoded  map[registry.ServiceKey]*Encoded           // guarded by mu; the wire form of services[k], shared by subscribers
	sessions map[string]struct{}                        // guarded by mu; session keys
	rev      int64                                      // guarded by mu; every change up to rev is applied
	advanced chan struct{}                              // guarded by mu; closed and replaced when rev grows
	loaded   bool                                       // guarded by mu
	subs     map[*Subscription]struct{}                 // guarded by mu
	ready    chan struct{}

	protection        map[registry.ServiceKey]float64                // guarded by mu; services' own thresholds
	policies          map[registry.ServiceKey]registry.ServicePolicy // guarded by mu; services' xDS policies (none: defaults)
	defaultProtection float64                                        // set before Run
	guard             *guard                                         // set before Run; its maps guarded by mu
	probeWrites       bool                                           // set before Run
}

// SetDefaultProtection sets the protection threshold of services without
// their own. Call it before Run.
func (v *View) SetDefaultProtection(f float64) { v.defaultProtection = f }

func (v *View) protectionLocked(sk registry.ServiceKey) float64 {
	if f, ok := v.protection[sk]; ok {
		return f
	}
	return v.defaultProtection
}

// New returns a View of the keys under layout's prefix.
func New(cli *clientv3.Client, layout store.Layout, log *slog.Logger, hooks Hooks) *View {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &View{
		cli: cli, layout: layout, log: log, hooks: hooks,
		services: make(map[registry.ServiceKey]*registry.Snapshot),
		encoded:  make(map[registry.ServiceKey]*Encoded),
		sessions: make(map[string]struct{}),
		advanced: make(chan struct{}),
		subs:     make(map[*Subscription]struct{}),
		ready:    make(chan struct{}),

		protection: make(map[registry.ServiceKey]float64),
		policies:   make(map[registry.ServiceKey]registry.ServicePolicy),
	}
}

// Policy returns a service's xDS policy (the zero value: beacon's
// defaults). A change to it publishes the service again.
func (v *View) Policy(sk registry.ServiceKey) registry.ServicePolicy {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.policies[sk]
}

// Ready is closed once the first listing is applied.
func (v *View) Ready() <-chan struct{} { return v.ready }

// Run keeps the view current until ctx ends.
func (v *View) Run(ctx context.Context) {
	if v.guard != nil {
		done := make(chan struct{})
		go func() { // owned by Run: ends with ctx
			defer close(done)
			v.releaseLoop(ctx)
		}()
		defer func() { <-done }()
	}
	backoff := 100 * time.Millisecond
	compacted := false
	for ctx.Err() == nil {
		rev, err := v.relist(ctx, compacted)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			v.log.Warn("view: listing failed, retrying", "err", err, "in", backoff)
			if !sleep(ctx, backoff) {
				return
			}
			backoff = min(2*backoff, 5*time.Second)
			continue
		}
		backoff = 100 * time.Millisecond
		compacted = v.watch(ctx, rev)
	}
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// watch applies changes after rev until the watch ends. It reports whether
// it ended because etcd compacted the history it needed.
func (v *View) watch(ctx context.Context, rev int64) (compacted bool) {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	wch := v.cli.Watch(wctx, v.layout.Prefix, clientv3.WithPrefix(), clientv3.WithRev(rev+1), clientv3.WithProgressNotify())
	for resp := range wch {
		if err := resp.Err(); err != nil {
			if errors.Is(err, rpctypes.ErrCompacted) {
				v.log.Warn("view: watch compacted, listing again", "compact_revision", resp.CompactRevision)
				return true
			}
			v.log.Warn("view: watch ended, listing again", "err", err)
			return false
		}
		if resp.IsProgressNotify() {
			v.advance(resp.Header.Revision, nil)
		} else {
			v.apply(resp.Events)
		}
		if v.hooks.Changed != nil {
			v.hooks.Changed(resp.Events, resp.Header.Revision)
		}
	}
	return false
}

// notMine says whether an etcd key under the prefix is none of the
// view's business: server membership, TTL heartbeats, ACL records, KV
// values and history, locks, progress probes.
func (v *View) notMine(key string) bool {
	l := v.layout
	return strings.HasPrefix(key, l.ServersPrefix()) || strings.HasPrefix(key, l.TTLPrefix()) || strings.HasPrefix(key, l.ACLPrefix()) ||
		strings.HasPrefix(key, l.KVPrefix()) || strings.HasPrefix(key, l.KVHistoryPrefix()) || strings.HasPrefix(key, l.KVAppliedPrefix()) || strings.HasPrefix(key, l.KVRolloutPrefix()) ||
		strings.HasPrefix(key, l.LockPrefix()) || strings.HasPrefix(key, l.LockReleasedPrefix()) || strings.HasPrefix(key, l.LockHoldPrefix()) ||
		strings.HasPrefix(key, l.ConsulKVPrefix()) || strings.HasPrefix(key, l.ConsulHoldPrefix()) || strings.HasPrefix(key, l.ConsulSessionPrefix()) ||
		key == l.ProbeKey()
}

// RequestProgress asks etcd to report the watch's current revision so that
// WaitRevision can finish when nothing under the prefix changes.
func (v *View) RequestProgress(ctx context.Context) error {
	if v.probeWrites {
		// This etcd's requested progress notifications can run ahead of
		// the events (etcd #15220, fixed in 3.4.25 and 3.5.8): push a
		// write through the watch instead, which arrives in order.
		_, err := v.cli.Put(ctx, v.layout.ProbeKey(), "")
		return err
	}
	return v.cli.RequestProgress(clientv3.WithRequireLeader(ctx))
}

// UseProbeWrites makes the view advance by writing a probe key instead of
// asking for progress notifications, for etcd versions whose requested
// notifications are not ordered with the events. Call it before Run.
func (v *View) UseProbeWrites() { v.probeWrites = true }

type change struct {
	put     *registry.Instance // nil for a delete
	id      string
	rev     int64
	release bool // the guard's hold ended: drop the suspect copy
	restore bool // the guard brings back an instance lost earlier (put)
}

// apply folds one watch response into the view and publishes the services
// it changed, each once.
func (v *View) apply(events []*clientv3.Event) {
	byService := make(map[registry.ServiceKey][]change)
	var order []registry.ServiceKey
	addChange := func(sk registry.ServiceKey, c change) {
		if _, seen := byService[sk]; !seen {
			order = append(order, sk)
		}
		byService[sk] = append(byService[sk], c)
	}
	maxRev := int64(0)
	var dels []deleted
	sessionGone := map[int64]int64{} // session id -> revision of its key's deletion
	releaseRev := int64(0)
	v.mu.Lock()
	for _, ev := range events {
		key := string(ev.Kv.Key)
		maxRev = max(maxRev, ev.Kv.ModRevision)
		if v.notMine(key) {
			continue // server membership, TTL heartbeats, ACL records, KV, progress probes: not the view's business
		}
		if strings.HasPrefix(key, v.layout.GuardPrefix()) {
			releaseRev = ev.Kv.ModRevision
			continue
		}
		if strings.HasPrefix(key, v.layout.ServiceConfigPrefix()) {
			sk, cfg, err := v.layout.DecodeServiceConfig(key, ev.Kv.Value)
			if ev.Type == mvccpb.DELETE {
				sk, _, err = v.layout.DecodeServiceConfig(key, []byte(`{}`))
			}
			if err != nil {
				v.badRecord(key, err)
				// Absent (the server's default), as a relist has it.
				if sk, _, kerr := v.layout.DecodeServiceConfig(key, []byte(`{}`)); kerr == nil {
					if _, had := v.protection[sk]; had {
						delete(v.protection, sk)
						addChange(sk, change{rev: ev.Kv.ModRevision})
					}
				}
				continue
			}
			if ev.Type == mvccpb.DELETE {
				delete(v.protection, sk)
			} else {
				v.protection[sk] = cfg.ProtectionThreshold
			}
			// Republish the service at this revision (an empty change).
			addChange(sk, change{rev: ev.Kv.ModRevision})
			continue
		}
		if strings.HasPrefix(key, v.layout.ServicePolicyPrefix()) {
			sk, p, err := v.layout.DecodeServicePolicy(key, ev.Kv.Value)
			if ev.Type == mvccpb.DELETE {
				sk, p, err = v.layout.DecodeServicePolicy(key, []byte(`{}`))
			}
			if err != nil {
				v.badRecord(key, err)
				// A record that does not decode counts as absent (the
				// defaults), as a relist has it.
				if sk, _, kerr := v.layout.DecodeServicePolicy(key, []byte(`{}`)); kerr == nil {
					if _, had := v.policies[sk]; had {
						delete(v.policies, sk)
						addChange(sk, change{rev: ev.Kv.ModRevision})
					}
				}
				continue
			}
			if p == (registry.ServicePolicy{}) {
				delete(v.policies, sk)
			} else {
				v.policies[sk] = p
			}
			addChange(sk, change{rev: ev.Kv.ModRevision})
			continue
		}
		if strings.HasPrefix(key, v.layout.SessionsPrefix()) {
			if ev.Type == mvccpb.PUT {
				v.sessions[key] = struct{}{}
			} else {
				delete(v.sessions, key)
				if id, err := store.ParseSessionID(strings.TrimPrefix(key, v.layout.SessionsPrefix())); err == nil {
					sessionGone[id] = ev.Kv.ModRevision
				}
			}
			continue
		}
		k, err := v.layout.ParseInstanceKey(key)
		if err != nil {
			v.badRecord(key, err)
			continue
		}
		c := change{id: k.ID, rev: ev.Kv.ModRevision}
		if ev.Type == mvccpb.PUT {
			in, err := v.layout.DecodeInstance(key, ev.Kv.Value, ev.Kv.ModRevision)
			if err != nil {
				// A record we cannot read is treated as absent rather than
				// served half-understood.
				v.badRecord(key, err)
			} else {
				c.put = in
			}
		}
		if ev.Type == mvccpb.DELETE {
			dels = append(dels, deleted{key: k, rev: ev.Kv.ModRevision})
		}
		addChange(registry.ServiceKey{Namespace: k.Namespace, Service: k.Service}, c)
	}
	now := time.Now()
	hold, restore := v.holdLocked(now, dels, sessionGone)
	for _, in := range restore {
		addChange(registry.ServiceKey{Namespace: in.Namespace, Service: in.Service}, change{put: in, id: in.ID, rev: maxRev, restore: true})
	}
	if releaseRev > 0 {
		for _, k := range v.expiredHoldsLocked(now) {
			addChange(registry.ServiceKey{Namespace: k.Namespace, Service: k.Service}, change{id: k.ID, rev: releaseRev, release: true})
		}
	}
	published := make([]Published, 0, len(order))
	for _, sk := range order {
		if p, ok := v.applyServiceLocked(sk, byService[sk], hold); ok {
			published = append(published, p)
		}
	}
	v.mu.Unlock()
	v.advance(maxRev, published)
}

func (v *View) badRecord(key string, err error) {
	v.log.Warn("view: ignoring unreadable record", "key", key, "err", err)
	if v.hooks.BadRecord != nil {
		v.hooks.BadRecord(key, err)
	}
}

// applyServiceLocked copies the service's instances once and applies the
// changes to the copy, returning the new snapshot.
func (v *View) applyServiceLocked(sk registry.ServiceKey, changes []change, hold map[registry.InstanceKey]bool) (Published, bool) {
	old := v.services[sk]
	var insts []*registry.Instance
	ns, svc := sk.Namespace, sk.Service
	if old != nil {
		insts = slices.Clone(old.Instances)
		ns, svc = old.Namespace, old.Service
	}
	rev := int64(0)
	for _, c := range changes {
		rev = max(rev, c.rev)
		i, found := slices.BinarySearchFunc(insts, c.id, func(in *registry.Instance, id string) int { return cmp.Compare(in.ID, id) })
		key := registry.InstanceKey{Namespace: ns, Service: svc, ID: c.id}
		switch {
		case c.id == "": // a settings change: nothing to do to the instances
		case c.release:
			if found && insts[i].Suspect {
				insts = slices.Delete(insts, i, i+1)
			}
		case c.put != nil:
			c.put.Namespace, c.put.Service = ns, svc // share the strings
			if found {
				insts[i] = c.put
			} else {
				insts = slices.Insert(insts, i, c.put)
			}
			if v.guard != nil && !c.restore {
				delete(v.guard.held, key) // registered again: no longer suspect
			}
		case found && hold[key]:
			kept := insts[i].Clone()
			kept.Suspect = true
			insts[i] = &kept
		case found:
			insts = slices.Delete(insts, i, i+1)
		}
	}
	if old != nil && rev <= old.Revision {
		return Published{}, false
	}
	snap := &registry.Snapshot{Namespace: ns, Service: svc, Revision: rev, Instances: insts}
	return v.setLocked(sk, snap), true
}

// setLocked replaces a service's snapshot and returns what to publish.
func (v *View) setLocked(sk registry.ServiceKey, snap *registry.Snapshot) Published {
	snap.ProtectionThreshold = v.protectionLocked(sk)
	enc := new(Encoded)
	base := v.services[sk]
	v.services[sk] = snap
	v.encoded[sk] = enc
	return Published{Snap: snap, Enc: enc, Base: base}
}

// Published is a snapshot with its wire form, encoded at most once however
// many subscribers send it.
type Published struct {
	Snap *registry.Snapshot
	Enc  *Encoded
	// Base is the snapshot Snap replaced (nil for a new service): a
	// subscriber that was sent Base may be sent only what changed.
	// Instances that did not change are the same pointers in both.
	Base *registry.Snapshot
}

// Encoded memoises the encodings of one snapshot: as it is and as a delta
// from its base, each also with its instances' session ids blanked for
// watchers not allowed to read them.
type Encoded struct {
	once [4]sync.Once
	b    [4][]byte
}

// Encoding names one of a snapshot's wire forms.
type Encoding int

const (
	Full Encoding = iota
	FullRedacted
	Delta
	DeltaRedacted
)

// Get returns the encoding e of a published snapshot, computing it with f
// on first use.
func (enc *Encoded) Get(e Encoding, pub Published, f func(Encoding, Published) []byte) []byte {
	enc.once[e].Do(func() { enc.b[e] = f(e, pub) })
	return enc.b[e]
}

// Changes returns what changed from base to snap: the instances added or
// replaced (in snap's order, by id) and the ids of those removed (sorted).
// Both lists are sorted by id, as a view's snapshots are.
func Changes(base, snap *registry.Snapshot) (upserted []*registry.Instance, removed []string) {
	var old []*registry.Instance
	if base != nil {
		old = base.Instances
	}
	i, j := 0, 0
	for i < len(old) || j < len(snap.Instances) {
		switch {
		case j == len(snap.Instances) || (i < len(old) && old[i].ID < snap.Instances[j].ID):
			removed = append(removed, old[i].ID)
			i++
		case i == len(old) || snap.Instances[j].ID < old[i].ID:
			upserted = append(upserted, snap.Instances[j])
			j++
		default: // the same id
			if old[i] != snap.Instances[j] {
				upserted = append(upserted, snap.Instances[j])
			}
			i++
			j++
		}
	}
	return upserted, removed
}

// relist loads the whole prefix and publishes every service whose content
// differs from what the view holds.
func (v *View) relist(ctx context.Context, compacted bool) (int64, error) {
	// Everything but the KV history (every kept version of every key,
	// which nothing here reads): the range before it, then the range
	// after it at the same revision.
	hist := v.layout.KVHistoryPrefix()
	resp, err := v.cli.Get(ctx, v.layout.Prefix, clientv3.WithRange(hist))
	if err != nil {
		return 0, err
	}
	rev := resp.Header.Revision
	after, err := v.cli.Get(ctx, clientv3.GetPrefixRangeEnd(hist), clientv3.WithRange(clientv3.GetPrefixRangeEnd(v.layout.Prefix)), clientv3.WithRev(rev))
	if err != nil {
		return 0, err
	}
	resp.Kvs = append(resp.Kvs, after.Kvs...)
	var kvs []*mvccpb.KeyValue
	fresh := make(map[registry.ServiceKey][]*registry.Instance)
	sessions := make(map[string]struct{})
	protection := make(map[registry.ServiceKey]float64)
	policies := make(map[registry.ServiceKey]registry.ServicePolicy)
	for _, kv := range resp.Kvs {
		key := string(kv.Key)
		if strings.HasPrefix(key, v.layout.KVPrefix()) || strings.HasPrefix(key, v.layout.KVRolloutPrefix()) {
			kvs = append(kvs, kv)
			continue
		}
		if v.notMine(key) || strings.HasPrefix(key, v.layout.GuardPrefix()) {
			continue
		}
		if strings.HasPrefix(key, v.layout.ServiceConfigPrefix()) {
			sk, cfg, err := v.layout.DecodeServiceConfig(key, kv.Value)
			if err != nil {
				v.badRecord(key, err)
				continue
			}
			protection[sk] = cfg.ProtectionThreshold
			continue
		}
		if strings.HasPrefix(key, v.layout.ServicePolicyPrefix()) {
			sk, p, err := v.layout.DecodeServicePolicy(key, kv.Value)
			if err != nil {
				v.badRecord(key, err)
				continue
			}
			if p != (registry.ServicePolicy{}) {
				policies[sk] = p
			}
			continue
		}
		if strings.HasPrefix(key, v.layout.SessionsPrefix()) {
			sessions[key] = struct{}{}
			continue
		}
		in, err := v.layout.DecodeInstance(key, kv.Value, kv.ModRevision)
		if err != nil {
			v.badRecord(key, err)
			continue
		}
		sk := registry.ServiceKey{Namespace: in.Namespace, Service: in.Service}
		fresh[sk] = append(fresh[sk], in)
	}

	v.mu.Lock()
	v.protection = protection
	oldPolicies := v.policies
	v.policies = policies
	// Instances the guard holds are not in etcd any more: keep them.
	if v.guard != nil {
		for k := range v.guard.held {
			sk := registry.ServiceKey{Namespace: k.Namespace, Service: k.Service}
			if slices.ContainsFunc(fresh[sk], func(in *registry.Instance) bool { return in.ID == k.ID }) {
				delete(v.guard.held, k)
				continue
			}
			if old := v.instanceLocked(k); old != nil && old.Suspect {
				kept := old.Clone() // published instances are never written
				fresh[sk] = append(fresh[sk], &kept)
			}
		}
	}
	var published []Published
	// A service is republished only if its content (or its threshold, or
	// its policy) differs; its revision is then the listing's, which is at
	// least that of any change it missed.
	for sk, insts := range fresh {
		slices.SortFunc(insts, func(a, b *registry.Instance) int { return cmp.Compare(a.ID, b.ID) })
		if old := v.services[sk]; old != nil && sameInstances(old.Instances, insts) && old.ProtectionThreshold == v.protectionLocked(sk) && oldPolicies[sk] == policies[sk] {
			continue
		}
		snap := &registry.Snapshot{Namespace: sk.Namespace, Service: sk.Service, Revision: rev, Instances: insts}
		for _, in := range insts {
			in.Namespace, in.Service = snap.Namespace, snap.Service
		}
		published = append(published, v.setLocked(sk, snap))
	}
	for sk, old := range v.services {
		if _, ok := fresh[sk]; !ok && len(old.Instances) > 0 {
			snap := &registry.Snapshot{Namespace: sk.Namespace, Service: sk.Service, Revision: rev}
			published = append(published, v.setLocked(sk, snap))
		}
	}
	v.sessions = sessions
	first := !v.loaded
	v.loaded = true
	v.mu.Unlock()

	if v.hooks.KVListed != nil {
		v.hooks.KVListed(kvs, rev)
	}
	v.advance(rev, published)
	if first {
		close(v.ready)
	}
	if v.hooks.Relisted != nil {
		v.hooks.Relisted(compacted)
	}
	return rev, nil
}

func sameInstances(a, b []*registry.Instance) bool {
	return slices.EqualFunc(a, b, func(x, y *registry.Instance) bool {
		return x.ID == y.ID && x.Revision == y.Revision
	})
}

// advance moves the applied revision forward, wakes revision waiters and
// hands the published snapshots to subscribers. It never holds v.mu while
// touching a subscriber.
func (v *View) advance(rev int64, published []Published) {
	v.mu.Lock()
	if rev > v.rev {
		v.rev = rev
		close(v.advanced)
		v.advanced = make(chan struct{})
	}
	var subs []*Subscription
	if len(published) > 0 {
		subs = make([]*Subscription, 0, len(v.subs))
		for s := range v.subs {
			subs = append(subs, s)
		}
	}
	v.mu.Unlock()
	if len(published) == 0 {
		return
	}
	if v.hooks.Published != nil {
		snaps := make([]*registry.Snapshot, len(published))
		for i, p := range published {
			snaps[i] = p.Snap
		}
		v.hooks.Published(snaps)
	}
	now := time.Now()
	for _, s := range subs {
		s.offer(published, now)
	}
}

// Revision returns the revision up to which the view is current.
func (v *View) Revision() int64 {
	v.mu.RLock()
	defer v.mu.RUnlock()
	return v.rev
}

// WaitRevision blocks until the view has applied rev or ctx ends.
func (v *View) WaitRevision(ctx context.Context, rev int64) error {
	asked := false
	for {
		v.mu.RLock()
		cur, ch := v.rev, v.advanced
		v.mu.RUnlock()
		if cur >= rev {
			return nil
		}
		if !asked {
			// Nothing under our prefix may change for a while: ask etcd
			// for a progress report rather than wait for a write.
			asked = true
			_ = v.RequestProgress(ctx)
		}
		t := time.NewTimer(200 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-ch:
		case <-t.C:
			asked = false
		}
		t.Stop()
	}
}

// Snapshot returns the current snapshot of a service, or an empty one.
func (v *View) Snapshot(sk registry.ServiceKey) *registry.Snapshot {
	v.mu.RLock()
	defer v.mu.RUnlock()
	if s := v.services[sk]; s != nil {
		return s
	}
	return &registry.Snapshot{Namespace: sk.Namespace, Service: sk.Service}
}

// Instance returns the current state of an instance, nil if absent. The
// instance is shared: do not modify it.
func (v *View) Instance(k registry.InstanceKey) *registry.Instance {
	snap := v.Snapshot(registry.ServiceKey{Namespace: k.Namespace, Service: k.Service})
	i, ok := slices.BinarySearchFunc(snap.Instances, k.ID, func(in *registry.Instance, id string) int { return strings.Compare(in.ID, id) })
	if !ok {
		return nil
	}
	return snap.Instances[i]
}

// All returns every service's current snapshot, in every namespace.
func (v *View) All() []*registry.Snapshot {
	v.mu.RLock()
	defer v.mu.RUnlock()
	out := make([]*registry.Snapshot, 0, len(v.services))
	for _, s := range v.services {
		out = append(out, s)
	}
	return out
}

// Services returns the non-empty services of a namespace, sorted by name.
func (v *View) Services(ns string) []*registry.Snapshot {
	v.mu.RLock()
	var out []*registry.Snapshot
	for sk, s := range v.services {
		if sk.Namespace == ns && len(s.Instances) > 0 {
			out = append(out, s)
		}
	}
	v.mu.RUnlock()
	slices.SortFunc(out, func(a, b *registry.Snapshot) int { return cmp.Compare(a.Service, b.Service) })
	return out
}

// NamespaceRevision returns the revision of the newest change to a
// namespace's services (0: none seen). Emptied services count: it never
// goes back while the view runs.
func (v *View) NamespaceRevision(ns string) int64 {
	v.mu.RLock()
	defer v.mu.RUnlock()
	var rev int64
	for sk, s := range v.services {
		if sk.Namespace == ns {
			rev = max(rev, s.Revision)
		}
	}
	return rev
}

// Stats are counts for metrics.
type Stats struct {
	Sessions, Services, Instances, Subscribers int
	// Pending counts snapshots queued for subscribers and not yet sent.
	Pending int
}

// Stats counts what the view holds.
func (v *View) Stats() Stats {
	v.mu.RLock()
	st := Stats{Sessions: len(v.sessions), Subscribers: len(v.subs)}
	for _, s := range v.services {
		if len(s.Instances) > 0 {
			st.Services++
			st.Instances += len(s.Instances)
		}
	}
	subs := make([]*Subscription, 0, len(v.subs))
	for s := range v.subs {
		subs = append(subs, s)
	}
	v.mu.RUnlock()
	for _, s := range subs {
		st.Pending += s.PendingCount()
	}
	return st
}

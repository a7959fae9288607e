package kv

import (
	"cmp"
	"context"
	"slices"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"google.golang.org/protobuf/encoding/protojson"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
)

// DefaultChangeLog is how many recent changes the replica keeps for watch
// streams to resume from; a stream further behind gets the whole state
// again (a reset), never a gap.
const DefaultChangeLog = 16384

// Replica is the server's in-memory copy of every current KV value, fed
// by the registry view's one etcd listing and watch (Listed, Changed), and
// the log of recent changes that watch streams read and resume from. Each
// value is held once and shared by every stream.
type Replica struct {
	prefix  string // Store.DataPrefix
	rollout string // the rollouts' prefix (store.Layout's KVRolloutPrefix)
	maxLog  int

	mu       sync.Mutex
	keys     map[string]map[string]*beaconv1.KeyValue // guarded by mu; ns → key → current version (never modified)
	plans    map[string]map[string]*rollout           // guarded by mu; ns → key → its staged rollout (never modified)
	rev      int64                                    // guarded by mu; every change up to rev is applied
	changes  []change                                 // guarded by mu; recent changes in revision order
	floor    int64                                    // guarded by mu; a cursor below floor cannot resume from changes
	subs     map[*Sub]struct{}                        // guarded by mu
	catching map[*Sub]struct{}                        // guarded by mu; subscribers waiting for rev to reach their atLeast
	loaded   bool                                     // guarded by mu
	ready    chan struct{}
}

type change struct {
	ns, key string
	rev     int64
	deleted bool
	rollout bool // the key's rollout changed, not its value
}

// rollout is a key's staged rollout: its record's revisions and content.
type rollout struct {
	kv *beaconv1.KeyValue // key and revisions, no value
	r  *beaconv1.KVRollout
}

func decodeRollout(key string, kv *mvccpb.KeyValue) (*rollout, bool) {
	r := &beaconv1.KVRollout{}
	if err := protojson.Unmarshal(kv.Value, r); err != nil {
		return nil, false
	}
	return &rollout{kv: &beaconv1.KeyValue{Key: key, CreateRevision: kv.CreateRevision, ModRevision: kv.ModRevision, Version: kv.Version}, r: r}, true
}

// NewReplica returns an empty replica of the values under dataPrefix and
// the rollouts under rolloutPrefix.
func NewReplica(dataPrefix, rolloutPrefix string, changeLog int) *Replica {
	if changeLog <= 0 {
		changeLog = DefaultChangeLog
	}
	return &Replica{prefix: dataPrefix, rollout: rolloutPrefix, maxLog: changeLog,
		keys: map[string]map[string]*beaconv1.KeyValue{}, plans: map[string]map[string]*rollout{},
		subs: map[*Sub]struct{}{}, catching: map[*Sub]struct{}{}, ready: make(chan struct{})}
}

// Rollout returns a key's staged rollout, and its record's revision.
func (r *Replica) Rollout(ns, key string) (*beaconv1.KVRollout, int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if p := r.plans[ns][key]; p != nil {
		return p.r, p.kv.ModRevision
	}
	return nil, 0
}

// Ready is closed once the replica holds a listing.
func (r *Replica) Ready() <-chan struct{} { return r.ready }

// Revision is the revision the replica has applied.
func (r *Replica) Revision() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.rev
}

// Count is the number of keys of a namespace.
func (r *Replica) Count(ns string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.keys[ns])
}

// Has says whether a namespace holds a key.
func (r *Replica) Has(ns, key string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.keys[ns][key] != nil
}

// split parses a value's or a rollout's etcd key.
func (r *Replica) split(etcdKey string) (ns, key string, isRollout, ok bool) {
	rest, ok := strings.CutPrefix(etcdKey, r.prefix)
	if !ok {
		if rest, ok = strings.CutPrefix(etcdKey, r.rollout); !ok || r.rollout == "" {
			return "", "", false, false
		}
		isRollout = true
	}
	ns, key, ok = strings.Cut(rest, "/")
	return ns, key, isRollout, ok
}

func putIn[V any](m map[string]map[string]V, ns, key string, v V) {
	if m[ns] == nil {
		m[ns] = map[string]V{}
	}
	m[ns][key] = v
}

func delFrom[V any](m map[string]map[string]V, ns, key string) {
	delete(m[ns], key)
	if len(m[ns]) == 0 {
		delete(m, ns)
	}
}

// Listed replaces the state with a listing at rev (the view's first
// listing, or one after etcd compacted what the watch needed). Streams
// behind it get the whole state again.
func (r *Replica) Listed(kvs []*mvccpb.KeyValue, rev int64) {
	keys := map[string]map[string]*beaconv1.KeyValue{}
	plans := map[string]map[string]*rollout{}
	for _, kv := range kvs {
		ns, key, isRollout, ok := r.split(string(kv.Key))
		switch {
		case !ok:
		case isRollout:
			if p, ok := decodeRollout(key, kv); ok {
				putIn(plans, ns, key, p)
			}
		default:
			putIn(keys, ns, key, toProto("", &mvccpb.KeyValue{Key: []byte(key), Value: kv.Value, CreateRevision: kv.CreateRevision, ModRevision: kv.ModRevision, Version: kv.Version}))
		}
	}
	r.mu.Lock()
	r.keys, r.plans, r.rev, r.floor, r.changes = keys, plans, rev, rev, nil
	first := !r.loaded
	r.loaded = true
	r.wakeAllLocked()
	r.mu.Unlock()
	if first {
		close(r.ready)
	}
}

// Changed applies a watch response's events (those under the data and
// rollout prefixes among them) and advances past them — to rev, the
// response's header revision, only for a progress notification.
func (r *Replica) Changed(events []*clientv3.Event, rev int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.loaded {
		return
	}
	var woken []change
	for _, ev := range events {
		ns, key, isRollout, ok := r.split(string(ev.Kv.Key))
		if !ok || ev.Kv.ModRevision <= r.rev {
			continue
		}
		c := change{ns: ns, key: key, rev: ev.Kv.ModRevision, deleted: ev.Type == mvccpb.DELETE, rollout: isRollout}
		switch {
		case isRollout && c.deleted:
			delFrom(r.plans, ns, key)
		case isRollout:
			p, ok := decodeRollout(key, ev.Kv)
			if !ok {
				delFrom(r.plans, ns, key) // a record edited by hand: no rollout
				c.deleted = true
			} else {
				putIn(r.plans, ns, key, p)
			}
		case c.deleted:
			delFrom(r.keys, ns, key)
		default:
			putIn(r.keys, ns, key, &beaconv1.KeyValue{Key: key, Value: ev.Kv.Value, CreateRevision: ev.Kv.CreateRevision, ModRevision: ev.Kv.ModRevision, Version: ev.Kv.Version})
		}
		r.changes = append(r.changes, c)
		woken = append(woken, c)
	}
	// A response with events is complete up to its last event, not its
	// header: a watch catching up gets its events in batches that each
	// carry the store's current revision. Only a progress notification
	// (no events) vouches for its header.
	if len(events) > 0 {
		rev = 0
		for _, ev := range events {
			rev = max(rev, ev.Kv.ModRevision)
		}
	}
	advanced := rev > r.rev
	r.rev = max(r.rev, rev)
	if len(r.changes) > r.maxLog {
		// Drop the older half: a stream still behind it is reset.
		drop := len(r.changes) - r.maxLog/2
		r.floor = r.changes[drop-1].rev
		r.changes = slices.Delete(r.changes, 0, drop)
	}
	if advanced {
		for s := range r.catching {
			if r.rev >= s.atLeast {
				delete(r.catching, s)
				s.wake() // the replica reached the revision it waited for
			}
		}
	}
	if len(woken) == 0 {
		return // the registry's changes: no KV subscriber to look at
	}
	for s := range r.subs {
		if slices.ContainsFunc(woken, func(c change) bool { return s.wants(c) }) {
			s.wake()
		}
	}
}

func (r *Replica) wakeAllLocked() {
	for s := range r.subs {
		s.wake()
	}
}

// Sub is one watch stream's subscription to a key or a prefix of keys.
type Sub struct {
	r        *Replica
	ns, key  string
	prefix   bool
	rollouts bool                  // also the keys' rollouts
	readable func(key string) bool // what the stream's token may read
	wakeC    chan struct{}
	cursor   int64 // guarded by r.mu; every change up to cursor was handed out
	reset    bool  // guarded by r.mu; the next message is the whole state
	atLeast  int64 // the whole state is sent at this revision or later
}

// Subscribe watches key (or every key starting with it, with prefix) of
// a namespace, from after revision after (0: start with the whole state).
// readable filters the keys the subscriber may see.
// The first whole state is sent at revision atLeast or later (what the
// caller knows etcd had: a watch reads its own writes).
func (r *Replica) Subscribe(ns, key string, prefix, rollouts bool, after, atLeast int64, readable func(string) bool) *Sub {
	s := &Sub{r: r, ns: ns, key: key, prefix: prefix, rollouts: rollouts, readable: readable, wakeC: make(chan struct{}, 1), cursor: after, reset: after == 0, atLeast: atLeast}
	r.mu.Lock()
	r.subs[s] = struct{}{}
	if atLeast > r.rev {
		r.catching[s] = struct{}{}
	}
	r.mu.Unlock()
	return s
}

// Close ends the subscription.
func (s *Sub) Close() {
	s.r.mu.Lock()
	delete(s.r.subs, s)
	delete(s.r.catching, s)
	s.r.mu.Unlock()
}

func (s *Sub) wake() {
	select {
	case s.wakeC <- struct{}{}:
	default:
	}
}

func (s *Sub) wants(c change) bool { return (!c.rollout || s.rollouts) && s.matches(c.ns, c.key) }

func (s *Sub) matches(ns, key string) bool {
	if ns != s.ns {
		return false
	}
	if s.prefix {
		return strings.HasPrefix(key, s.key)
	}
	return key == s.key
}

// Cursor is the revision the subscriber has been handed everything up to.
func (s *Sub) Cursor() int64 {
	s.r.mu.Lock()
	defer s.r.mu.Unlock()
	return s.cursor
}

// Next waits for the subscriber's next message: the whole state (reset)
// first when the stream did not resume or fell behind the change log,
// then what changed, each key once at its latest version, in revision
// order. It returns context.DeadlineExceeded when quiet fires first.
func (s *Sub) Next(ctx context.Context, quiet <-chan time.Time) (*beaconv1.KVWatchResponse, error) {
	r := s.r
	for {
		r.mu.Lock()
		if r.loaded && r.rev >= s.atLeast {
			if s.reset || s.cursor < r.floor {
				resp := &beaconv1.KVWatchResponse{Revision: r.rev, FullState: true, Events: s.stateLocked()}
				s.cursor, s.reset = r.rev, false
				r.mu.Unlock()
				return resp, nil
			}
			if r.rev > s.cursor {
				events := s.changesLocked()
				s.cursor = r.rev
				if len(events) > 0 {
					resp := &beaconv1.KVWatchResponse{Revision: r.rev, Events: events}
					r.mu.Unlock()
					return resp, nil
				}
			}
		}
		r.mu.Unlock()
		select {
		case <-s.wakeC:
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-quiet:
			return nil, context.DeadlineExceeded
		}
	}
}

func (s *Sub) stateLocked() []*beaconv1.KVEvent {
	var out []*beaconv1.KVEvent
	add := func(key string) {
		if !s.readable(key) {
			return
		}
		if kv := s.r.keys[s.ns][key]; kv != nil {
			out = append(out, &beaconv1.KVEvent{Kv: kv})
		}
		if p := s.r.plans[s.ns][key]; p != nil && s.rollouts {
			out = append(out, &beaconv1.KVEvent{Kv: p.kv, Rollout: p.r, IsRollout: true})
		}
	}
	if !s.prefix {
		add(s.key)
		return out
	}
	var keys []string
	for key := range s.r.keys[s.ns] {
		if strings.HasPrefix(key, s.key) {
			keys = append(keys, key)
		}
	}
	for key := range s.r.plans[s.ns] {
		if strings.HasPrefix(key, s.key) && s.r.keys[s.ns][key] == nil && s.rollouts {
			keys = append(keys, key) // a rollout of a key that does not exist yet
		}
	}
	slices.Sort(keys)
	for _, key := range keys {
		add(key)
	}
	return out
}

// changesLocked is what changed after the cursor: each key once, at its
// latest version (or its deletion), in revision order.
func (s *Sub) changesLocked() []*beaconv1.KVEvent {
	r := s.r
	from, _ := slices.BinarySearchFunc(r.changes, s.cursor+1, func(c change, rev int64) int { return cmp.Compare(c.rev, rev) })
	if !s.prefix {
		// One key: its last value change and its last rollout change,
		// without the map a prefix needs (1,000 watchers of one key each
		// take this path for every change).
		var value, plan *change
		for i := range r.changes[from:] {
			c := &r.changes[from+i]
			if s.wants(*c) && s.readable(c.key) {
				if c.rollout {
					plan = c
				} else {
					value = c
				}
			}
		}
		out := make([]*beaconv1.KVEvent, 0, 2)
		for _, c := range []*change{value, plan} {
			if c != nil {
				if ev := s.eventLocked(*c); ev != nil {
					out = append(out, ev)
				}
			}
		}
		if len(out) == 2 && out[1].Kv.ModRevision < out[0].Kv.ModRevision {
			out[0], out[1] = out[1], out[0]
		}
		return out
	}
	type which struct {
		key     string
		rollout bool
	}
	latest := map[which]change{}
	for _, c := range r.changes[from:] {
		if s.wants(c) && s.readable(c.key) {
			latest[which{c.key, c.rollout}] = c
		}
	}
	out := make([]*beaconv1.KVEvent, 0, len(latest))
	for _, c := range latest {
		if ev := s.eventLocked(c); ev != nil {
			out = append(out, ev)
		}
	}
	slices.SortFunc(out, func(a, b *beaconv1.KVEvent) int {
		return cmp.Or(cmp.Compare(a.Kv.ModRevision, b.Kv.ModRevision), strings.Compare(a.Kv.Key, b.Kv.Key))
	})
	return out
}

// eventLocked is the event a subscriber gets for a key's latest change c:
// its deletion, its current rollout or its current value (nil when that
// is gone since).
func (s *Sub) eventLocked(c change) *beaconv1.KVEvent {
	r := s.r
	switch {
	case c.deleted:
		return &beaconv1.KVEvent{Kv: &beaconv1.KeyValue{Key: c.key, ModRevision: c.rev}, Deleted: true, IsRollout: c.rollout}
	case c.rollout:
		if p := r.plans[s.ns][c.key]; p != nil {
			return &beaconv1.KVEvent{Kv: p.kv, Rollout: p.r, IsRollout: true}
		}
	default:
		if kv := r.keys[s.ns][c.key]; kv != nil {
			return &beaconv1.KVEvent{Kv: kv}
		}
	}
	return nil
}

package server

import (
	"context"
	"math/rand/v2"
	"sync"
	"time"

	"beacon.dev/beacon/registry"
)

// acks tracks, for the watch streams whose clients acknowledge, which
// revision of each service they have applied, so that a draining instance
// can wait until nobody routes to it any more. It lives in memory: a
// watcher is known to the server its stream is on.
type acks struct {
	mu       sync.Mutex
	watchers map[uint64]*ackingWatcher // guarded by mu
	changed  chan struct{}             // guarded by mu; closed and replaced on every ack or leave
	// Services whose propagation is tracked (ServicePropagation): each
	// change asks their watchers for an acknowledgement.
	tracked map[registry.ServiceKey]*trackedService // guarded by mu
}

// Propagation tracking (the console's propagation view): how many
// acknowledging watchers of a service applied each of its last changes,
// and when. It is on for a service only while someone looks, since it
// costs each watcher an acknowledgement per change.
const (
	trackFor       = 10 * time.Minute
	trackedChanges = 16 // revisions kept per tracked service
	maxTracked     = 256
	// maxTrackedPerToken keeps one token from taking every place.
	maxTrackedPerToken = 32
)

type trackedService struct {
	by      string // the accessor whose look started the tracking
	from    int64  // the service's revision that look saw: later ones are changes
	until   time.Time
	changes []*revisionTrack // oldest first
}

type revisionTrack struct {
	rev             int64
	published       time.Time
	watchers, acked int
	gone            int
	lastAck         time.Time
	pending         map[uint64]bool // watchers yet to apply rev
}

type ackingWatcher struct {
	owner    string // the accessor of the stream's token: only it may acknowledge
	readable func(service string) bool
	ns       string
	services map[string]bool // nil: every service of ns
	applied  map[string]int64
	// Revisions waits need acknowledged, by service, not yet asked of the
	// client (taken by the stream with takeWanted); wake makes the stream
	// send them even with no change to send.
	wanted map[string]int64
	wake   func()
}

func newAcks() *acks {
	return &acks{watchers: make(map[uint64]*ackingWatcher), changed: make(chan struct{}), tracked: make(map[registry.ServiceKey]*trackedService)}
}

// join records a new acknowledging stream and returns its id.
//
// readable says which services the stream may read (nil: all): a stream
// does not count as a watcher of a service it is not sent. wake is called
// (never with a lock of acks held) when a wait wants the stream to ask its
// client for an acknowledgement. Stream ids are random, so that no caller
// finds another's by counting.
func (a *acks) join(owner, ns string, services []string, readable func(string) bool, wake func()) uint64 {
	w := &ackingWatcher{owner: owner, ns: ns, readable: readable, applied: make(map[string]int64), wanted: make(map[string]int64), wake: wake}
	if len(services) > 0 {
		w.services = make(map[string]bool, len(services))
		for _, s := range services {
			w.services[s] = true
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	for {
		id := rand.Uint64()
		if _, taken := a.watchers[id]; id != 0 && !taken {
			a.watchers[id] = w
			return id
		}
	}
}

// leave forgets a stream; waits counting it see it gone.
func (a *acks) leave(id uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if w, ok := a.watchers[id]; ok {
		a.leftLocked(id, w)
	}
	delete(a.watchers, id)
	a.broadcastLocked()
}

// ack records revisions a stream's client applied. It reports false for a
// stream this server does not know (ended, or on another server).
func (a *acks) ack(owner string, id uint64, revisions map[string]int64) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	w, ok := a.watchers[id]
	if !ok || w.owner != owner {
		return false
	}
	for svc, rev := range revisions {
		if w.services != nil && !w.services[svc] {
			continue // not watched on this stream: nothing to remember
		}
		if rev > w.applied[svc] {
			w.applied[svc] = rev
		}
	}
	a.ackedLocked(id, w, revisions, time.Now())
	a.broadcastLocked()
	return true
}

// ackedLocked counts a watcher's acknowledgements in the tracked changes
// it was pending on.
func (a *acks) ackedLocked(id uint64, w *ackingWatcher, revisions map[string]int64, now time.Time) {
	if len(a.tracked) == 0 {
		return
	}
	for svc, applied := range revisions {
		p := a.tracked[registry.ServiceKey{Namespace: w.ns, Service: svc}]
		if p == nil {
			continue
		}
		for _, c := range p.changes {
			if c.pending[id] && applied >= c.rev {
				c.settle(id)
				c.acked++
				c.lastAck = now
			}
		}
	}
}

// leftLocked counts a watcher that left as gone from the tracked changes
// it had not acknowledged.
func (a *acks) leftLocked(id uint64, w *ackingWatcher) {
	for sk, p := range a.tracked {
		if sk.Namespace != w.ns {
			continue
		}
		for _, c := range p.changes {
			if c.pending[id] {
				c.settle(id)
				c.gone++
			}
		}
	}
}

// settle drops a watcher from the change's pending set, and the set once
// empty: maps do not shrink, and most changes are soon acknowledged by all.
func (c *revisionTrack) settle(id uint64) {
	delete(c.pending, id)
	if len(c.pending) == 0 {
		c.pending = nil
	}
}

// track turns propagation tracking of a service on (or keeps it on) for
// trackFor, and returns what it has recorded, newest first. seen is the
// service's revision in the server's view as the caller looked: when the
// look starts the tracking, only revisions after it are changes. (The
// view shows a revision before its Published hook runs, so without it a
// look in between would report, as a change, the state it already saw.)
// It refuses (ok false) a new service beyond maxTracked on the server or
// maxTrackedPerToken for the token starting it.
func (a *acks) track(sk registry.ServiceKey, accessor string, seen int64, now time.Time) (until time.Time, changes []revisionTrack, ok bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	p := a.tracked[sk]
	if p == nil {
		a.expireLocked(now)
		mine := 0
		for _, t := range a.tracked {
			if t.by == accessor {
				mine++
			}
		}
		if len(a.tracked) >= maxTracked || mine >= maxTrackedPerToken {
			return time.Time{}, nil, false
		}
		p = &trackedService{by: accessor, from: seen}
		a.tracked[sk] = p
	}
	p.until = now.Add(trackFor)
	for i := len(p.changes) - 1; i >= 0; i-- {
		c := *p.changes[i]
		c.pending = nil
		changes = append(changes, c)
	}
	return p.until, changes, true
}

func (a *acks) expireLocked(now time.Time) {
	for sk, p := range a.tracked {
		if now.After(p.until) {
			delete(a.tracked, sk)
		}
	}
}

// published records new revisions of tracked services and asks their
// watchers to acknowledge them. It is the view's Published hook, which
// runs before the view offers the snapshots to the streams: no stream
// needs waking, the snapshot's message carries the request.
func (a *acks) published(snaps []*registry.Snapshot, now time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.tracked) == 0 {
		return
	}
	a.expireLocked(now)
	for _, snap := range snaps {
		sk := registry.ServiceKey{Namespace: snap.Namespace, Service: snap.Service}
		p := a.tracked[sk]
		if p == nil || snap.Revision <= p.from || len(p.changes) > 0 && p.changes[len(p.changes)-1].rev >= snap.Revision {
			continue
		}
		c := &revisionTrack{rev: snap.Revision, published: now}
		for id, w := range a.watchers {
			if w.ns != sk.Namespace || w.services != nil && !w.services[sk.Service] || w.readable != nil && !w.readable(sk.Service) {
				continue
			}
			c.watchers++
			if w.applied[sk.Service] >= c.rev {
				c.acked++
				c.lastAck = now
				continue
			}
			if c.pending == nil {
				c.pending = make(map[uint64]bool)
			}
			c.pending[id] = true
			w.wanted[sk.Service] = max(w.wanted[sk.Service], c.rev)
		}
		if len(p.changes) == trackedChanges {
			p.changes = append(p.changes[:0], p.changes[1:]...)
		}
		p.changes = append(p.changes, c)
	}
}

func (a *acks) broadcastLocked() {
	close(a.changed)
	a.changed = make(chan struct{})
}

// awaitResult is what a wait observed.
type awaitResult struct {
	Watchers, Acknowledged, Gone int
}

// Complete reports whether every watcher still connected acknowledged.
func (r awaitResult) Complete() bool { return r.Acknowledged+r.Gone == r.Watchers }

// takeWanted returns the acknowledgements a stream should ask of its
// client, once.
func (a *acks) takeWanted(id uint64) map[string]int64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	w, ok := a.watchers[id]
	if !ok || len(w.wanted) == 0 {
		return nil
	}
	out := w.wanted
	w.wanted = make(map[string]int64)
	return out
}

// await waits until every acknowledging stream watching ns/service when
// the wait began has applied rev or gone, or ctx ends; it then reports
// what it saw. Streams that have not acknowledged rev yet are asked to.
func (a *acks) await(ctx context.Context, ns, service string, rev int64) awaitResult {
	a.mu.Lock()
	var ids []uint64
	var wake []func()
	for id, w := range a.watchers {
		if w.ns == ns && (w.services == nil || w.services[service]) && (w.readable == nil || w.readable(service)) {
			ids = append(ids, id)
			if w.applied[service] < rev && w.wanted[service] < rev {
				w.wanted[service] = rev
				if w.wake != nil {
					wake = append(wake, w.wake)
				}
			}
		}
	}
	a.mu.Unlock()
	for _, f := range wake {
		f()
	}
	for {
		a.mu.Lock()
		r := awaitResult{Watchers: len(ids)}
		for _, id := range ids {
			w, ok := a.watchers[id]
			switch {
			case !ok:
				r.Gone++
			case w.applied[service] >= rev:
				r.Acknowledged++
			}
		}
		changed := a.changed
		a.mu.Unlock()
		if r.Complete() {
			return r
		}
		select {
		case <-ctx.Done():
			return r
		case <-changed:
		}
	}
}

// count returns the acknowledging streams (for the metric).
func (a *acks) count() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.watchers)
}

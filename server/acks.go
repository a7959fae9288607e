package server

import (
	"context"
	"math/rand/v2"
	"sync"
)

// acks tracks, for the watch streams whose clients acknowledge, which
// revision of each service they have applied, so that a draining instance
// can wait until nobody routes to it any more. It lives in memory: a
// watcher is known to the server its stream is on.
type acks struct {
	mu       sync.Mutex
	watchers map[uint64]*ackingWatcher // guarded by mu
	changed  chan struct{}             // guarded by mu; closed and replaced on every ack or leave
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
	return &acks{watchers: make(map[uint64]*ackingWatcher), changed: make(chan struct{})}
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
	a.broadcastLocked()
	return true
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

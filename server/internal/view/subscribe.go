package view

import (
	"cmp"
	"context"
	"errors"
	"slices"
	"sync"
	"time"

	"beacon.dev/beacon/registry"
)

// ErrClosed is returned by Next after Close.
var ErrClosed = errors.New("view: subscription closed")

// Subscription receives the snapshots of the services it watches.
type Subscription struct {
	view     *View
	ns       string
	services map[string]bool           // nil watches the whole namespace; never written after Subscribe
	allow    func(service string) bool // nil allows every service
	notify   chan struct{}             // size 1: "pending has something"

	mu      sync.Mutex
	pending map[string]Pending // guarded by mu; the newest unsent snapshot per service
	last    map[string]int64   // guarded by mu; newest revision queued per service
	sent    map[string]int64   // guarded by mu; revision last returned by Next per service
	initial map[string]bool    // guarded by mu; services of the initial sync not yet taken
	first   bool               // guarded by mu; the initial sync is not complete yet
	woken   bool               // guarded by mu; Wake was called
	closed  bool               // guarded by mu
}

// Pending is a snapshot waiting to be sent, with the time the view
// published it (for propagation metrics).
type Pending struct {
	Published
	Queued   time.Time
	Coalesce int // snapshots of this service replaced while it waited
	// Delta: this subscription last sent the subscriber Base, so only
	// what changed since needs to go (see Published.Base). Set when Next
	// returns it. A revision the subscriber only said it knew (on
	// reconnect, perhaps from another server) is never a base.
	Delta bool
}

// Subscribe starts a subscription to services of ns (all of them when
// services is empty). known holds the revisions the subscriber already has
// by service: only newer snapshots are sent, and a service it knows that no
// longer has any instance is sent as an empty snapshot.
func (v *View) Subscribe(ns string, services []string, known map[string]int64) *Subscription {
	return v.SubscribeFiltered(ns, services, known, nil)
}

// SubscribeFiltered is Subscribe that passes over the services allow
// refuses (nil: none). allow is called with the view locked: it must be
// quick and must not call the view.
func (v *View) SubscribeFiltered(ns string, services []string, known map[string]int64, allow func(service string) bool) *Subscription {
	s := &Subscription{
		view: v, ns: ns, allow: allow,
		notify:  make(chan struct{}, 1),
		pending: make(map[string]Pending),
		last:    make(map[string]int64),
		sent:    make(map[string]int64),
		first:   true,
	}
	if len(services) > 0 {
		s.services = make(map[string]bool, len(services))
		for _, name := range services {
			s.services[name] = true
		}
	}
	now := time.Now()
	v.mu.Lock()
	defer v.mu.Unlock()
	for name, rev := range known {
		s.last[name] = rev
	}
	for sk, snap := range v.services {
		if sk.Namespace == ns && s.wants(sk.Service) && snap.Revision > known[sk.Service] {
			if _, ok := known[sk.Service]; ok || len(snap.Instances) > 0 {
				s.pending[sk.Service] = Pending{Published: Published{Snap: snap, Enc: v.encoded[sk]}, Queued: now}
				s.last[sk.Service] = snap.Revision
			}
		}
	}
	// A service the subscriber knows but the view never saw (it was emptied
	// while this server was down) is reported empty at the view's revision.
	for name, rev := range known {
		sk := registry.ServiceKey{Namespace: ns, Service: name}
		if _, ok := v.services[sk]; !ok && s.wants(name) && rev < v.rev {
			empty := &registry.Snapshot{Namespace: ns, Service: name, Revision: v.rev}
			s.pending[name] = Pending{Published: Published{Snap: empty, Enc: new(Encoded)}, Queued: now}
			s.last[name] = v.rev
		}
	}
	s.initial = make(map[string]bool, len(s.pending))
	for name := range s.pending {
		s.initial[name] = true
	}
	v.subs[s] = struct{}{}
	s.notify <- struct{}{} // the first Next returns at once, even with nothing to send
	return s
}

func (s *Subscription) wants(service string) bool {
	return (s.services == nil || s.services[service]) && (s.allow == nil || s.allow(service))
}

// offer queues snapshots for the subscriber, replacing older pending ones.
func (s *Subscription) offer(pubs []Published, now time.Time) {
	queued := false
	s.mu.Lock()
	for _, pub := range pubs {
		snap := pub.Snap
		if snap.Namespace != s.ns || !s.wants(snap.Service) || snap.Revision <= s.last[snap.Service] {
			continue
		}
		p := Pending{Published: pub, Queued: now}
		if old, ok := s.pending[snap.Service]; ok {
			p.Queued = old.Queued
			p.Coalesce = old.Coalesce + 1
		}
		s.pending[snap.Service] = p
		s.last[snap.Service] = snap.Revision
		queued = true
	}
	s.mu.Unlock()
	if queued {
		select {
		case s.notify <- struct{}{}:
		default:
		}
	}
}

// Next waits for snapshots and returns all of them sorted by service, with
// synced true once the initial sync is complete (the subscriber is then
// current).
func (s *Subscription) Next(ctx context.Context) (snaps []Pending, synced bool, err error) {
	return s.NextBatch(ctx, nil)
}

// NextBatch is Next for a bounded message (and returns with nothing after
// Wake): take is asked about each
// pending snapshot in turn and says whether it still fits (the first one
// always does); what does not fit stays pending, to be coalesced with
// newer ones and returned by the next call. A subscriber that stops
// reading therefore holds one message at most, plus references to the
// view's shared snapshots. synced is true on the call that returns the
// last snapshot of the initial sync (or on the first call if there was
// nothing to sync).
func (s *Subscription) NextBatch(ctx context.Context, take func(Pending) bool) (snaps []Pending, synced bool, err error) {
	return s.NextBatchUntil(ctx, nil, take)
}

// NextBatchUntil is NextBatch that gives up with context.DeadlineExceeded
// when quiet delivers (nil: never) before anything is there to return.
func (s *Subscription) NextBatchUntil(ctx context.Context, quiet <-chan time.Time, take func(Pending) bool) (snaps []Pending, synced bool, err error) {
	for {
		select {
		case <-ctx.Done():
			return nil, false, ctx.Err()
		case <-quiet:
			return nil, false, context.DeadlineExceeded
		case <-s.notify:
		}
		// Everything pending is moved out under the lock and measured
		// without it: take may encode a large snapshot, and the view's
		// publisher must never wait for that (offer takes this lock).
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			return nil, false, ErrClosed
		}
		all := make([]Pending, 0, len(s.pending))
		for _, p := range s.pending {
			p.Delta = p.Base != nil && s.sent[p.Snap.Service] == p.Base.Revision
			all = append(all, p)
		}
		clear(s.pending)
		s.mu.Unlock()

		n := len(all)
		if take != nil {
			for i, p := range all {
				if !take(p) && i > 0 { // the first always fits
					n = i
					break
				}
			}
		}
		snaps = all[:n:n]

		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			return nil, false, ErrClosed
		}
		for _, p := range all[n:] { // back, unless a newer one came meanwhile
			if newer, ok := s.pending[p.Snap.Service]; ok {
				newer.Queued = p.Queued
				newer.Coalesce += p.Coalesce + 1
				s.pending[p.Snap.Service] = newer
				continue
			}
			s.pending[p.Snap.Service] = p
		}
		for _, p := range snaps {
			delete(s.initial, p.Snap.Service)
			s.sent[p.Snap.Service] = p.Snap.Revision
		}
		synced = s.first && len(s.initial) == 0
		if synced {
			s.first, s.initial = false, nil
		}
		woken := s.woken
		s.woken = false
		if len(s.pending) > 0 {
			select { // more to send: the next call must not wait
			case s.notify <- struct{}{}:
			default:
			}
		}
		s.mu.Unlock()
		if len(snaps) > 0 || synced || woken {
			slices.SortFunc(snaps, func(a, b Pending) int { return cmp.Compare(a.Snap.Service, b.Snap.Service) })
			return snaps, synced, nil
		}
	}
}

// Wake makes the subscriber's next (or current) NextBatch return, with
// nothing if nothing is pending: its owner has something else to send.
func (s *Subscription) Wake() {
	s.mu.Lock()
	s.woken = true
	s.mu.Unlock()
	select {
	case s.notify <- struct{}{}:
	default:
	}
}

// PendingCount returns how many snapshots wait to be sent.
func (s *Subscription) PendingCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.pending)
}

// Close ends the subscription; a blocked Next returns ErrClosed.
func (s *Subscription) Close() {
	s.view.mu.Lock()
	delete(s.view.subs, s)
	s.view.mu.Unlock()
	s.mu.Lock()
	s.closed = true
	clear(s.pending)
	s.mu.Unlock()
	select {
	case s.notify <- struct{}{}:
	default:
	}
}

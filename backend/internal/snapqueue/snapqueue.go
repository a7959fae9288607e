// Package snapqueue is the hand-over between a backend that learns of
// service snapshots and the discovery cache that reads them through
// discovery.Stream: the newest snapshot per changed service waits for
// Next, and the newest one per service is kept for Snapshot.
package snapqueue

import (
	"cmp"
	"context"
	"slices"
	"sync"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/registry"
)

// Queue is safe for concurrent use.
type Queue struct {
	notify chan struct{}
	done   chan struct{}
	once   sync.Once

	mu      sync.Mutex
	pending map[string]*registry.Snapshot // guarded by mu
	state   map[string]*registry.Snapshot // guarded by mu
}

// New returns an empty queue.
func New() *Queue {
	return &Queue{notify: make(chan struct{}, 1), done: make(chan struct{}),
		pending: map[string]*registry.Snapshot{}, state: map[string]*registry.Snapshot{}}
}

// Offer hands over a service's new snapshot, replacing one not yet read.
func (q *Queue) Offer(snap *registry.Snapshot) {
	q.mu.Lock()
	q.pending[snap.Service] = snap
	q.state[snap.Service] = snap
	q.mu.Unlock()
	select {
	case q.notify <- struct{}{}:
	default:
	}
}

// Next waits for snapshots not read yet and returns them sorted by
// service; client.ErrClosed once the queue is closed.
func (q *Queue) Next(ctx context.Context) ([]*registry.Snapshot, error) {
	for {
		q.mu.Lock()
		if len(q.pending) > 0 {
			out := make([]*registry.Snapshot, 0, len(q.pending))
			for _, p := range q.pending {
				out = append(out, p)
			}
			clear(q.pending)
			q.mu.Unlock()
			slices.SortFunc(out, func(a, b *registry.Snapshot) int { return cmp.Compare(a.Service, b.Service) })
			return out, nil
		}
		q.mu.Unlock()
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-q.done:
			return nil, client.ErrClosed
		case <-q.notify:
		}
	}
}

// Snapshot returns the newest snapshot of a service that has instances.
func (q *Queue) Snapshot(service string) (*registry.Snapshot, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	snap, ok := q.state[service]
	return snap, ok && len(snap.Instances) > 0
}

// Latest returns the newest snapshot of a service, empty ones included.
func (q *Queue) Latest(service string) (*registry.Snapshot, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	snap, ok := q.state[service]
	return snap, ok
}

// Close ends Next; it is idempotent.
func (q *Queue) Close() { q.once.Do(func() { close(q.done) }) }

// Done is closed by Close.
func (q *Queue) Done() <-chan struct{} { return q.done }

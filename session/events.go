package session

import "sync"

// eventQueue hands events to the callback from one goroutine, in order,
// with no lock held while the callback runs. Pushing never blocks: the
// session's heartbeats must not wait on a slow callback.
type eventQueue struct {
	f func(Event)

	mu      sync.Mutex
	pending []Event       // guarded by mu
	closed  bool          // guarded by mu
	wake    chan struct{} // size 1
}

func newEventQueue(f func(Event)) *eventQueue {
	q := &eventQueue{f: f, wake: make(chan struct{}, 1)}
	if f != nil {
		go q.deliver() // owned: ends once closed and drained
	}
	return q
}

func (q *eventQueue) push(ev Event) {
	if q.f == nil {
		return
	}
	q.mu.Lock()
	if !q.closed {
		q.pending = append(q.pending, ev)
	}
	q.mu.Unlock()
	q.signal()
}

// close lets the events already pushed be delivered, then ends the
// goroutine.
func (q *eventQueue) close() {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	q.signal()
}

func (q *eventQueue) signal() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

func (q *eventQueue) deliver() {
	for range q.wake {
		for {
			q.mu.Lock()
			if len(q.pending) == 0 {
				closed := q.closed
				q.mu.Unlock()
				if closed {
					return
				}
				break
			}
			ev := q.pending[0]
			q.pending = q.pending[1:]
			q.mu.Unlock()
			q.f(ev)
		}
	}
}

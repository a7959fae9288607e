// Package waitq matches answers to callers waiting on a multiplexed stream:
// per key, callers are answered in the order they asked. The SDK's
// keepalive stream uses it. (The server's stream to etcd keeps its own
// slots: a caller that gives up there must leave its place in line, since
// etcd still answers the request it sent.)
//
// A Queue is not safe for concurrent use: its owner guards it with the
// same mutex that serialises sends on the stream.
package waitq

// Queue holds the waiters of each key, oldest first.
type Queue[K comparable, V any] struct {
	waiters map[K][]chan V
}

// New returns an empty queue.
func New[K comparable, V any]() *Queue[K, V] {
	return &Queue[K, V]{waiters: make(map[K][]chan V)}
}

// Add registers a waiter for k and returns the channel (size 1) its answer
// arrives on.
func (q *Queue[K, V]) Add(k K) chan V {
	ch := make(chan V, 1)
	q.waiters[k] = append(q.waiters[k], ch)
	return ch
}

// Deliver answers the oldest waiter of k; it reports whether there was one.
func (q *Queue[K, V]) Deliver(k K, v V) bool {
	ws := q.waiters[k]
	if len(ws) == 0 {
		return false
	}
	ws[0] <- v
	// Pop the head in O(1): a key with many waiters (a client repeating
	// one id) must not cost a copy of its whole line per answer.
	if len(ws) == 1 {
		delete(q.waiters, k)
	} else {
		q.waiters[k] = ws[1:]
	}
	return true
}

// Drop forgets a waiter that gave up.
func (q *Queue[K, V]) Drop(k K, ch chan V) {
	ws := q.waiters[k]
	for i, w := range ws {
		if w == ch {
			ws = append(ws[:i], ws[i+1:]...)
			break
		}
	}
	if len(ws) == 0 {
		delete(q.waiters, k)
	} else {
		q.waiters[k] = ws
	}
}

// FailAll answers every waiter with v and empties the queue.
func (q *Queue[K, V]) FailAll(v V) {
	for k, ws := range q.waiters {
		for _, w := range ws {
			w <- v
		}
		delete(q.waiters, k)
	}
}

package waitq_test

import (
	"testing"

	"beacon.dev/beacon/internal/waitq"
)

func TestQueueAnswersInOrderPerKey(t *testing.T) {
	q := waitq.New[int, string]()
	a1, a2, b := q.Add(1), q.Add(1), q.Add(2)
	if !q.Deliver(1, "first") || <-a1 != "first" {
		t.Fatal("Deliver(1) did not answer the oldest waiter of 1")
	}
	q.Drop(1, a2)
	if q.Deliver(1, "late") {
		t.Error("Deliver(1) answered a dropped waiter")
	}
	q.FailAll("broken")
	if got := <-b; got != "broken" {
		t.Errorf("FailAll gave %q, want broken", got)
	}
	if q.Deliver(2, "x") {
		t.Error("a waiter survived FailAll")
	}
}

// A key with a long line of waiters is answered oldest first, each once.
func TestQueueLongLineOfOneKey(t *testing.T) {
	q := waitq.New[int, int]()
	const n = 100000 // Deliver used to copy the rest of the line per answer
	chans := make([]chan int, n)
	for i := range chans {
		chans[i] = q.Add(7)
	}
	for i := range n {
		if !q.Deliver(7, i) {
			t.Fatalf("Deliver #%d found no waiter", i)
		}
	}
	for i, ch := range chans {
		if got := <-ch; got != i {
			t.Fatalf("waiter %d got %d, want %d", i, got, i)
		}
	}
	if q.Deliver(7, -1) {
		t.Error("Deliver answered a waiter after every one was answered")
	}
}

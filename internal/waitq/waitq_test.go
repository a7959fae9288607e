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

package server

import (
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"
)

// deadlineRecorder is a ResponseWriter that records the write deadlines
// set on it, as net/http's would take them.
type deadlineRecorder struct {
	*httptest.ResponseRecorder
	deadlines  atomic.Int32
	onDeadline func() // what happens meanwhile, in the test
}

func (r *deadlineRecorder) SetWriteDeadline(time.Time) error {
	r.deadlines.Add(1)
	if r.onDeadline != nil {
		r.onDeadline()
	}
	return nil
}

// The watchdog cuts a write that has waited the timeout, once; it leaves
// alone a write that has not, a call between writes, and a call whose
// handler returned (its ResponseController may no longer be used) — the
// clock here is the watchdog's own argument, not the wall's.
func TestStalledWritesCutsOnlyWhatStillWaits(t *testing.T) {
	var cuts atomic.Int32
	sw := newStalledWrites(time.Second, func() { cuts.Add(1) })
	newCall := func() (*deadlineRecorder, *deadlineWriter, func()) {
		rec := &deadlineRecorder{ResponseRecorder: httptest.NewRecorder()}
		d, served := sw.wrap(rec)
		return rec, d, served
	}
	second := int64(time.Second)

	stalled, d1, _ := newCall()
	d1.since.Store(1) // began at the watchdog's start
	fresh, d2, _ := newCall()
	d2.since.Store(second / 2)
	idle, _, _ := newCall() // between writes
	ended, d4, served4 := newCall()
	d4.since.Store(1)
	served4() // the handler returned while its last write was recorded

	sw.cutStalled(second + 1)
	sw.cutStalled(second + 2) // again: a call is cut once
	if got := stalled.deadlines.Load(); got != 1 {
		t.Errorf("the stalled write got %d deadlines, want 1", got)
	}
	for name, r := range map[string]*deadlineRecorder{"a write under the timeout": fresh, "a call between writes": idle, "a call that ended": ended} {
		if got := r.deadlines.Load(); got != 0 {
			t.Errorf("%s got %d deadlines, want none", name, got)
		}
	}
	if cuts.Load() != 1 {
		t.Errorf("%d cuts counted, want 1", cuts.Load())
	}
	// A write that ends and a new one that begins is judged on its own.
	d2.since.Store(0)
	d2.since.Store(second + 1)
	sw.cutStalled(second + 2)
	if got := fresh.deadlines.Load(); got != 0 {
		t.Errorf("a new write was cut for its predecessor's wait (%d deadlines)", got)
	}

	// Two stalled calls; cutting either ends the other's handler before
	// its turn (it was chosen, then returned): that one is left alone.
	a, da, servedA := newCall()
	b, db, servedB := newCall()
	da.since.Store(second + 1)
	db.since.Store(second + 1)
	a.onDeadline, b.onDeadline = servedB, servedA
	sw.cutStalled(3 * second)
	if got := a.deadlines.Load() + b.deadlines.Load(); got != 1 {
		t.Errorf("%d of two calls cut where the first cut ended the other, want 1", got)
	}
}

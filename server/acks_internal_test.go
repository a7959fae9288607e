package server

import (
	"testing"
	"time"

	"beacon.dev/beacon/registry"
)

// A look that starts tracking a service sees its current revision; that
// revision's publication, if the view's hook runs after the look, is not a
// change, and the next revision is.
func TestTrackingCountsOnlyRevisionsAfterTheFirstLook(t *testing.T) {
	a := newAcks()
	sk := registry.ServiceKey{Namespace: "default", Service: "web"}
	now := time.Now()
	if _, changes, ok := a.track(sk, "", 5, now); !ok || len(changes) != 0 {
		t.Fatalf("first look: %v, %v; want tracking on, no change", changes, ok)
	}
	snap := func(rev int64) []*registry.Snapshot {
		return []*registry.Snapshot{{Namespace: sk.Namespace, Service: sk.Service, Revision: rev}}
	}
	a.published(snap(5), now)
	if _, changes, _ := a.track(sk, "", 5, now); len(changes) != 0 {
		t.Fatalf("after the publication of the revision the first look saw: changes %v, want none", changes)
	}
	a.published(snap(6), now)
	_, changes, _ := a.track(sk, "", 6, now)
	if len(changes) != 1 || changes[0].rev != 6 {
		t.Fatalf("after revision 6: changes %v, want revision 6 alone", changes)
	}
}

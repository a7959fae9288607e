package wire_test

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"testing"

	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/internal/wire"
	"beacon.dev/beacon/registry"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// randomSnapshot is a snapshot of up to 20 of 30 possible ids, sorted.
func randomSnapshot(rng *rand.Rand, rev int64) *registry.Snapshot {
	s := &registry.Snapshot{Namespace: "default", Service: "orders", Revision: rev, ProtectionThreshold: float64(rng.IntN(3)) / 4}
	for i := range 30 {
		if rng.IntN(3) == 0 {
			s.Instances = append(s.Instances, &registry.Instance{Namespace: "default", Service: "orders", ID: fmt.Sprintf("i-%02d", i), Address: "127.0.0.1", Port: 1 + rng.IntN(5), Weight: 100})
		}
	}
	return s
}

// delta is what the server sends to go from base to next, worked out the
// slow way: by id, comparing content.
func delta(base, next *registry.Snapshot) *beaconv1.ServiceSnapshot {
	old := map[string]*registry.Instance{}
	for _, in := range base.Instances {
		old[in.ID] = in
	}
	d := &beaconv1.ServiceSnapshot{Namespace: next.Namespace, Service: next.Service, Revision: next.Revision, BaseRevision: base.Revision, ProtectionThreshold: next.ProtectionThreshold}
	for _, in := range next.Instances {
		if o, ok := old[in.ID]; !ok || o.Port != in.Port {
			d.Instances = append(d.Instances, wire.InstanceToProto(in))
		}
		delete(old, in.ID)
	}
	d.Removed = slices.Sorted(maps.Keys(old))
	return d
}

func TestApplyDeltaGivesTheNextSnapshot(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	base := randomSnapshot(rng, 1)
	for rev := int64(2); rev < 2000; rev++ {
		next := randomSnapshot(rng, rev)
		got, err := wire.ApplyDelta(base, delta(base, next))
		if err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(wire.SnapshotToProto(got), wire.SnapshotToProto(next)) {
			t.Fatalf("revision %d: applied %v, want %v", rev, got.Instances, next.Instances)
		}
		base = got
	}
}

func TestApplyDeltaRefusesWhatDoesNotApply(t *testing.T) {
	base := &registry.Snapshot{Service: "orders", Revision: 5, Instances: []*registry.Instance{{ID: "a"}, {ID: "c"}}}
	for name, d := range map[string]*beaconv1.ServiceSnapshot{
		"another base":          {Service: "orders", Revision: 7, BaseRevision: 4},
		"upserts out of order":  {Service: "orders", Revision: 7, BaseRevision: 5, Instances: []*beaconv1.Instance{{Id: "d"}, {Id: "b"}}},
		"the same id twice":     {Service: "orders", Revision: 7, BaseRevision: 5, Instances: []*beaconv1.Instance{{Id: "b"}, {Id: "b"}}},
		"removals out of order": {Service: "orders", Revision: 7, BaseRevision: 5, Removed: []string{"c", "a"}},
	} {
		if _, err := wire.ApplyDelta(base, d); err == nil {
			t.Errorf("%s: applied", name)
		}
	}
	if _, err := wire.ApplyDelta(nil, &beaconv1.ServiceSnapshot{Service: "orders", Revision: 7, BaseRevision: 5}); err == nil {
		t.Error("a delta without a base: applied")
	}
}

// A hostile or broken server's delta never panics the client, and what
// applies is sorted and without duplicates.
func FuzzApplyDelta(f *testing.F) {
	seed, _ := proto.Marshal(&beaconv1.ServiceSnapshot{Service: "orders", Revision: 9, BaseRevision: 5, Instances: []*beaconv1.Instance{{Id: "b"}}, Removed: []string{"a"}})
	f.Add(seed)
	base := &registry.Snapshot{Service: "orders", Revision: 5, Instances: []*registry.Instance{{ID: "a"}, {ID: "c"}}}
	f.Fuzz(func(t *testing.T, b []byte) {
		var d beaconv1.ServiceSnapshot
		if proto.Unmarshal(b, &d) != nil {
			return
		}
		got, err := wire.ApplyDelta(base, &d)
		if err != nil {
			return
		}
		if !slices.IsSortedFunc(got.Instances, func(x, y *registry.Instance) int {
			if x.ID == y.ID {
				t.Fatalf("instance %q twice", x.ID)
			}
			return cmpID(x, y)
		}) {
			t.Fatalf("instances out of order: %v", got.Instances)
		}
	})
}

func cmpID(x, y *registry.Instance) int {
	switch {
	case x.ID < y.ID:
		return -1
	case x.ID > y.ID:
		return 1
	}
	return 0
}

package etcd_test

import (
	"context"
	"slices"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"beacon.dev/beacon/backend/etcd"
	"beacon.dev/beacon/discovery"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
)

// next collects what a stream delivers until cond holds on the newest
// snapshot of each service.
func next(ctx context.Context, t *testing.T, st discovery.Stream, seen map[string]*registry.Snapshot, cond func() bool) {
	t.Helper()
	for !cond() {
		snaps, err := st.Next(ctx)
		if err != nil {
			t.Fatalf("Next: %v", err)
		}
		for _, s := range snaps {
			if old, ok := seen[s.Service]; ok && s.Revision < old.Revision {
				t.Fatalf("%s went back from revision %d to %d", s.Service, old.Revision, s.Revision)
			}
			seen[s.Service] = s
		}
	}
}

func idsOf(s *registry.Snapshot) []string {
	var out []string
	if s != nil {
		for _, in := range s.Instances {
			out = append(out, in.ID)
		}
	}
	return out
}

// A stream follows its own namespace only; cut off while etcd compacts
// past it, it lists again and delivers what changed meanwhile.
func TestWatchFollowsItsNamespaceAndSurvivesCompaction(t *testing.T) {
	nd := testutil.StartBeacon(t)
	direct := etcdClient(t, "http://"+nd.EtcdClient)
	proxy := testutil.NewProxy(t, nd.EtcdClient)
	const prefix = "/watch-test/"
	ns := func(name string, cli *clientv3.Client) *etcd.Backend {
		b, err := etcd.New(cli, name, prefix, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { b.Close() })
		return b
	}
	a := ns("a", etcdClient(t, "http://"+proxy.Addr()))
	b := ns("b", direct)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	reg := func(bk *etcd.Backend, svc, id string) {
		t.Helper()
		if _, err := bk.Register(ctx, registry.Instance{Service: svc, ID: id, Address: "127.0.0.1", Port: 9000}); err != nil {
			t.Fatal(err)
		}
	}
	reg(a, "orders", "a-1")
	reg(b, "orders", "b-1")
	reg(b, "billing", "b-2")

	st, err := a.Watch(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	seen := map[string]*registry.Snapshot{}
	next(ctx, t, st, seen, func() bool { return slices.Equal(idsOf(seen["orders"]), []string{"a-1"}) })
	<-st.Synced()
	if _, ok := seen["billing"]; ok {
		t.Errorf("namespace a's stream delivered namespace b's billing")
	}

	// Cut off: b writes into a's namespace and etcd compacts past the
	// stream's revision.
	proxy.SetDown(true)
	bInA := ns("a", direct)
	reg(bInA, "orders", "a-2")
	// Compact past a-2 itself, so that the stream cannot resume from there.
	resp, err := direct.Put(ctx, prefix+"elsewhere", "x")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := direct.Compact(ctx, resp.Header.Revision); err != nil {
		t.Fatal(err)
	}
	proxy.SetDown(false)
	next(ctx, t, st, seen, func() bool { return slices.Equal(idsOf(seen["orders"]), []string{"a-1", "a-2"}) })
	testutil.Eventually(t, 30*time.Second, "the stream counts the watch it lost", func() bool { return st.Status().Reconnects >= 1 })
	if snap, ok := st.Snapshot("orders"); !ok || !slices.Equal(idsOf(snap), []string{"a-1", "a-2"}) {
		t.Errorf("Snapshot(orders) = %v, %v", snap, ok)
	}
	if _, ok := st.Snapshot("billing"); ok {
		t.Errorf("Snapshot(billing) of namespace a = found; it is namespace b's")
	}
}

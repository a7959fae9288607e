package view_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"
	"go.uber.org/zap"

	"beacon.dev/beacon/internal/store"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/internal/view"
	"beacon.dev/beacon/server/servertest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m, testutil.LeakOptions()...) }

// etcdFor starts a beacon server (for its embedded etcd, with a TCP client
// listener a proxy can stand in front of) and returns that address.
func etcdFor(t *testing.T) (etcdAddr string, st *store.Store) {
	t.Helper()
	cfg := servertest.Config(t, "")
	cfg.EtcdClientAddr = testutil.FreeAddr(t)
	srv := servertest.Start(t, cfg)
	st = store.New(srv.EtcdClient(), store.DefaultPrefix)
	t.Cleanup(st.Close)
	return cfg.EtcdClientAddr, st
}

func etcdClient(t *testing.T, addr string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{addr}, DialTimeout: 30 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

func startView(t *testing.T, cli *clientv3.Client, hooks view.Hooks) *view.View {
	t.Helper()
	v := view.New(cli, store.Layout{Prefix: store.DefaultPrefix}, nil, hooks)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); v.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-v.Ready():
	case <-time.After(30 * time.Second):
		t.Fatal("view not ready")
	}
	return v
}

func register(ctx context.Context, t *testing.T, st *store.Store, svc, id string, port int) int64 {
	t.Helper()
	in := registry.Instance{Service: svc, ID: id, Address: "127.0.0.1", Port: port}
	in.ApplyDefaults()
	rev, err := st.Register(ctx, &in)
	if err != nil {
		t.Fatal(err)
	}
	return rev
}

// Behaviour 5: etcd compacts the history the view's watch needs while it
// is cut off; the view lists again, converges, and its subscribers get the
// changes they missed.
func TestCompactionForcesRelistAndConverges(t *testing.T) {
	addr, st := etcdFor(t)
	proxy := testutil.NewProxy(t, addr)
	relists := make(chan bool, 10)
	v := startView(t, etcdClient(t, proxy.Addr()), view.Hooks{Relisted: func(compacted bool) { relists <- compacted }})
	<-relists // the first listing
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	register(ctx, t, st, "orders", "a", 1)
	register(ctx, t, st, "orders", "b", 2)
	if err := v.WaitRevision(ctx, register(ctx, t, st, "payments", "p", 3)); err != nil {
		t.Fatal(err)
	}
	sub := v.Subscribe("default", nil, map[string]int64{"orders": v.Snapshot(registry.ServiceKey{Namespace: "default", Service: "orders"}).Revision})
	defer sub.Close()
	if _, _, err := sub.Next(ctx); err != nil { // the initial sync
		t.Fatal(err)
	}

	proxy.SetDown(true)
	if _, _, err := st.Deregister(ctx, registry.InstanceKey{Namespace: "default", Service: "orders", ID: "a"}); err != nil {
		t.Fatal(err)
	}
	register(ctx, t, st, "orders", "c", 4)
	last := register(ctx, t, st, "inventory", "i", 5)
	if _, err := st.Client().Compact(ctx, last); err != nil {
		t.Fatalf("Compact: %v", err)
	}
	proxy.SetDown(false)

	select {
	case compacted := <-relists:
		if !compacted {
			t.Errorf("the view listed again for another reason than compaction")
		}
	case <-ctx.Done():
		t.Fatal("the view did not list again after compaction")
	}
	if err := v.WaitRevision(ctx, last); err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for len(got) < 2 {
		pend, _, err := sub.Next(ctx)
		if err != nil {
			t.Fatalf("subscriber stuck after compaction: %v (got %v)", err, got)
		}
		for _, p := range pend {
			got[p.Snap.Service] = ids(p.Snap)
		}
	}
	want := map[string]string{"orders": "[b c]", "inventory": "[i]"}
	for svc, w := range want {
		if got[svc] != w {
			t.Errorf("after compaction subscriber holds %s = %s, want %s", svc, got[svc], w)
		}
	}
	// The view keeps following etcd after the relist.
	rev := register(ctx, t, st, "orders", "d", 6)
	if err := v.WaitRevision(ctx, rev); err != nil {
		t.Fatal(err)
	}
	if s := ids(v.Snapshot(registry.ServiceKey{Namespace: "default", Service: "orders"})); s != "[b c d]" {
		t.Errorf("orders = %s after a later write, want [b c d]", s)
	}
}

func ids(s *registry.Snapshot) string {
	var out []string
	for _, in := range s.Instances {
		out = append(out, in.ID)
	}
	return fmt.Sprint(out)
}

// Behaviour 6 at the view: a subscriber that never reads holds at most one
// snapshot per service, and the others get every revision.
func TestStuckSubscriberIsCoalesced(t *testing.T) {
	addr, st := etcdFor(t)
	v := startView(t, etcdClient(t, addr), view.Hooks{})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	stuck := v.Subscribe("default", nil, nil)
	defer stuck.Close()
	live := v.Subscribe("default", []string{"orders"}, nil)
	defer live.Close()
	if _, _, err := live.Next(ctx); err != nil {
		t.Fatal(err)
	}
	var last int64
	for i := range 200 {
		rev := register(ctx, t, st, []string{"orders", "payments"}[i%2], fmt.Sprintf("i-%d", i%7), 1000+i)
		last = rev
		if i%2 == 0 {
			// The live subscriber sees each of its changes in turn.
			pend, _, err := live.Next(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if len(pend) != 1 || pend[0].Snap.Revision != rev {
				t.Fatalf("live subscriber got %d snapshots, want the one at revision %d", len(pend), rev)
			}
		}
	}
	// The last write (payments) is not awaited by the live subscriber: wait
	// for the view to apply it before comparing with the latest snapshot.
	if err := v.WaitRevision(ctx, last); err != nil {
		t.Fatal(err)
	}
	if n := stuck.PendingCount(); n > 2 {
		t.Errorf("stuck subscriber holds %d pending snapshots, want at most one per service (2)", n)
	}
	pend, _, err := stuck.Next(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(pend) != 2 {
		t.Fatalf("stuck subscriber got %d snapshots, want 2 (one per service)", len(pend))
	}
	for _, p := range pend {
		cur := v.Snapshot(registry.ServiceKey{Namespace: "default", Service: p.Snap.Service})
		if p.Snap != cur {
			t.Errorf("stuck subscriber got %s at revision %d, want the latest, %d", p.Snap.Service, p.Snap.Revision, cur.Revision)
		}
		if p.Coalesce < 50 {
			t.Errorf("stuck subscriber's %s replaced %d older snapshots, want about 99", p.Snap.Service, p.Coalesce)
		}
	}
}

// Writes outside beacon's prefix advance etcd's revision without any event
// for the view; WaitRevision must still finish (through a progress
// report), or every linearizable read would wait for its timeout.
func TestWaitRevisionWithUnrelatedWrites(t *testing.T) {
	addr, st := etcdFor(t)
	v := startView(t, etcdClient(t, addr), view.Hooks{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	resp, err := st.Client().Put(ctx, "/somebody-else/key", "x")
	if err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
	defer wcancel()
	if err := v.WaitRevision(wctx, resp.Header.Revision); err != nil {
		t.Fatalf("WaitRevision(%d) after an unrelated write = %v; the view is at %d", resp.Header.Revision, err, v.Revision())
	}
}

// Changes finds what a new snapshot replaced, added and removed by
// instance pointer: the view shares the instances that did not change.
func TestChanges(t *testing.T) {
	a, b, c, d := &registry.Instance{ID: "a"}, &registry.Instance{ID: "b"}, &registry.Instance{ID: "c"}, &registry.Instance{ID: "d"}
	b2 := &registry.Instance{ID: "b"}
	base := &registry.Snapshot{Revision: 1, Instances: []*registry.Instance{a, b, c}}
	next := &registry.Snapshot{Revision: 2, Instances: []*registry.Instance{b2, c, d}}
	up, removed := view.Changes(base, next)
	if fmt.Sprint(up) != fmt.Sprint([]*registry.Instance{b2, d}) || fmt.Sprint(removed) != "[a]" {
		t.Fatalf("Changes = %v, %v; want b (replaced) and d (added), a removed", up, removed)
	}
	if up, removed := view.Changes(nil, next); len(up) != 3 || removed != nil {
		t.Fatalf("Changes from nothing = %v, %v; want every instance", up, removed)
	}
	if up, removed := view.Changes(next, &registry.Snapshot{Revision: 3}); up != nil || fmt.Sprint(removed) != "[b c d]" {
		t.Fatalf("Changes to nothing = %v, %v; want every instance removed", up, removed)
	}
}

// A service's policy follows etcd: a change republishes the service, and
// a change missed while the watch was cut off (and its history compacted)
// arrives with the relist.
func TestPolicyChangesRepublishTheService(t *testing.T) {
	addr, st := etcdFor(t)
	proxy := testutil.NewProxy(t, addr)
	relists := make(chan bool, 10)
	published := make(chan *registry.Snapshot, 100)
	v := startView(t, etcdClient(t, proxy.Addr()), view.Hooks{
		Relisted: func(compacted bool) { relists <- compacted },
		Published: func(snaps []*registry.Snapshot) {
			for _, s := range snaps {
				published <- s
			}
		},
	})
	<-relists // the first listing
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	sk := registry.ServiceKey{Namespace: "default", Service: "orders"}
	// republished waits for a publication of orders at rev or later.
	republished := func(rev int64) {
		t.Helper()
		for {
			select {
			case s := <-published:
				if s.Service == "orders" && s.Revision >= rev {
					return
				}
			case <-ctx.Done():
				t.Fatalf("orders not published again at revision %d", rev)
			}
		}
	}
	republished(register(ctx, t, st, "orders", "a", 1))

	ring := registry.LoadBalancing{Policy: registry.LBRingHash, HashHeader: "x-user"}
	_, rev, err := st.UpdateServicePolicy(ctx, sk, func(p *registry.ServicePolicy) { p.LoadBalancing = ring })
	if err != nil {
		t.Fatal(err)
	}
	republished(rev)
	if got := v.Policy(sk); got.LoadBalancing != ring {
		t.Fatalf("Policy(orders) = %+v, want ring hash", got)
	}

	proxy.SetDown(true)
	retry := registry.RetryPolicy{On: registry.RetryOnUnavailable}
	_, rev, err = st.UpdateServicePolicy(ctx, sk, func(p *registry.ServicePolicy) { p.Retry = retry })
	if err != nil {
		t.Fatal(err)
	}
	last := register(ctx, t, st, "inventory", "i", 2) // compacted past the policy's change
	if _, err := st.Client().Compact(ctx, last); err != nil {
		t.Fatalf("Compact: %v", err)
	}
	proxy.SetDown(false)
	select {
	case compacted := <-relists:
		if !compacted {
			t.Errorf("the view listed again for another reason than compaction")
		}
	case <-ctx.Done():
		t.Fatal("the view did not list again after compaction")
	}
	republished(rev)
	if got := v.Policy(sk); got.LoadBalancing != ring || got.Retry != retry {
		t.Fatalf("Policy(orders) after the relist = %+v, want ring hash and the retries", got)
	}
	// Back to the defaults: the record goes, and so does the policy.
	_, rev, err = st.UpdateServicePolicy(ctx, sk, func(p *registry.ServicePolicy) { *p = registry.ServicePolicy{} })
	if err != nil {
		t.Fatal(err)
	}
	republished(rev)
	if got := v.Policy(sk); got != (registry.ServicePolicy{}) {
		t.Fatalf("Policy(orders) after the defaults = %+v, want the zero value", got)
	}
}

package store_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	clientv3 "go.etcd.io/etcd/client/v3"

	"beacon.dev/beacon/internal/store"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
)

func newStore(t *testing.T, prefix string) (*store.Store, *clientv3.Client) {
	t.Helper()
	nd := testutil.StartBeacon(t)
	st := store.New(etcdClient(t, nd), prefix)
	t.Cleanup(st.Close)
	return st, etcdClient(t, nd)
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func orders(id string, port int) *registry.Instance { // the check's spec follows the port
	in := registry.Instance{Service: "orders", ID: id, Address: "127.0.0.1", Port: port,
		Checks: []registry.Check{{Name: "http", Kind: registry.CheckHTTP, Target: "http://127.0.0.1:" + fmt.Sprint(port) + "/readyz"}}}
	in.ApplyDefaults()
	return &in
}

func read(ctx context.Context, t *testing.T, st *store.Store, cli *clientv3.Client, k registry.InstanceKey) *registry.Instance {
	t.Helper()
	key := st.InstanceKey(k)
	resp, err := cli.Get(ctx, key)
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("Get(%s) = %v, %v; want one record", key, resp, err)
	}
	in, err := st.DecodeInstance(key, resp.Kvs[0].Value, resp.Kvs[0].ModRevision)
	if err != nil {
		t.Fatal(err)
	}
	return in
}

// A registration again keeps what the registry decided — an operator's
// OUT_OF_SERVICE and a check's CRITICAL — read from etcd, not from anyone's
// in-memory view: the store has none, as a server just restarted has none.
func TestRegisterAgainKeepsStatusAndCheckStateFromEtcd(t *testing.T) {
	st, cli := newStore(t, "/merge-test/")
	ctx := testCtx(t)
	in := orders("o-1", 9001)
	if _, err := st.Register(ctx, in); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Update(ctx, in.Key(), func(cur *registry.Instance) bool {
		cur.Status = registry.StatusOutOfService
		cur.Checks[0].Status, cur.Checks[0].Output = registry.HealthCritical, "no heartbeat"
		return true
	}); err != nil {
		t.Fatal(err)
	}
	again := orders("o-1", 9001) // the owner restarted: UP, its check PASSING
	again.Version = "v2"
	before := again.Clone()
	if _, err := st.Register(ctx, again); err != nil {
		t.Fatal(err)
	}
	got := read(ctx, t, st, cli, in.Key())
	if got.Version != "v2" || got.Status != registry.StatusOutOfService || got.Checks[0].Status != registry.HealthCritical ||
		got.Checks[0].Output != "no heartbeat" || got.Health != registry.HealthCritical {
		t.Errorf("after registering again: version %q, status %v, check %v %q, health %v; want v2, OUT_OF_SERVICE, CRITICAL \"no heartbeat\", CRITICAL",
			got.Version, got.Status, got.Checks[0].Status, got.Checks[0].Output, got.Health)
	}
	if diff := cmp.Diff(before, *again); diff != "" {
		t.Errorf("Register changed its caller's instance (-before +after):\n%s", diff)
	}
}

// An operator's SetStatus (a compare-and-swap Update) racing registrations
// of the same key, many times, among registrations of other keys that
// share their batches: the final record always holds both writes.
func TestConcurrentStatusAndRegistrationLoseNothing(t *testing.T) {
	st, cli := newStore(t, "/merge-race-test/")
	ctx := testCtx(t)
	k := orders("hot", 1).Key()
	if _, err := st.Register(ctx, orders("hot", 1)); err != nil {
		t.Fatal(err)
	}
	const rounds = 100
	for round := range rounds {
		port := 2 + round
		var wg sync.WaitGroup
		var regErr, updErr error
		wg.Add(3)
		go func() {
			defer wg.Done()
			_, regErr = st.Register(ctx, orders("hot", port))
		}()
		go func() {
			defer wg.Done()
			_, updErr = st.Update(ctx, k, func(in *registry.Instance) bool {
				in.Status = registry.StatusOutOfService
				return true
			})
		}()
		go func() { // others in the same batches
			defer wg.Done()
			var owg sync.WaitGroup
			for i := range 8 {
				owg.Go(func() {
					if _, err := st.Register(ctx, orders(fmt.Sprintf("other-%d", i), port)); err != nil {
						t.Errorf("Register(other-%d) = %v", i, err)
					}
				})
			}
			owg.Wait()
		}()
		wg.Wait()
		if regErr != nil || updErr != nil {
			t.Fatalf("round %d: Register = %v, Update = %v", round, regErr, updErr)
		}
		got := read(ctx, t, st, cli, k)
		if got.Port != port || got.Status != registry.StatusOutOfService {
			t.Fatalf("round %d: port %d, status %v; want %d (the registration) and OUT_OF_SERVICE (the operator's)", round, got.Port, got.Status, port)
		}
		if _, err := st.Update(ctx, k, func(in *registry.Instance) bool { // back in service
			in.Status = registry.StatusUp
			return true
		}); err != nil {
			t.Fatal(err)
		}
	}
}

// A key that changes between every read and write makes only its own
// registration fail, with ErrConflict, after a bounded number of tries.
func TestRegisterGivesUpOnAKeyThatKeepsChanging(t *testing.T) {
	st, cli := newStore(t, "/merge-conflict-test/")
	ctx := testCtx(t)
	in := orders("busy", 9001)
	if _, err := st.Register(ctx, in); err != nil {
		t.Fatal(err)
	}
	key := st.InstanceKey(in.Key())
	calls := 0
	_, err := st.RegisterMerge(ctx, orders("busy", 9002), func(cur, in *registry.Instance) {
		calls++
		// Someone else writes the key after it was read.
		if _, err := cli.Put(ctx, key, string(store.EncodeInstance(cur))); err != nil {
			t.Error(err)
		}
	})
	if !errors.Is(err, store.ErrConflict) {
		t.Errorf("RegisterMerge(a key changed after every read) = %v, want ErrConflict", err)
	}
	if calls != 6 {
		t.Errorf("merge called %d times, want 6 (the read, then 5 conflicts)", calls)
	}
	if _, err := st.Register(ctx, orders("calm", 9003)); err != nil {
		t.Errorf("Register(another key) after a conflict = %v", err)
	}
}

// A session deletes only what is still bound to it.
func TestDeregisterSessionLeavesAnotherOwnersInstance(t *testing.T) {
	st, cli := newStore(t, "/dereg-test/")
	ctx := testCtx(t)
	a, _, err := st.CreateSession(ctx, 10*time.Second, "a")
	if err != nil {
		t.Fatal(err)
	}
	in := orders("orders-9", 9001)
	in.SessionID = a
	if _, err := st.Register(ctx, in); err != nil {
		t.Fatal(err)
	}
	persistent := orders("orders-9", 9002) // someone else takes the id over
	if _, err := st.Register(ctx, persistent); err != nil {
		t.Fatal(err)
	}
	if _, found, err := st.DeregisterSession(ctx, in.Key(), a); err != nil || found {
		t.Errorf("DeregisterSession(orders-9, a) = found %v, %v; want false, nil", found, err)
	}
	if err := st.CloseSession(ctx, a); err != nil {
		t.Fatal(err)
	}
	if got := read(ctx, t, st, cli, in.Key()); got.Port != 9002 || got.SessionID != 0 {
		t.Errorf("after session a let go: %+v, want the persistent record", got)
	}
	if _, found, err := st.DeregisterSession(ctx, in.Key(), 0); err != nil || !found {
		t.Errorf("DeregisterSession(orders-9, 0) = found %v, %v; want true, nil", found, err)
	}
	b, _, err := st.CreateSession(ctx, 10*time.Second, "b")
	if err != nil {
		t.Fatal(err)
	}
	defer st.CloseSession(ctx, b)
	in.SessionID = b
	if _, err := st.Register(ctx, in); err != nil {
		t.Fatal(err)
	}
	if _, found, err := st.DeregisterSession(ctx, in.Key(), b); err != nil || !found {
		t.Errorf("DeregisterSession(orders-9, b) = found %v, %v; want true, nil", found, err)
	}
}

// A hint (the server's view) only spares a read: whatever it says — a key
// absent that exists, an old record, a record another session holds that
// etcd no longer has — the write merges with, and is guarded by, the
// record etcd holds.
func TestStaleHintsChangeNothing(t *testing.T) {
	st, cli := newStore(t, "/hint-test/")
	ctx := testCtx(t)
	out := orders("out", 9001)
	old := orders("old", 9002)
	for _, in := range []*registry.Instance{out, old} {
		if _, err := st.Register(ctx, in); err != nil {
			t.Fatal(err)
		}
	}
	stale := read(ctx, t, st, cli, old.Key()) // as a lagging view holds it: UP
	for _, k := range []registry.InstanceKey{out.Key(), old.Key()} {
		if _, err := st.Update(ctx, k, func(cur *registry.Instance) bool {
			cur.Status = registry.StatusOutOfService
			return true
		}); err != nil {
			t.Fatal(err)
		}
	}
	gone := orders("gone", 9003)
	gone.SessionID = 42 // a session's record the view still holds; etcd has none
	hinted := map[registry.InstanceKey]bool{}
	var mu sync.Mutex
	st.SetHint(func(k registry.InstanceKey) (*registry.Instance, bool) {
		mu.Lock()
		hinted[k] = true
		mu.Unlock()
		switch k {
		case old.Key():
			return stale, true
		case gone.Key():
			return gone, true
		case orders("unknown", 1).Key():
			return nil, false // the view cannot say: read from etcd
		}
		return nil, true // "absent", also of out, which exists
	})
	for _, in := range []*registry.Instance{orders("out", 9001), orders("old", 9002)} {
		if _, err := st.Register(ctx, in); err != nil {
			t.Fatal(err)
		}
		if got := read(ctx, t, st, cli, in.Key()); got.Status != registry.StatusOutOfService {
			t.Errorf("%s registered again on a stale hint: status %v, want the operator's OUT_OF_SERVICE from etcd", in.ID, got.Status)
		}
	}
	errHeld := errors.New("held by another session")
	mine := orders("gone", 9004)
	if _, err := st.RegisterGuarded(ctx, mine, store.KeepObservations, func(cur *registry.Instance) error {
		if cur != nil && cur.SessionID != 0 {
			return errHeld
		}
		return nil
	}); err != nil {
		t.Errorf("RegisterGuarded(a key the hint says another session holds, absent in etcd) = %v, want nil", err)
	}
	if got := read(ctx, t, st, cli, mine.Key()); got.Port != 9004 {
		t.Errorf("gone after the guarded registration: port %d, want 9004", got.Port)
	}
	// The same in one batch: stale, wrong and unknown hints side by side,
	// so that hinted and read records share a transaction and its Else.
	revs, errs := st.RegisterMany(ctx, []store.Registration{
		{Instance: orders("out", 9101)}, {Instance: orders("unknown", 9102)}, {Instance: orders("old", 9103)},
	})
	for i, err := range errs {
		if err != nil || revs[i] == 0 {
			t.Fatalf("RegisterMany[%d] = %d, %v", i, revs[i], err)
		}
	}
	for _, id := range []string{"out", "old"} {
		if got := read(ctx, t, st, cli, orders(id, 1).Key()); got.Status != registry.StatusOutOfService || got.Port < 9101 {
			t.Errorf("%s after the batch: status %v port %d, want OUT_OF_SERVICE kept and the batch's port", id, got.Status, got.Port)
		}
	}
	if got := read(ctx, t, st, cli, orders("unknown", 1).Key()); got.Port != 9102 {
		t.Errorf("unknown after the batch: port %d, want 9102", got.Port)
	}
	if len(hinted) != 4 {
		t.Errorf("hint asked for %d keys, want 4: registrations must consult it", len(hinted))
	}
}

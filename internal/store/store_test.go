package store_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"
	"go.uber.org/zap"

	"beacon.dev/beacon/internal/store"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m, testutil.LeakOptions()...) }

// etcdClient is a client of the embedded etcd of a `beacon server` process
// (the store's tests run no server code in-process).
func etcdClient(t *testing.T, nd *testutil.Node) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{"http://" + nd.EtcdClient}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// Group commit must keep every caller's outcome its own: in a burst where
// one session is gone, only its registrations fail, with
// ErrSessionNotFound, and the others are stored.
func TestConcurrentRegistrationsKeepTheirOwnOutcome(t *testing.T) {
	nd := testutil.StartBeacon(t)
	st := store.New(etcdClient(t, nd), "/batch-test/")
	defer st.Close()
	concurrentRegistrations(t, st)
}

// With a local KV set (a server that embeds etcd passes its in-process
// one), every group commit goes through it, with the same outcomes.
func TestRegistrationsGoThroughTheLocalKV(t *testing.T) {
	nd := testutil.StartBeacon(t)
	cli := etcdClient(t, nd)
	st := store.New(cli, "/batch-local-test/")
	defer st.Close()
	local := &countingKV{KV: clientv3.NewKV(etcdClient(t, nd))}
	st.SetLocalKV(local)
	concurrentRegistrations(t, st)
	if local.txns.Load() == 0 {
		t.Fatal("no transaction went through the local KV")
	}
}

type countingKV struct {
	clientv3.KV
	txns atomic.Int64
}

func (k *countingKV) Txn(ctx context.Context) clientv3.Txn {
	k.txns.Add(1)
	return k.KV.Txn(ctx)
}

func concurrentRegistrations(t *testing.T, st *store.Store) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	live, _, err := st.CreateSession(ctx, 10*time.Second, "live")
	if err != nil {
		t.Fatal(err)
	}
	dead, _, err := st.CreateSession(ctx, 10*time.Second, "dead")
	if err != nil {
		t.Fatal(err)
	}
	if err := st.CloseSession(ctx, dead); err != nil {
		t.Fatal(err)
	}
	const n = 200
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			in := registry.Instance{Service: "orders", ID: fmt.Sprintf("i-%d", i%50), Address: "127.0.0.1", Port: 1 + i}
			in.ApplyDefaults()
			switch i % 3 {
			case 0:
				in.SessionID = live
			case 1:
				in.SessionID = dead
			}
			_, errs[i] = st.Register(ctx, &in)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		switch {
		case i%3 == 1 && !errors.Is(err, store.ErrSessionNotFound):
			t.Errorf("registration %d under a closed session = %v, want ErrSessionNotFound", i, err)
		case i%3 != 1 && err != nil:
			t.Errorf("registration %d = %v, want success", i, err)
		}
	}
	res := st.KeepAliveMany(ctx, []int64{dead, live})
	if !errors.Is(res[0].Err, store.ErrSessionNotFound) {
		t.Errorf("KeepAliveMany(closed session) = %v, want ErrSessionNotFound", res[0].Err)
	}
	if res[1].Err != nil || res[1].TTL != 10*time.Second {
		t.Errorf("KeepAliveMany(live) = %v, %v; want 10s", res[1].TTL, res[1].Err)
	}
}

// A guard sees the record the write compares against: what it refuses is
// not written, in a burst as alone, and what it lets through is.
func TestRegisterGuardedDecidesOnTheRecordItReplaces(t *testing.T) {
	nd := testutil.StartBeacon(t)
	st := store.New(etcdClient(t, nd), "/guard-test/")
	defer st.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	a, _, err := st.CreateSession(ctx, 10*time.Second, "a")
	if err != nil {
		t.Fatal(err)
	}
	b, _, err := st.CreateSession(ctx, 10*time.Second, "b")
	if err != nil {
		t.Fatal(err)
	}
	errHeld := errors.New("held by another session")
	guard := func(cur *registry.Instance) error {
		if cur != nil && cur.SessionID != 0 {
			return errHeld
		}
		return nil
	}
	mine := registry.Instance{Service: "orders", ID: "i1", Address: "10.0.0.1", Port: 80, SessionID: a}
	mine.ApplyDefaults()
	if _, err := st.RegisterGuarded(ctx, &mine, store.KeepObservations, guard); err != nil {
		t.Fatalf("RegisterGuarded(absent) = %v", err)
	}
	var wg sync.WaitGroup
	errs := make([]error, 50)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			theirs := registry.Instance{Service: "orders", ID: "i1", Address: "10.6.6.6", Port: 80, SessionID: b}
			if i%2 == 0 {
				theirs.ID = fmt.Sprintf("other-%d", i) // absent: let through, in the same batches
			}
			theirs.ApplyDefaults()
			_, errs[i] = st.RegisterGuarded(ctx, &theirs, store.KeepObservations, guard)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if want := error(nil); i%2 == 1 && !errors.Is(err, errHeld) || i%2 == 0 && err != want {
			t.Errorf("registration %d = %v", i, err)
		}
	}
	resp, err := etcdClient(t, nd).Get(ctx, store.Layout{Prefix: "/guard-test/"}.InstanceKey(mine.Key()))
	if err != nil || len(resp.Kvs) != 1 || resp.Kvs[0].Lease != a || !strings.Contains(string(resp.Kvs[0].Value), "10.0.0.1") {
		t.Fatalf("i1 after the refused takeovers: %v %v, want session a's record at 10.0.0.1", resp, err)
	}
}

package store_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
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

package memory_test

import (
	"context"
	"testing"
	"time"

	"go.uber.org/goleak"

	"beacon.dev/beacon/backend"
	"beacon.dev/beacon/backend/backendtest"
	"beacon.dev/beacon/backend/memory"
	"beacon.dev/beacon/discovery"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m, testutil.LeakOptions()...) }

func TestConformance(t *testing.T) {
	backendtest.Run(t, backendtest.Harness{
		New: func(t *testing.T) backend.Backend { return memory.New("") },
		TTL: 2 * time.Second,
		Expire: func(t *testing.T, b backend.Backend, id int64) {
			b.(*memory.Registry).ExpireSession(id)
		},
	})
}

// The SDK's data plane runs on it unchanged: a discovery cache follows it.
func TestDiscoveryCacheFollowsIt(t *testing.T) {
	r := memory.New("")
	defer r.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cache, err := discovery.New(r, discovery.Config{}, "orders")
	if err != nil {
		t.Fatal(err)
	}
	defer cache.Close()
	if _, err := r.Register(ctx, registry.Instance{Service: "orders", ID: "o-1", Address: "127.0.0.1", Port: 9001}); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "the cache sees the instance", func() bool {
		set, ok := cache.Endpoints("orders")
		return ok && len(set.Endpoints) == 1 && set.Endpoints[0].Addr == "127.0.0.1:9001"
	})
}

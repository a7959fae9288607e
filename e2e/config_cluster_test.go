package e2e

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/config"
	"beacon.dev/beacon/internal/testutil"
)

// On a 3-node cluster: a config binding whose server goes away moves to
// another and never steps back to an older value; fenced increments by
// lock holders on different servers never overlap.
func TestConfigAndLocksOnACluster(t *testing.T) {
	ms := startCluster(t, 3)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	writer := newClient(t, ms[0].API)
	if _, err := writer.KV().Put(ctx, "shop/flags", []byte(`{"n":0}`)); err != nil {
		t.Fatal(err)
	}

	// The binding reads from node 1 through a proxy, node 2 after it.
	proxy := testutil.NewProxy(t, ms[1].API)
	reader, err := client.New([]string{proxy.Addr(), ms[2].API}, client.WithOrderedServers(), client.WithWatchHeartbeat(200*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()
	type flags struct {
		N int `json:"n"`
	}
	var (
		mu   sync.Mutex
		revs []int64
		last int
	)
	b, err := config.Bind(ctx, reader, "shop/flags", config.OnEvent(func(e config.Event[flags]) {
		if e.New == nil {
			return
		}
		mu.Lock()
		revs, last = append(revs, e.Revision), e.New.N
		mu.Unlock()
	}))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	const writes = 40
	for i := 1; i <= writes; i++ {
		if i == writes/2 {
			proxy.SetDown(true) // node 1 is gone for this client
			proxy.Cut()
		}
		if _, err := writer.KV().Put(ctx, "shop/flags", fmt.Appendf(nil, `{"n":%d}`, i)); err != nil {
			t.Fatal(err)
		}
	}
	testutil.Eventually(t, 60*time.Second, "the binding to apply the last write on another server", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return last == writes
	})
	mu.Lock()
	if !slices.IsSorted(revs) || len(slices.Compact(slices.Clone(revs))) != len(revs) {
		t.Fatalf("applied revisions went back or repeated: %v", revs)
	}
	mu.Unlock()

	// Fenced increments by contenders on all three servers.
	if _, err := writer.KV().Put(ctx, "stock", []byte("0")); err != nil {
		t.Fatal(err)
	}
	const contenders, rounds = 6, 5
	var wg sync.WaitGroup
	for w := range contenders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := newClient(t, ms[w%3].API)
			s, err := c.NewSession(ctx)
			if err != nil {
				t.Error(err)
				return
			}
			defer s.Close(ctx)
			m := c.Mutex(s, "stock-lock")
			for range rounds {
				h, err := m.Lock(ctx)
				if err != nil {
					t.Error(err)
					return
				}
				cur, err := c.KV().Get(ctx, "stock")
				if err == nil {
					n, _ := strconv.Atoi(string(cur.Value))
					_, err = c.KV().CompareAndSwap(ctx, "stock", []byte(strconv.Itoa(n+1)), cur.ModRevision, client.Fenced(h))
				}
				if err != nil {
					t.Errorf("contender %d: %v", w, err)
				}
				if err := h.Unlock(ctx); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	got, err := writer.KV().Get(ctx, "stock")
	if err != nil || string(got.Value) != strconv.Itoa(contenders*rounds) {
		t.Fatalf("stock = %s, %v; want %d", got.Value, err, contenders*rounds)
	}
}

package client_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
)

func TestKVClient(t *testing.T) {
	srv := testutil.StartBeacon(t)
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	kv := c.KV()
	r1, err := kv.Put(ctx, "shop/price", []byte("10"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.CompareAndSwap(ctx, "shop/price", []byte("11"), r1-1); !errors.Is(err, client.ErrCompareFailed) {
		t.Fatalf("stale compare-and-swap = %v, want ErrCompareFailed", err)
	}
	r2, err := kv.CompareAndSwap(ctx, "shop/price", []byte("12"), r1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Txn(ctx, []client.KVOp{client.OpPut("shop/flags", []byte("on")), client.OpCheck("shop/price", r1)}); !errors.Is(err, client.ErrCompareFailed) {
		t.Fatalf("transaction on a stale check = %v", err)
	}
	r3, err := kv.Txn(ctx, []client.KVOp{client.OpPut("shop/flags", []byte("on")), client.OpCheck("shop/price", r2), client.OpDelete("nothing").IfRevision(0)})
	if err != nil {
		t.Fatal(err)
	}
	got, err := kv.Get(ctx, "shop/flags")
	if err != nil || string(got.Value) != "on" || got.ModRevision != r3 {
		t.Fatalf("get = %+v, %v", got, err)
	}
	if _, err := kv.Get(ctx, "shop/none"); !errors.Is(err, client.ErrNotFound) {
		t.Fatalf("get of a missing key = %v, want ErrNotFound", err)
	}
	if _, err := kv.Put(ctx, "bad key", nil); !errors.Is(err, registry.ErrInvalid) {
		t.Fatalf("bad key = %v, want ErrInvalid", err)
	}
	all, _, err := kv.List(ctx, "shop/")
	if err != nil || len(all) != 2 {
		t.Fatalf("list = %+v, %v", all, err)
	}
	hist, err := kv.History(ctx, "shop/price")
	if err != nil || len(hist) != 2 || hist[0].Revision != r1 {
		t.Fatalf("history = %+v, %v", hist, err)
	}
	if _, err := kv.Rollback(ctx, "shop/price", r1); err != nil {
		t.Fatal(err)
	}
	if got, _ := kv.Get(ctx, "shop/price"); string(got.Value) != "10" {
		t.Fatalf("after rollback: %s", got.Value)
	}
}

// A watcher follows changes and, when its stream is cut, resumes from the
// revision it holds: no change is missed and the state never steps back.
func TestKVWatcherResumesAfterACut(t *testing.T) {
	srv := testutil.StartBeacon(t)
	proxy := testutil.NewProxy(t, srv.Addr())
	watching, err := client.New([]string{proxy.Addr()}, client.WithWatchHeartbeat(200*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer watching.Close()
	writing, err := client.New([]string{srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer writing.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	w, err := watching.KV().Watch(ctx, "cfg/", true)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	st, err := w.Next(ctx)
	if err != nil || len(st.Values) != 0 {
		t.Fatalf("first state = %+v, %v", st, err)
	}
	var last int64
	for i := range 20 {
		if i == 10 {
			proxy.SetDown(true)
			proxy.Cut()
		}
		if last, err = writing.KV().Put(ctx, fmt.Sprint("cfg/k", i%5), []byte(fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
		if i == 14 {
			proxy.SetDown(false)
		}
	}
	prev := st.Revision
	for st.Revision < last {
		if st, err = w.Next(ctx); err != nil {
			t.Fatal(err)
		}
		if st.Revision <= prev {
			t.Fatalf("state went from revision %d to %d", prev, st.Revision)
		}
		prev = st.Revision
	}
	for i := 15; i < 20; i++ {
		if v := st.Values[fmt.Sprint("cfg/k", i%5)]; string(v.Value) != fmt.Sprint(i) {
			t.Fatalf("cfg/k%d = %q, want %d", i%5, v.Value, i)
		}
	}
}

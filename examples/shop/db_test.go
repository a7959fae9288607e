package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"beacon.dev/beacon/internal/testutil"
)

// startTestDB starts a shop database and opens it n times, as n
// inventory instances would.
func startTestDB(t *testing.T, n int) []*db {
	t.Helper()
	e, err := startEtcd(t.TempDir(), testutil.FreeAddr(t), testutil.FreeAddr(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	var out []*db
	for range n {
		d, err := openDB(e.Config().ListenClientUrls[0].Host)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		out = append(out, d)
	}
	return out
}

// Many orders racing for the same stock: exactly as many succeed as the
// stock allows, none twice, and a retried order takes nothing more.
func TestReserveIsSafeUnderConcurrency(t *testing.T) {
	dbs := startTestDB(t, 3) // three instances: the version check decides
	d := dbs[0]
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := d.seedStock(ctx, "widget", 100); err != nil {
		t.Fatal(err)
	}
	const orders, each = 40, 3 // 120 asked of 100: 33 fit
	var wg sync.WaitGroup
	var mu sync.Mutex
	reserved, outOfStock := 0, 0
	for i := range orders {
		wg.Go(func() {
			order := fmt.Sprintf("o-%d", i)
			// Every order is sent twice at once, as a hedge would.
			var inner sync.WaitGroup
			for copy := range 2 {
				inner.Go(func() {
					_, err := dbs[(i+copy)%len(dbs)].reserve(ctx, order, "widget", each)
					mu.Lock()
					defer mu.Unlock()
					switch {
					case err == nil:
						reserved++
					case errors.Is(err, ErrOutOfStock):
						outOfStock++
					default:
						t.Errorf("reserve %s: %v", order, err)
					}
				})
			}
			inner.Wait()
		})
	}
	wg.Wait()
	resp, err := d.cli.Get(ctx, "/shop/stock/widget")
	if err != nil {
		t.Fatal(err)
	}
	if got := string(resp.Kvs[0].Value); got != "1" {
		t.Errorf("stock left = %s, want 1 (33 orders of 3 taken from 100)", got)
	}
	res, err := d.cli.Get(ctx, "/shop/reservations/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	if res.Count != 33 {
		t.Errorf("%d orders reserved, want 33", res.Count)
	}
	// Both copies of a reserved order answer success; of the rest, a copy
	// may see out of stock.
	if reserved < 66 || reserved+outOfStock != 2*orders {
		t.Errorf("answers: %d reserved, %d out of stock; want ≥ 66 reserved of %d", reserved, outOfStock, 2*orders)
	}
	// An order retried later takes nothing more and answers what it did.
	left, err := d.reserve(ctx, "o-0", "widget", each)
	if err != nil && !errors.Is(err, ErrOutOfStock) {
		t.Fatal(err)
	}
	if resp, _ := d.cli.Get(ctx, "/shop/stock/widget"); string(resp.Kvs[0].Value) != "1" {
		t.Errorf("a retried order changed the stock to %s (answered %d)", resp.Kvs[0].Value, left)
	}
}

func TestChargeOncePerOrder(t *testing.T) {
	d := startTestDB(t, 1)[0]
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	id1, err := d.charge(ctx, "o-1", 250)
	if err != nil {
		t.Fatal(err)
	}
	id2, err := d.charge(ctx, "o-1", 250)
	if err != nil || id2 != id1 {
		t.Fatalf("second charge: %q, %v; want %q, nil", id2, err, id1)
	}
	if _, err := d.charge(ctx, "o-1", 999); err == nil {
		t.Fatal("charging an order again with another amount succeeded")
	}
	resp, err := d.cli.Get(ctx, "/shop/charges/o-1")
	if err != nil {
		t.Fatal(err)
	}
	if string(resp.Kvs[0].Value) != "250" {
		t.Errorf("stored charge = %s cents, want 250", resp.Kvs[0].Value)
	}
}

package main

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/examples/shop/shopkit"
	"beacon.dev/beacon/examples/shop/shoppb"
	"beacon.dev/beacon/internal/testutil"
)

// Two inventory instances deduct stock under the item's beacon lock,
// writing it with the lock's fencing token. One is frozen (SIGSTOP) after
// reading the stock, holding the lock, past its session's TTL; the other
// takes the lock and deducts; on SIGCONT the frozen one writes at once —
// and the database's fence refuses it. With a few hundred more orders on
// both, the stock is exactly what the accepted orders took: nothing sold
// twice, no deduction lost.
func TestFrozenLockHolderIsFenced(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cl := newCluster(ctx, t)
	if err := cl.StartDB(ctx); err != nil {
		t.Fatal(err)
	}
	const stock = 1000
	var invs []*shopkit.Proc
	var clients []shoppb.InventoryClient
	for range 2 {
		p, err := cl.Start(ctx, "inventory", "--fenced-stock", "--stock", fmt.Sprint(stock), "--ttl", "2s")
		if err != nil {
			t.Fatal(err)
		}
		cc, err := grpc.NewClient(p.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer cc.Close()
		invs, clients = append(invs, p), append(clients, shoppb.NewInventoryClient(cc))
	}
	observer, err := client.New([]string{cl.Registry})
	if err != nil {
		t.Fatal(err)
	}
	defer observer.Close()

	// Instance 0 reads the stock holding the lock, and stalls.
	frozen := make(chan error, 1)
	go func() {
		_, err := clients[0].Reserve(ctx, &shoppb.ReserveRequest{OrderId: "stall-1", Item: "widget", Quantity: 5})
		frozen <- err
	}()
	testutil.Eventually(t, 60*time.Second, "instance 0 to stall holding the lock", func() bool {
		return strings.Contains(invs[0].Output(), "shop: stalled stall-1")
	})
	if err := invs[0].Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := true
	defer func() {
		if stopped {
			invs[0].Signal(syscall.SIGCONT)
		}
	}()
	first, _, err := observer.Leader(ctx, "shop/stock/widget")
	if err != nil {
		t.Fatal(err)
	}
	// Instance 1 waits for the lock: it gets it once the frozen holder's
	// session has expired and the lock delay has passed, and deducts.
	resp, err := clients[1].Reserve(ctx, &shoppb.ReserveRequest{OrderId: "o-during", Item: "widget", Quantity: 3})
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetRemaining() != stock-3 {
		t.Fatalf("the new holder left %d, want %d", resp.GetRemaining(), stock-3)
	}
	if err := invs[0].Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	stopped = false
	if err := <-frozen; status.Code(err) != codes.Aborted || !strings.Contains(err.Error(), "fenced") {
		t.Fatalf("the frozen holder's write = %v, want refused by the fence", err)
	}
	t.Logf("frozen holder's token %d refused after a newer holder wrote", first.Token)

	// A few hundred orders on both instances at once.
	const orders = 300
	var wg sync.WaitGroup
	var mu sync.Mutex
	taken := 3
	for i := range orders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := clients[i%2].Reserve(ctx, &shoppb.ReserveRequest{OrderId: fmt.Sprint("o-", i), Item: "widget", Quantity: 1})
			if err != nil {
				t.Errorf("order %d: %v", i, err)
				return
			}
			_ = r
			mu.Lock()
			taken++
			mu.Unlock()
		}()
		if i%50 == 49 {
			wg.Wait() // in waves: 50 waiters at a time on one lock
		}
	}
	wg.Wait()
	d, err := openDB(cl.DB)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	got, err := d.cli.Get(ctx, "/shop/stock/widget")
	if err != nil || len(got.Kvs) != 1 {
		t.Fatal(err)
	}
	if string(got.Kvs[0].Value) != fmt.Sprint(stock-taken) {
		t.Fatalf("stock = %s, want %d (%d units taken by accepted orders)", got.Kvs[0].Value, stock-taken, taken)
	}
}

package store_test

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"beacon.dev/beacon/internal/store"
	"beacon.dev/beacon/internal/testutil"
)

// Every id gets its own answer, in the caller's order, repeated ids
// included.
func TestKeepAliveManyAnswersEveryID(t *testing.T) {
	nd := testutil.StartBeacon(t)
	st := store.New(etcdClient(t, nd), "/ka-test/")
	defer st.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	live, _, err := st.CreateSession(ctx, 10*time.Second, "live")
	if err != nil {
		t.Fatal(err)
	}
	const bogus = 1 << 40
	ids := []int64{live, bogus, live, bogus + 1, live}
	for i, r := range st.KeepAliveMany(ctx, ids) {
		switch {
		case ids[i] == live && (r.Err != nil || r.TTL <= 0):
			t.Errorf("KeepAliveMany()[%d] (live) = %v, %v; want a TTL", i, r.TTL, r.Err)
		case ids[i] != live && !errors.Is(r.Err, store.ErrSessionNotFound):
			t.Errorf("KeepAliveMany()[%d] (no such session) = %v, %v; want ErrSessionNotFound", i, r.TTL, r.Err)
		}
	}
}

// Finding A at the store: callers pipelining batches of 10,000 bogus ids
// must not stop a single session's renewals (before the fix the shared
// etcd stream deadlocked: a send under the lock its reader needs), and
// Close must return during the flood.
func TestKeepAliveFloodDoesNotBlockOthers(t *testing.T) {
	nd := testutil.StartBeacon(t)
	st := store.New(etcdClient(t, nd), "/ka-test/")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	live, _, err := st.CreateSession(ctx, 10*time.Second, "live")
	if err != nil {
		t.Fatal(err)
	}
	bogus := make([]int64, 10000)
	for i := range bogus {
		bogus[i] = 1<<40 + int64(i)
	}
	floodCtx, stopFlood := context.WithCancel(ctx)
	var flooders sync.WaitGroup
	var batches, overloaded atomic.Int64
	for range 8 {
		flooders.Add(1)
		go func() {
			defer flooders.Done()
			for floodCtx.Err() == nil {
				for _, r := range st.KeepAliveMany(floodCtx, bogus) {
					if errors.Is(r.Err, store.ErrOverloaded) {
						overloaded.Add(1)
					}
				}
				batches.Add(1)
			}
		}()
	}
	defer func() { stopFlood(); flooders.Wait() }()
	testutil.Eventually(t, time.Minute, "8 batches of the flood", func() bool { return batches.Load() >= 8 })
	ok := 0
	for ok < 20 {
		r := st.KeepAliveMany(ctx, []int64{live})[0]
		switch {
		case r.Err == nil:
			ok++
		case errors.Is(r.Err, store.ErrSessionNotFound):
			t.Fatalf("the live session expired during the flood (after %d renewals)", ok)
		case ctx.Err() != nil:
			t.Fatalf("only %d renewals of the live session during the flood: %v", ok, r.Err)
		}
	}
	t.Logf("20 renewals during the flood; %d flood batches, %d flood ids answered ErrOverloaded", batches.Load(), overloaded.Load())
	closed := make(chan struct{})
	go func() {
		st.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(60 * time.Second):
		t.Fatal("Close did not return during the flood")
	}
	if r := st.KeepAliveMany(ctx, []int64{live})[0]; r.Err == nil {
		t.Error("KeepAliveMany after Close = nil error, want one")
	}
}

// Finding B at the store: with etcd unreachable (clientv3 waits for a
// connection), a renewal is answered ErrOverloaded once it could not be
// sent in time, and Close returns with renewals in flight.
func TestKeepAliveWithEtcdUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens: every connection is refused
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{addr}, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	st := store.New(cli, "/unreachable/")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if r := st.KeepAliveMany(ctx, []int64{1}); !errors.Is(r[0].Err, store.ErrOverloaded) {
		t.Errorf("KeepAliveMany with etcd unreachable = %v, want ErrOverloaded", r[0].Err)
	}
	var callers sync.WaitGroup
	for range 4 {
		callers.Add(1)
		go func() {
			defer callers.Done()
			st.KeepAliveMany(ctx, []int64{1, 2, 3})
		}()
	}
	closed := make(chan struct{})
	go func() {
		st.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-ctx.Done():
		t.Fatal("Close did not return with etcd unreachable")
	}
	callers.Wait()
}

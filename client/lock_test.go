package client_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
)

// 50 contenders take a lock in turn and add one to a counter with a
// fenced compare-and-swap; a third of the time the holder drops its
// session while holding the lock (a lost holder) and then tries the write
// anyway. The checker: every write of a lost holder is refused by the
// fence, the fencing tokens of the writes that landed grow in the order
// they landed (no two holders overlapped), and the counter is exactly
// their number. No lock delay: the fence alone is the subject.
func TestMutexExclusionWithLostHolders(t *testing.T) {
	srv := testutil.StartBeacon(t, "--lock-delay=-1s")
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	admin, err := client.New([]string{srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	if _, err := admin.KV().Put(ctx, "stock", []byte("0")); err != nil {
		t.Fatal(err)
	}
	type write struct{ rev, token int64 }
	var (
		mu            sync.Mutex
		landed        []write
		fencedRefused int
	)
	const contenders, rounds = 50, 2
	var wg sync.WaitGroup
	for w := range contenders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := client.New([]string{srv.Addr()})
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			for range rounds {
				s, err := c.NewSession(ctx, client.WithTTL(2*time.Second))
				if err != nil {
					t.Error(err)
					return
				}
				h, err := c.Mutex(s, "stock-lock").Lock(ctx)
				if err != nil {
					t.Error(err)
					return
				}
				lose := rng.IntN(3) == 0
				if lose {
					s.Close(ctx) // lost with its session, not released
					testutil.Eventually(t, 30*time.Second, "the lost holder to notice", func() bool { return h.Context().Err() != nil })
				}
				cur, err := c.KV().Get(ctx, "stock")
				if err != nil {
					t.Error(err)
					return
				}
				n, _ := strconv.Atoi(string(cur.Value))
				rev, err := c.KV().CompareAndSwap(ctx, "stock", []byte(strconv.Itoa(n+1)), cur.ModRevision, client.Fenced(h))
				mu.Lock()
				switch {
				case err == nil && !lose:
					landed = append(landed, write{rev, h.Token()})
				case errors.Is(err, client.ErrFenced) && lose:
					fencedRefused++
				default:
					t.Errorf("contender %d (lost holder: %v): write = %v", w, lose, err)
				}
				mu.Unlock()
				if !lose {
					if err := h.Unlock(ctx); err != nil {
						t.Error(err)
					}
					s.Close(ctx)
				}
			}
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	slices.SortFunc(landed, func(a, b write) int { return int(a.rev - b.rev) })
	for i := 1; i < len(landed); i++ {
		if landed[i].token <= landed[i-1].token {
			t.Fatalf("write at revision %d carries token %d after token %d: two holders overlapped", landed[i].rev, landed[i].token, landed[i-1].token)
		}
	}
	got, _ := admin.KV().Get(ctx, "stock")
	if string(got.Value) != strconv.Itoa(len(landed)) {
		t.Fatalf("stock = %s, want %d (the writes that landed)", got.Value, len(landed))
	}
	if fencedRefused == 0 {
		t.Fatal("no lost holder tried a write: the test proves nothing about the fence")
	}
	t.Logf("%d fenced writes landed, %d lost holders refused", len(landed), fencedRefused)
}

// A holder cut off from the registry stops (its context ends with
// ErrLockLost) while the server still holds the lock for its session:
// before the lock could go to anyone else.
func TestHeldContextEndsBeforeTheSessionCanExpire(t *testing.T) {
	srv := testutil.StartBeacon(t)
	proxy := testutil.NewProxy(t, srv.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := client.New([]string{proxy.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	observer, err := client.New([]string{srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer observer.Close()
	s, err := c.NewSession(ctx, client.WithTTL(15*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	h, err := c.Mutex(s, "leader").Lock(ctx)
	if err != nil {
		t.Fatal(err)
	}
	proxy.Freeze(true)
	proxy.Cut()
	select {
	case <-h.Context().Done():
	case <-ctx.Done():
		t.Fatal("the holder's context never ended")
	}
	if !errors.Is(context.Cause(h.Context()), client.ErrLockLost) {
		t.Fatalf("cause = %v, want ErrLockLost", context.Cause(h.Context()))
	}
	// The session's 15 s TTL has at least its 3 s margin left: the server
	// still gives the lock to this session.
	other, err := observer.NewSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := observer.Mutex(other, "leader").TryLock(ctx); !errors.Is(err, client.ErrLockHeld) || !strings.Contains(err.Error(), fmt.Sprintf("%x", s.ID())) {
		t.Fatalf("try by another session = %v, want ErrLockHeld naming session %x", err, s.ID())
	}
	proxy.Freeze(false)
}

// Goroutines locking one name on one session take turns: the server
// queues sessions, so without the process-local turn both would find the
// session at the head of the queue.
func TestMutexGoroutinesOfOneSessionTakeTurns(t *testing.T) {
	srv := testutil.StartBeacon(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := c.NewSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var inside, most atomic.Int32
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 5 {
				h, err := c.Mutex(s, "shared").Lock(ctx)
				if err != nil {
					t.Error(err)
					return
				}
				n := inside.Add(1)
				for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
				}
				runtime.Gosched() // let another goroutine try to get in
				inside.Add(-1)
				if err := h.Unlock(ctx); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	if most.Load() != 1 {
		t.Fatalf("%d goroutines held the lock at once", most.Load())
	}
	h, err := c.Mutex(s, "shared").TryLock(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Mutex(s, "shared").TryLock(ctx); !errors.Is(err, client.ErrLockHeld) {
		t.Fatalf("second TryLock in the process = %v, want ErrLockHeld", err)
	}
	h.Unlock(ctx)
}

package client_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
)

// Candidates lead in turn: an observer sees each leader and its
// proclaimed value; a resigned or lost leader hands over to the next; a
// leader that lost its place cannot proclaim.
func TestElectionFailover(t *testing.T) {
	srv := testutil.StartBeacon(t, "--lock-delay=-1s")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	newClient := func() *client.Client {
		c, err := client.New([]string{srv.Addr()}, client.WithWatchHeartbeat(200*time.Millisecond))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	observer := newClient()
	w, err := observer.ObserveLeader(ctx, "scheduler")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if _, ok, err := w.Next(ctx); err != nil || ok {
		t.Fatalf("first observation = %v, %v; want no leader", ok, err)
	}
	waitLeader := func(value string) client.Leader {
		t.Helper()
		for {
			l, ok, err := w.Next(ctx)
			if err != nil {
				t.Fatalf("waiting for leader %q: %v", value, err)
			}
			if ok && string(l.Value) == value {
				return l
			}
		}
	}
	type candidate struct {
		s    *client.Session
		held chan *client.Held
	}
	var cands []candidate
	for _, addr := range []string{"10.0.0.1", "10.0.0.2", "10.0.0.3"} {
		c := newClient()
		s, err := c.NewSession(ctx, client.WithTTL(5*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		cd := candidate{s, make(chan *client.Held, 1)}
		cands = append(cands, cd)
		go func() {
			h, err := c.Election(s, "scheduler").Campaign(ctx, []byte(addr))
			if err != nil {
				t.Error(err)
			}
			cd.held <- h
		}()
		if addr == "10.0.0.1" {
			waitLeader("10.0.0.1") // the first leads; the later ones queue
			continue
		}
		testutil.Eventually(t, 30*time.Second, "the candidate to queue", func() bool {
			locks, err := observer.Locks(ctx, "scheduler")
			return err == nil && len(locks) == 1 && len(locks[0].GetWaiters()) == len(cands)-1
		})
	}
	first := <-cands[0].held
	if err := first.Proclaim(ctx, []byte("10.0.0.1:9000")); err != nil {
		t.Fatal(err)
	}
	waitLeader("10.0.0.1:9000")
	if err := first.Unlock(ctx); err != nil { // resign
		t.Fatal(err)
	}
	second := waitLeader("10.0.0.2")
	if h := <-cands[1].held; h.Token() != second.Token || h.Token() <= first.Token() {
		t.Fatalf("second leader's token %d, observed %d, first %d", h.Token(), second.Token, first.Token())
	}
	cands[1].s.Close(ctx) // the leader's session ends: lost
	waitLeader("10.0.0.3")
	if err := first.Proclaim(ctx, []byte("me again")); !errors.Is(err, client.ErrFenced) {
		t.Fatalf("proclaim by a resigned leader = %v, want ErrFenced", err)
	}
	leader, ok, err := observer.Leader(ctx, "scheduler")
	if err != nil || !ok || string(leader.Value) != "10.0.0.3" {
		t.Fatalf("Leader = %+v, %v, %v", leader, ok, err)
	}
	(<-cands[2].held).Unlock(ctx)
}

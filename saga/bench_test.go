package saga_test

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/saga"
)

// noop is a step that does nothing: what is measured is the saga's own
// cost (its state writes, the watch, the dispatch).
func noop(name string) saga.Step {
	return saga.Step{Name: name, Action: func(context.Context, saga.Run) ([]byte, error) { return nil, nil }}
}

// BenchmarkSagaSteps: sagas of 3 no-op steps, 64 in flight, through an
// orchestrator; the anchor is the least a hand-rolled saga on beacon KV
// writes — a create, then one fenced compare-and-swap per step of each
// saga's key, by 64 goroutines — in the same run. Reported as steps/s
// each and their ratio.
func BenchmarkSagaSteps(b *testing.B) {
	srv := testutil.StartBeacon(b, "--write-rate=1000000") // the writes, not the per-connection limit
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	const steps, inFlight = 3, 64
	sess, err := c.NewSession(ctx)
	if err != nil {
		b.Fatal(err)
	}
	defer sess.Close(ctx)

	// The anchor first: fenced writes by hand.
	held, err := c.Election(sess, "anchor/shard").Campaign(ctx, nil)
	if err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	work := make(chan int)
	var wg sync.WaitGroup
	for range inFlight {
		wg.Go(func() {
			for i := range work {
				key := fmt.Sprintf("anchor/runs/%d", i)
				rev, err := c.KV().CompareAndSwap(ctx, key, []byte(`{"status":"running","step":0}`), 0)
				for s := 1; err == nil && s <= steps; s++ {
					rev, err = c.KV().CompareAndSwap(ctx, key, fmt.Appendf(nil, `{"status":"running","step":%d}`, s), rev, client.Fenced(held))
				}
				if err != nil {
					b.Error(err)
				}
			}
		})
	}
	for i := range b.N {
		work <- i
	}
	close(work)
	wg.Wait()
	anchor := float64(b.N*steps) / time.Since(start).Seconds()

	o, err := saga.New(saga.Config{Client: c, Session: sess, KeepFinished: -1}, saga.Definition{Name: "bench", Steps: []saga.Step{noop("a"), noop("b"), noop("c")}})
	if err != nil {
		b.Fatal(err)
	}
	rctx, stop := context.WithCancel(ctx)
	ran := make(chan error, 1)
	go func() { ran <- o.Run(rctx) }()
	defer func() { stop(); <-ran }()
	for o.Stats().Leading < 8 {
		time.Sleep(10 * time.Millisecond)
	}
	b.ResetTimer()
	start = time.Now()
	work = make(chan int)
	for range inFlight {
		wg.Go(func() {
			for i := range work {
				id := fmt.Sprint("s-", i)
				if _, err := o.Start(ctx, "bench", id, nil); err != nil {
					b.Error(err)
					continue
				}
				if st, err := o.Wait(ctx, "bench", id); err != nil || st.Status != saga.Done {
					b.Errorf("saga %s: %s, %v", id, st.Status, err)
				}
			}
		})
	}
	for i := range b.N {
		work <- i
	}
	close(work)
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	sagaRate := float64(b.N*steps) / elapsed.Seconds()
	b.ReportMetric(sagaRate, "steps/s")
	b.ReportMetric(anchor, "anchor-steps/s")
	b.ReportMetric(sagaRate/anchor, "ratio")
}

// BenchmarkSagaRecovery: an orchestrator moving 50 sagas loses its
// session (as when its process dies: lost, not released, so the lock
// delay applies); the time until another orchestrator has finished all of
// them. Add the session's TTL for a process that dies without a word
// (the registry notices its silence only then).
func BenchmarkSagaRecovery(b *testing.B) {
	srv := testutil.StartBeacon(b) // the default --lock-delay (5 s)
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	const n = 50
	var total time.Duration
	b.StopTimer()
	for round := range b.N {
		prefix := fmt.Sprintf("recovery%d/", round)
		var mu sync.Mutex
		hung := map[string]bool{}
		def := saga.Definition{Name: "r", Steps: []saga.Step{noop("a"), {Name: "b", Action: func(ctx context.Context, r saga.Run) ([]byte, error) {
			mu.Lock()
			first := !hung[r.ID]
			hung[r.ID] = true
			mu.Unlock()
			if first { // the first orchestrator hangs here until it loses its lead
				<-ctx.Done()
				return nil, ctx.Err()
			}
			return nil, nil
		}}, noop("c")}}
		run := func() (*saga.Orchestrator, *client.Session, func()) {
			s, err := c.NewSession(ctx)
			if err != nil {
				b.Fatal(err)
			}
			o, err := saga.New(saga.Config{Client: c, Session: s, Prefix: prefix, Logger: slog.New(slog.DiscardHandler)}, def)
			if err != nil {
				b.Fatal(err)
			}
			rctx, stop := context.WithCancel(ctx)
			ran := make(chan error, 1)
			go func() { ran <- o.Run(rctx) }()
			return o, s, func() { stop(); <-ran; s.Close(ctx) }
		}
		a, aSess, stopA := run()
		for a.Stats().Leading < 8 {
			time.Sleep(10 * time.Millisecond)
		}
		for i := range n {
			if _, err := a.Start(ctx, "r", fmt.Sprint("x-", i), nil); err != nil {
				b.Fatal(err)
			}
		}
		for {
			mu.Lock()
			k := len(hung)
			mu.Unlock()
			if k == n {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		bo, _, stopB := run()
		b.StartTimer()
		t0 := time.Now()
		if err := aSess.Close(ctx); err != nil {
			b.Fatal(err)
		}
		for i := range n {
			if st, err := bo.Wait(ctx, "r", fmt.Sprint("x-", i)); err != nil || st.Status != saga.Done {
				b.Fatalf("saga %d: %s, %v", i, st.Status, err)
			}
		}
		total += time.Since(t0)
		b.StopTimer()
		stopA()
		stopB()
	}
	b.ReportMetric(total.Seconds()/float64(b.N), "s/recovery")
	b.ReportMetric(0, "ns/op")
}

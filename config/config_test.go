package config_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/config"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
)

type pricing struct {
	Discount float64 `json:"discount"`
	Region   string  `json:"region"`
}

func validPricing(p pricing) error {
	if p.Discount < 0 || p.Discount > 0.5 {
		return fmt.Errorf("discount %v is outside [0, 0.5]", p.Discount)
	}
	return nil
}

func newClient(t *testing.T, addr string) *client.Client {
	t.Helper()
	c, err := client.New([]string{addr}, client.WithWatchHeartbeat(200*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// Good values are applied in order; a value that does not decode or
// validate is never applied (the last good one stays) and is reported —
// to the callback, and to the server, where `rollout status` reads it.
func TestBindAppliesOnlyGoodValues(t *testing.T) {
	srv := testutil.StartBeacon(t)
	c := newClient(t, srv.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	put := func(v string) int64 {
		t.Helper()
		rev, err := c.KV().Put(ctx, "shop/pricing", []byte(v))
		if err != nil {
			t.Fatal(err)
		}
		return rev
	}
	r1 := put(`{"discount":0.1,"region":"eu"}`)
	s, err := c.NewSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	events := make(chan config.Event[pricing], 16)
	b, err := config.Bind(ctx, c, "shop/pricing", config.Validate(validPricing),
		config.OnEvent(func(e config.Event[pricing]) { events <- e }), config.ReportTo[pricing](s, "shop-1"))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if p := b.Load(); p.Discount != 0.1 || b.Revision() != r1 {
		t.Fatalf("first value %+v at %d", p, b.Revision())
	}
	next := func() config.Event[pricing] {
		t.Helper()
		select {
		case e := <-events:
			return e
		case <-ctx.Done():
			t.Fatal("no event")
		}
		return config.Event[pricing]{}
	}
	if e := next(); e.Err != nil || e.Revision != r1 {
		t.Fatalf("first event %+v", e)
	}
	bad := []string{`{"discount":0.9,"region":"eu"}`, `{"discount":"a lot"}`, `{"discount":0.1,"colour":"red"}`, `not json`}
	for _, v := range bad {
		rev := put(v)
		e := next()
		if e.Err == nil || e.Revision != rev || e.New != nil || e.Old.Discount != 0.1 {
			t.Fatalf("bad value %s: event %+v", v, e)
		}
		if p := b.Load(); p.Discount != 0.1 || b.Revision() != r1 {
			t.Fatalf("bad value %s was applied: %+v", v, p)
		}
	}
	testutil.Eventually(t, 30*time.Second, "the refusal to be reported", func() bool {
		reports, _, err := c.KV().Applied(ctx, "shop/pricing")
		return err == nil && len(reports) == 1 && reports[0].Label == "shop-1" && strings.Contains(reports[0].Error, "not applied")
	})
	r6 := put(`{"discount":0.2,"region":"us"}`)
	if e := next(); e.Err != nil || e.New.Region != "us" || e.Old.Region != "eu" || e.Revision != r6 {
		t.Fatalf("good value event %+v", e)
	}
	testutil.Eventually(t, 30*time.Second, "the apply to be reported", func() bool {
		reports, cur, err := c.KV().Applied(ctx, "shop/pricing")
		return err == nil && len(reports) == 1 && reports[0].Revision == r6 && reports[0].Error == "" && cur == r6
	})
	if _, _, err := c.KV().Delete(ctx, "shop/pricing"); err != nil {
		t.Fatal(err)
	}
	if e := next(); e.Err == nil || !strings.Contains(e.Err.Error(), "does not exist") || b.Load().Region != "us" {
		t.Fatalf("deletion: event %+v, value %+v", e, b.Load())
	}
}

// Readers never see a value half replaced, however fast reloads come (run
// with -race).
func TestBindNoTornReads(t *testing.T) {
	srv := testutil.StartBeacon(t)
	c := newClient(t, srv.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	type pair struct{ A, B int }
	write := func(i int) {
		v, _ := json.Marshal(pair{i, 2 * i})
		if _, err := c.KV().Put(ctx, "pair", v); err != nil {
			t.Fatal(err)
		}
	}
	write(0)
	applied := atomic.Int64{}
	b, err := config.Bind(ctx, c, "pair", config.OnEvent(func(e config.Event[pair]) {
		if e.New != nil {
			applied.Store(int64(e.New.A))
		}
	}))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var reads atomic.Int64
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				p := b.Load()
				if p.B != 2*p.A {
					t.Errorf("torn read: %+v", *p)
					return
				}
				reads.Add(1)
			}
		}()
	}
	const n = 100
	for i := 1; i <= n; i++ {
		write(i)
	}
	testutil.Eventually(t, 30*time.Second, "the last value to be applied", func() bool { return applied.Load() == n })
	close(stop)
	wg.Wait()
	if reads.Load() == 0 {
		t.Fatal("no reads")
	}
}

// With the registry down, Bind starts from the disk snapshot of the last
// good value if it is young enough, and fails (naming why) if not; a
// missing key with a Default starts at once with it.
func TestBindColdStart(t *testing.T) {
	srv := testutil.StartBeacon(t)
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c := newClient(t, srv.Addr())
	if _, err := c.KV().Put(ctx, "shop/pricing", []byte(`{"discount":0.3,"region":"eu"}`)); err != nil {
		t.Fatal(err)
	}
	b, err := config.Bind(ctx, c, "shop/pricing", config.DiskSnapshot[pricing](dir, time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	b.Close()

	down := newClient(t, testutil.FreeAddr(t)) // nothing listens there
	var fromDisk atomic.Bool
	b, err = config.Bind(ctx, down, "shop/pricing", config.DiskSnapshot[pricing](dir, time.Hour), config.ColdStart[pricing](200*time.Millisecond),
		config.OnEvent(func(e config.Event[pricing]) {
			if e.FromDisk && e.New != nil {
				fromDisk.Store(true)
			}
		}))
	if err != nil {
		t.Fatal(err)
	}
	if p := b.Load(); p.Discount != 0.3 || !fromDisk.Load() {
		t.Fatalf("cold start: %+v (from disk: %v)", p, fromDisk.Load())
	}
	b.Close()

	why := make(chan error, 4)
	short, scancel := context.WithTimeout(ctx, 3*time.Second)
	defer scancel()
	_, err = config.Bind(short, down, "shop/pricing", config.DiskSnapshot[pricing](dir, time.Nanosecond), config.ColdStart[pricing](100*time.Millisecond),
		config.OnEvent(func(e config.Event[pricing]) { why <- e.Err }))
	if err == nil {
		t.Fatal("Bind started from a snapshot older than its max age")
	}
	if e := <-why; e == nil || !strings.Contains(e.Error(), "older than the max age") {
		t.Fatalf("stale snapshot: Bind = %v, event %v", err, e)
	}

	d, err := config.Bind(ctx, c, "shop/none", config.Default(pricing{Region: "default"}))
	if err != nil || d.Load().Region != "default" {
		t.Fatalf("default: %v, %v", d, err)
	}
	d.Close()
	if _, err := config.Bind[pricing](ctx, c, "bad key"); !errors.Is(err, registry.ErrInvalid) {
		t.Fatalf("bad key: %v", err)
	}
}

package client_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/internal/wire"
	"beacon.dev/beacon/registry"
)

// Watchers receive deltas, and a watcher that applied 10,000 random
// operations as deltas (with its stream cut now and then, and a consumer
// that lags so that changes coalesce into whole snapshots) ends holding
// exactly what a full listing returns, byte for byte.
func TestDeltasConvergeOnAFullListing(t *testing.T) {
	// Writes as fast as they go: no rate limit gets in the way.
	srv := testutil.StartBeacon(t, "--write-rate=1e6", "--write-burst=1000000", "--write-rate-per-ip=1e6", "--write-burst-per-ip=1000000")
	proxy := testutil.NewProxy(t, srv.Addr())
	c := newClient(t, srv.Addr())
	viaProxy := newClient(t, proxy.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	services := []string{"orders", "payments", "stock"}
	fast := watchAndConsume(ctx, t, viaProxy)
	slow, err := c.Watch(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	slowCtx, stopSlow := context.WithCancel(ctx)
	slowDone := make(chan struct{})
	go func() { // owned: stopped below
		defer close(slowDone)
		for {
			if _, err := slow.Next(slowCtx); err != nil {
				return
			}
			time.Sleep(time.Duration(rand.IntN(20)) * time.Millisecond) // lags: changes pile up
		}
	}()
	defer func() { stopSlow(); <-slowDone }()

	const ops, writers = 10000, 4
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 42))
			for i := range ops / writers {
				if w == 0 && i%500 == 499 {
					proxy.Cut() // the fast watcher reconnects and resumes
				}
				if err := randomOperation(ctx, c, rng, services); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}

	for _, svc := range services {
		listed, err := c.Instances(ctx, svc, client.All())
		if err != nil {
			t.Fatal(err)
		}
		want := encodeSnapshot(t, listed)
		for name, w := range map[string]*client.Watcher{"fast": fast, "slow": slow} {
			testutil.Eventually(t, time.Minute, fmt.Sprintf("the %s watcher holds %s at revision %d", name, svc, listed.Revision), func() bool {
				s, ok := w.Snapshot(svc)
				return ok && s.Revision >= listed.Revision
			})
			held, _ := w.Snapshot(svc)
			if got := encodeSnapshot(t, held); !bytes.Equal(got, want) {
				t.Errorf("the %s watcher's %s differs from a full listing:\n got %v\nwant %v", name, svc, held.Instances, listed.Instances)
			}
		}
	}
	for name, w := range map[string]*client.Watcher{"fast": fast, "slow": slow} {
		st := w.Status()
		t.Logf("%s watcher: %d deltas, %d reconnects, %d stale", name, st.Deltas, st.Reconnects, st.Stale)
		if st.Deltas < ops/10 || st.Stale != 0 {
			t.Errorf("the %s watcher received %d deltas and %d stale snapshots; want most changes as deltas and none stale", name, st.Deltas, st.Stale)
		}
	}
	if st := fast.Status(); st.Reconnects < 5 {
		t.Errorf("the fast watcher reconnected %d times; the cuts should have made it reconnect", st.Reconnects)
	}
}

// randomOperation registers, re-registers with other fields, deregisters
// or changes the status of a random instance, or changes a service's
// protection threshold.
func randomOperation(ctx context.Context, c *client.Client, rng *rand.Rand, services []string) error {
	svc := services[rng.IntN(len(services))]
	id := fmt.Sprintf("i-%02d", rng.IntN(30))
	switch p := rng.IntN(100); {
	case p < 55:
		in := registry.Instance{Service: svc, ID: id, Address: "127.0.0.1", Port: 1 + rng.IntN(60000), Weight: 1 + rng.IntN(200)}
		if rng.IntN(2) == 0 {
			in.Tags = []string{fmt.Sprintf("v%d", rng.IntN(3))}
			in.Metadata = map[string]string{"zone": fmt.Sprintf("z%d", rng.IntN(3))}
		}
		_, err := c.Register(ctx, in)
		return err
	case p < 80:
		_, err := c.Deregister(ctx, svc, id)
		return err
	case p < 95:
		status := []registry.Status{registry.StatusUp, registry.StatusDraining, registry.StatusOutOfService}[rng.IntN(3)]
		_, err := c.SetStatus(ctx, svc, id, status)
		if errors.Is(err, client.ErrNotFound) {
			return nil
		}
		return err
	default:
		_, err := c.SetProtectionThreshold(ctx, svc, float64(rng.IntN(5))/10)
		return err
	}
}

// encodeSnapshot is a snapshot's deterministic wire encoding.
func encodeSnapshot(t *testing.T, s *registry.Snapshot) []byte {
	t.Helper()
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(wire.SnapshotToProto(s))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

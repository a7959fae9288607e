package client_test

import (
	"context"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
)

func instance(ctx context.Context, t *testing.T, c *client.Client, service, id string) *registry.Instance {
	t.Helper()
	snap, err := c.Instances(ctx, service, client.All())
	if err != nil {
		t.Fatalf("Instances(%s): %v", service, err)
	}
	for _, in := range snap.Instances {
		if in.ID == id {
			return in
		}
	}
	return nil
}

// `beacon register --id orders-9` on a session, then another client takes
// orders-9 over persistently: the first one's Deregister (Ctrl-C) and
// Close must leave the other's record alone.
func TestSessionLetsGoOnlyOfWhatItStillOwns(t *testing.T) {
	srv := testutil.StartBeacon(t)
	a, b := newClient(t, srv.Addr()), newClient(t, srv.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	sa, err := a.NewSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer sa.Close(ctx)
	if _, err := sa.Register(ctx, registry.Instance{Service: "orders", ID: "orders-9", Address: "127.0.0.1", Port: 9001}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Register(ctx, registry.Instance{Service: "orders", ID: "orders-9", Address: "127.0.0.1", Port: 9002}); err != nil {
		t.Fatal(err)
	}
	if found, err := sa.Deregister(ctx, "orders", "orders-9"); err != nil || found {
		t.Errorf("session A: Deregister(orders-9) = %v, %v; want false (B holds it now), nil", found, err)
	}
	if in := instance(ctx, t, b, "orders", "orders-9"); in == nil || in.Port != 9002 || in.SessionID != 0 {
		t.Fatalf("after A's Deregister: orders-9 = %+v, want B's persistent record", in)
	}
	if err := sa.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if in := instance(ctx, t, b, "orders", "orders-9"); in == nil || in.Port != 9002 {
		t.Errorf("after A's Close: orders-9 = %+v, want B's persistent record", in)
	}

	// The same with B on a session of its own, and A closing without
	// deregistering first.
	sa2, err := a.NewSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer sa2.Close(ctx)
	if _, err := sa2.Register(ctx, registry.Instance{Service: "orders", ID: "orders-8", Address: "127.0.0.1", Port: 9003}); err != nil {
		t.Fatal(err)
	}
	sb, err := b.NewSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer sb.Close(ctx)
	if _, err := sb.Register(ctx, registry.Instance{Service: "orders", ID: "orders-8", Address: "127.0.0.1", Port: 9004}); err != nil {
		t.Fatal(err)
	}
	if err := sa2.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if in := instance(ctx, t, b, "orders", "orders-8"); in == nil || in.Port != 9004 || in.SessionID != sb.ID() {
		t.Errorf("after A's Close: orders-8 = %+v, want B's record on session %x", in, sb.ID())
	}
	// What a session still owns, it deregisters.
	if found, err := sb.Deregister(ctx, "orders", "orders-8"); err != nil || !found {
		t.Errorf("session B: Deregister(orders-8) = %v, %v; want true, nil", found, err)
	}
	if in := instance(ctx, t, b, "orders", "orders-8"); in != nil {
		t.Errorf("after B's Deregister: orders-8 = %+v, want gone", in)
	}
}

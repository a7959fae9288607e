package saga

import (
	"context"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
)

// A write by an orchestrator that lost its shard's lead (paused past its
// session, say, and not yet aware of it) is refused by the store, and
// the saga keeps the newer leader's state.
func TestAWriteByAFormerLeaderIsFenced(t *testing.T) {
	srv := testutil.StartBeacon(t, "--lock-delay=-1s")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	def := Definition{Name: "order", Steps: []Step{{Name: "a", Action: func(context.Context, Run) ([]byte, error) { return nil, nil }}}}
	orch := func() (*Orchestrator, *client.Session, *client.Held) {
		s, err := c.NewSession(ctx, client.WithTTL(3*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		o, err := New(Config{Client: c, Session: s, Shards: 1}, def)
		if err != nil {
			t.Fatal(err)
		}
		h, err := c.Election(s, o.shardName(0)).Campaign(ctx, nil)
		if err != nil {
			t.Fatal(err)
		}
		return o, s, h
	}
	a, aSess, aHeld := orch()
	st, err := a.Start(ctx, "order", "o-1", nil)
	if err != nil {
		t.Fatal(err)
	}
	stale := st.clone()
	if err := aSess.Close(ctx); err != nil { // lost, not released
		t.Fatal(err)
	}
	b, bSess, bHeld := orch()
	defer bSess.Close(ctx)
	st.Status, st.Step = Done, 1
	if ok, _ := b.persist(ctx, &st, bHeld); !ok {
		t.Fatal("the new leader could not write")
	}
	// Even at the current revision (the compare would pass), the fence
	// refuses it.
	stale.Status, stale.Step, stale.Error, stale.Revision = Compensating, 0, "the former leader's view", st.Revision
	if ok, why := a.persist(ctx, &stale, aHeld); ok || why != nil {
		t.Fatalf("the former leader's write: ok=%v, %v; want refused by the fence", ok, why)
	}
	if a.Stats().Fenced != 1 {
		t.Errorf("fenced = %d, want 1", a.Stats().Fenced)
	}
	got, err := b.Store().Get(ctx, "order", "o-1")
	if err != nil || got.Status != Done || got.Revision != st.Revision {
		t.Fatalf("state = %s at %d (%v), want the new leader's done at %d", got.Status, got.Revision, err, st.Revision)
	}
}

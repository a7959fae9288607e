package events_test

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/events"
	"beacon.dev/beacon/internal/testutil"
)

// countOnce adds one to the KV counter key for ev, once per event: a read,
// then the increment and the event's mark in one transaction, retried
// when the counter moved meanwhile.
func countOnce(ctx context.Context, kv *client.KV, d *events.KVDedup, key string, ev *events.Event) (duplicate bool, err error) {
	for {
		cur, err := kv.Get(ctx, key)
		n, rev := 0, int64(0)
		switch {
		case errors.Is(err, client.ErrNotFound):
		case err != nil:
			return false, err
		default:
			n, _ = strconv.Atoi(string(cur.Value))
			rev = cur.ModRevision
		}
		dup, err := d.Apply(ctx, ev, client.OpPut(key, []byte(strconv.Itoa(n+1))).IfRevision(rev))
		if errors.Is(err, client.ErrCompareFailed) {
			continue // the counter moved: read it again
		}
		return dup, err
	}
}

func newKV(t testing.TB, addr string) *client.Client {
	t.Helper()
	c, err := client.New([]string{addr})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// Each event counts once however often it is applied, from one process or
// several at once; events without an id are told apart by offset, and the
// same id at another offset (a republished event) is a duplicate.
func TestKVDedupAppliesEachEventOnce(t *testing.T) {
	srv := testutil.StartBeacon(t)
	a, b := newKV(t, srv.Addr()), newKV(t, srv.Addr())
	da, err := events.NewKVDedup(a.KV(), "dedup/g/", 0)
	if err != nil {
		t.Fatal(err)
	}
	db, err := events.NewKVDedup(b.KV(), "dedup/g/", 0)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const n = 60
	evs := make([]*events.Event, n)
	for i := range evs {
		evs[i] = &events.Event{Topic: "t", Partition: int32(i % 2), Offset: int64(i / 2), ID: "e" + strconv.Itoa(i)}
	}
	evs[7].ID, evs[9].ID = "", "" // counted by offset
	// Every event applied four times: twice through each of two clients,
	// all at once.
	var wg sync.WaitGroup
	for _, d := range []*events.KVDedup{da, db, da, db} {
		wg.Go(func() {
			for _, ev := range evs {
				if _, err := countOnce(ctx, a.KV(), d, "count/"+strconv.Itoa(int(ev.Partition)), ev); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	total := 0
	for p := range 2 {
		kv, err := a.KV().Get(ctx, "count/"+strconv.Itoa(p))
		if err != nil {
			t.Fatal(err)
		}
		c, _ := strconv.Atoi(string(kv.Value))
		total += c
	}
	if total != n {
		t.Errorf("counted %d, want %d: each event once", total, n)
	}
	// A republished event: same id, another offset.
	again := *evs[3]
	again.Offset += 1000
	if dup, err := countOnce(ctx, a.KV(), da, "count/1", &again); err != nil || !dup {
		t.Errorf("republished event: duplicate = %v, %v; want true", dup, err)
	}
	// A caller's own failing compare is the caller's error, not a retry.
	fresh := &events.Event{Topic: "t", Partition: 0, Offset: 5000, ID: "fresh"}
	if _, err := da.Apply(ctx, fresh, client.OpCheck("count/0", 1)); !errors.Is(err, client.ErrCompareFailed) {
		t.Errorf("Apply with a failing check = %v, want ErrCompareFailed", err)
	}
	if dup, err := da.Apply(ctx, fresh); err != nil || dup {
		t.Errorf("the event after its failed apply: duplicate = %v, %v; want applied now", dup, err)
	}
}

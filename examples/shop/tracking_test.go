package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"beacon.dev/beacon/internal/testutil"
)

// The seeds' behaviour tracking with real processes: the gateway
// publishes views and add-to-carts to Kafka (kfake), two tracking
// instances consume them in one group; one is SIGKILLed halfway and a new
// one joins. Every user's and every item's counts end exactly equal to
// what was sent — nothing lost, a redelivery applied once — and the read
// API and the consumers' lag say so.
func TestTrackingCountsEveryEventOnceThroughAKill(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	cl := newCluster(ctx, t)
	if err := cl.StartBroker(ctx); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if _, err := cl.Start(ctx, "tracking", "--ttl", "2s"); err != nil {
			t.Fatal(err)
		}
	}
	gw, err := cl.Start(ctx, "gateway", "--listen", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	base := "http://" + gw.Addr
	const users, perHalf = 20, 600
	type key struct{ user, item string }
	var mu sync.Mutex
	sentViews, sentCarts := map[key]int64{}, map[key]int64{}
	send := func(from, to int) {
		var wg sync.WaitGroup
		work := make(chan int)
		for range 8 {
			wg.Go(func() {
				for i := range work {
					user, item := fmt.Sprintf("u-%d", i%users), items[i%len(items)]
					var req *http.Request
					cart := i%3 == 0
					if cart {
						body, _ := json.Marshal(map[string]any{"user": user, "item": item, "quantity": 1})
						req, _ = http.NewRequestWithContext(ctx, http.MethodPost, base+"/cart", bytes.NewReader(body))
					} else {
						req, _ = http.NewRequestWithContext(ctx, http.MethodGet, base+"/items/"+item+"?user="+user, nil)
					}
					resp, err := http.DefaultClient.Do(req)
					if err != nil {
						t.Error(err)
						continue
					}
					resp.Body.Close()
					if resp.StatusCode/100 != 2 || resp.Header.Get("Beacon-Tracked") != "true" {
						t.Errorf("event %d: %s, tracked %q", i, resp.Status, resp.Header.Get("Beacon-Tracked"))
						continue
					}
					mu.Lock()
					if cart {
						sentCarts[key{user, item}]++
					} else {
						sentViews[key{user, item}]++
					}
					mu.Unlock()
				}
			})
		}
		for i := from; i < to; i++ {
			work <- i
		}
		close(work)
		wg.Wait()
	}
	stats := func(addr string) (handled, lag, dupes int64, ok bool) {
		resp, err := http.Get("http://" + addr + "/stats")
		if err != nil {
			return 0, 0, 0, false
		}
		defer resp.Body.Close()
		var st struct{ Handled, Lag, Duplicates int64 }
		if json.NewDecoder(resp.Body).Decode(&st) != nil {
			return 0, 0, 0, false
		}
		return st.Handled, st.Lag, st.Duplicates, true
	}
	send(0, perHalf)
	// Kill a member while it has handled some of its events.
	victim := cl.Running("tracking")[0]
	testutil.Eventually(t, time.Minute, "the first member to handle events", func() bool {
		h, _, _, ok := stats(victim.Addr)
		return ok && h > 0
	})
	victim.Kill()
	if _, err := cl.Start(ctx, "tracking", "--ttl", "2s"); err != nil {
		t.Fatal(err)
	}
	send(perHalf, 2*perHalf)
	if t.Failed() {
		return
	}
	get := func(path string) (counts, bool) {
		resp, err := http.Get("http://" + cl.Running("tracking")[0].Addr + path)
		if err != nil {
			return counts{}, false
		}
		defer resp.Body.Close()
		var c counts
		return c, resp.StatusCode == http.StatusOK && json.NewDecoder(resp.Body).Decode(&c) == nil
	}
	wantUser, wantItem := map[string]counts{}, map[string]counts{}
	for k, n := range sentViews {
		u, i := wantUser[k.user], wantItem[k.item]
		u.Views, i.Views = u.Views+n, i.Views+n
		wantUser[k.user], wantItem[k.item] = u, i
	}
	for k, n := range sentCarts {
		u, i := wantUser[k.user], wantItem[k.item]
		u.Carts, i.Carts = u.Carts+n, i.Carts+n
		wantUser[k.user], wantItem[k.item] = u, i
	}
	var last string
	testutil.Eventually(t, 3*time.Minute, "every user's and item's counts to equal what was sent", func() bool {
		for u, want := range wantUser {
			if got, ok := get("/users/" + u); !ok || got != want {
				last = fmt.Sprintf("user %s: %+v, want %+v", u, got, want)
				return false
			}
		}
		for i, want := range wantItem {
			if got, ok := get("/items/" + i); !ok || got != want {
				last = fmt.Sprintf("item %s: %+v, want %+v", i, got, want)
				return false
			}
		}
		return true
	})
	if t.Failed() {
		t.Log(last)
	}
	var dupes int64
	testutil.Eventually(t, time.Minute, "the members' lag to reach 0", func() bool {
		dupes = 0
		for _, p := range cl.Running("tracking") {
			_, lag, d, ok := stats(p.Addr)
			if !ok || lag != 0 {
				return false
			}
			dupes += d
		}
		return true
	})
	// The consumer's figures for Prometheus too.
	mresp, err := http.Get("http://" + cl.Running("tracking")[0].Addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	mbody, _ := io.ReadAll(mresp.Body)
	mresp.Body.Close()
	if !strings.Contains(string(mbody), `beacon_events_lag{group="tracking"} 0`) || !strings.Contains(string(mbody), "beacon_events_handled_total") {
		t.Errorf("tracking /metrics lacks the consumer's lag and handled events:\n%s", mbody)
	}
	// Bad input names the field and publishes nothing.
	resp, err := http.Get(base + "/items/sprocket?user=u-1")
	if err != nil {
		t.Fatal(err)
	}
	body := new(strings.Builder)
	_, _ = fmt.Fprint(body, resp.Status)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("a view of an unknown item = %s, want 400", body)
	}
	// An order for a user tracking would refuse is refused before it is
	// placed, naming the field.
	resp, err = http.Post(base+"/orders", "application/json", strings.NewReader(`{"item":"widget","quantity":1,"user":"a b"}`))
	if err != nil {
		t.Fatal(err)
	}
	msg, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(msg), "user") {
		t.Errorf("an order with a malformed user = %s %q, want 400 naming the user", resp.Status, msg)
	}
	t.Logf("%d events counted exactly across a member's SIGKILL; %d redeliveries absorbed by dedup", 2*perHalf, dupes)
}

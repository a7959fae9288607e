package discovery_test

import (
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"testing"
	"time"

	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/discovery"
	"beacon.dev/beacon/internal/testutil"
)

// watchStreams reads, from one scrape of the server's /metrics, how many
// watch streams are open and how many have ended (whatever their code).
// The server counts a stream's end before it stops counting it as open.
func watchStreams(t *testing.T, addr string) (open, ended float64) {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if m := regexp.MustCompile(`(?m)^beacon_watchers (\S+)$`).FindSubmatch(b); m != nil {
		open, _ = strconv.ParseFloat(string(m[1]), 64)
	}
	endedRE := regexp.MustCompile(`(?m)^beacon_requests_total\{[^}]*procedure="` + regexp.QuoteMeta(beaconv1connect.RegistryServiceWatchProcedure) + `"[^}]*\} (\S+)$`)
	for _, m := range endedRE.FindAllSubmatch(b, -1) {
		v, _ := strconv.ParseFloat(string(m[1]), 64)
		ended += v
	}
	return open, ended
}

// A gateway that subscribes to services one by one: each new one costs
// that service's snapshot, not a new download of every service followed;
// and a service nobody subscribes to any more leaves the cache.
func TestLazySubscriptionsCostOnlyTheNewService(t *testing.T) {
	ctx := testCtx(t)
	srv := testutil.StartBeacon(t)
	c := newClient(t, srv.Addr())
	const services = 10
	for i := range services {
		if _, err := c.Register(ctx, inst(fmt.Sprint("svc-", i), "a", 9000+i)); err != nil {
			t.Fatal(err)
		}
	}
	sent := func() float64 {
		v, _ := testutil.Metric(t, srv.Addr(), "beacon_watch_snapshots_sent_total")
		return v
	}
	cache := newCache(t, c, discovery.Config{})
	var subs []*discovery.Subscription
	for i := range services {
		before := sent()
		sub, err := cache.Subscribe(fmt.Sprint("svc-", i))
		if err != nil {
			t.Fatal(err)
		}
		subs = append(subs, sub)
		waitSet(t, cache, fmt.Sprint("svc-", i), "a")
		// Every earlier service is still there, and only the new one was
		// sent (the server counts what it wrote to watchers).
		for j := range i {
			if set, _ := cache.Endpoints(fmt.Sprint("svc-", j)); len(set.Endpoints) != 1 {
				t.Fatalf("svc-%d lost its endpoints when svc-%d was subscribed", j, i)
			}
		}
		// The server counts after writing: wait for its count to move.
		testutil.Eventually(t, 30*time.Second, "the server counts what it sent", func() bool { return sent() > before })
		if d := sent() - before; d != 1 {
			t.Errorf("subscribing svc-%d made the server send %v snapshots, want 1", i, d)
		}
	}

	// Unsubscribing the last one: it leaves the cache at once, the others
	// stay; the watch restarts without it asynchronously. The changes below
	// must come after the server has ended the stream that still carried
	// it: until then a change to it would be sent there, legitimately.
	// With only the current stream open (earlier ones all counted ended),
	// one more ended stream is that one.
	var endedBefore float64
	testutil.Eventually(t, 30*time.Second, "only the current watch stream open", func() bool {
		var open float64
		open, endedBefore = watchStreams(t, srv.Addr())
		return open == 1
	})
	subs[services-1].Close()
	testutil.Eventually(t, 30*time.Second, "the unsubscribed service is gone", func() bool {
		_, ok := cache.Endpoints(fmt.Sprint("svc-", services-1))
		return !ok && cache.Status().Services == services-1
	})
	testutil.Eventually(t, 30*time.Second, "the server ends the stream that carried the unsubscribed service", func() bool {
		_, ended := watchStreams(t, srv.Addr())
		return ended > endedBefore
	})
	before := sent()
	if _, err := c.Register(ctx, inst(fmt.Sprint("svc-", services-1), "b", 9100)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Register(ctx, inst("svc-0", "b", 9101)); err != nil {
		t.Fatal(err)
	}
	waitSet(t, cache, "svc-0", "a", "b")
	if _, ok := cache.Endpoints(fmt.Sprint("svc-", services-1)); ok {
		t.Error("a change to the unsubscribed service reached the cache")
	}
	testutil.Eventually(t, 30*time.Second, "the server counts what it sent", func() bool { return sent() > before })
	if d := sent() - before; d != 1 {
		t.Errorf("after the unsubscription, two changes made the server send %v snapshots, want only svc-0's", d)
	}
	for _, s := range subs[:services-1] {
		s.Close()
	}
}

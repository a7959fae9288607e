package server_test

import (
	"context"
	"fmt"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server"
)

func metric(t *testing.T, srv *server.Server, name string) float64 {
	t.Helper()
	v, ok := metricValue(t, srv, name)
	if !ok {
		t.Fatalf("metric %s not found", name)
	}
	return v
}

// metricValue reads one sample; ok is false when it has not been recorded.
func metricValue(t *testing.T, srv *server.Server, name string) (float64, bool) {
	t.Helper()
	return testutil.Metric(t, srv.Addr(), name)
}

func heapMB() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc >> 20
}

// Behaviour 6: one watcher that never reads does not hold back 50 live
// ones — each of them gets every change while it is frozen — and what the
// server holds for it stays bounded (one pending snapshot).
func TestStuckWatcherDoesNotDelayOthers(t *testing.T) {
	const (
		live      = 50
		instances = 100
		changes   = 300
	)
	srv := startServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// The stuck watcher: its connection goes through a proxy that stops
	// reading from the server, as a frozen client process would, so TCP
	// back-pressure stalls the server's writes to it.
	proxy := testutil.NewProxy(t, srv.Addr())
	p := new(http.Protocols)
	p.SetUnencryptedHTTP2(true)
	small := &http.Client{Transport: &http.Transport{Protocols: p, HTTP2: &http.HTTP2Config{MaxReceiveBufferPerStream: 64 << 10}}}
	defer small.CloseIdleConnections()
	stuckClient, _ := client.New([]string{proxy.Addr()}, client.WithHTTPClient(small))
	defer stuckClient.Close()
	stuck, err := stuckClient.Watch(ctx, []string{"orders"})
	if err != nil {
		t.Fatal(err)
	}
	defer stuck.Close()
	<-stuck.Synced()
	proxy.Freeze(true)

	writer, _ := client.New([]string{srv.Addr()})
	defer writer.Close()
	meta := map[string]string{}
	for i := range 8 {
		meta[fmt.Sprintf("key-%d", i)] = strings.Repeat("v", 40)
	}
	var last int64
	for i := range instances {
		last, err = writer.Register(ctx, registry.Instance{Service: "orders", ID: fmt.Sprintf("o-%03d", i), Address: "127.0.0.1", Port: 1000 + i, Metadata: meta})
		if err != nil {
			t.Fatal(err)
		}
	}

	var watchers []*client.Watcher
	for range live {
		c, _ := client.New([]string{srv.Addr()})
		defer c.Close()
		w, err := c.Watch(ctx, []string{"orders"})
		if err != nil {
			t.Fatal(err)
		}
		defer w.Close()
		watchers = append(watchers, w)
	}
	waitAll := func(rev int64) {
		var wg sync.WaitGroup
		for _, w := range watchers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					if s, ok := w.Snapshot("orders"); ok && s.Revision >= rev {
						return
					}
					if _, err := w.Next(ctx); err != nil {
						return
					}
				}
			}()
		}
		wg.Wait()
		if ctx.Err() != nil {
			t.Fatalf("live watchers did not reach revision %d", rev)
		}
	}
	waitAll(last)

	// Every change reaches every live watcher while the frozen one is owed
	// them all: counted, not timed (propagation times are
	// BenchmarkPropagation's).
	var heapBefore uint64
	for i := range changes {
		rev, err := writer.Register(ctx, registry.Instance{Service: "orders", ID: fmt.Sprintf("o-%03d", i%instances), Address: "127.0.0.1", Port: 2000 + i, Metadata: meta})
		if err != nil {
			t.Fatal(err)
		}
		waitAll(rev)
		last = rev
		if i == 0 {
			heapBefore = heapMB()
		}
	}
	if ss, ok := stuck.Snapshot("orders"); ok && len(ss.Instances) > 1 { // none at all is frozen too
		t.Fatalf("the frozen watcher received %d instances: it was not frozen", len(ss.Instances))
	}
	// The frozen watcher was owed 300 snapshots of ~45 KB; the server holds
	// at most one for it (coalescing, see package view's tests) and the
	// kernel's socket buffers hold the rest, so the heap stays flat.
	if after := heapMB(); after > heapBefore+32 {
		t.Errorf("server heap grew from %d MB to %d MB while a watcher was frozen", heapBefore, after)
	}
	if got := metric(t, srv, "beacon_watch_pending_snapshots"); got > 1 {
		t.Errorf("pending snapshots = %v, want at most 1 (the stuck watcher's one service)", got)
	}
	// The live watchers were never held back: each got the final state.
	for _, w := range watchers {
		if s, _ := w.Snapshot("orders"); s.Revision < last {
			t.Fatalf("a live watcher is at revision %d", s.Revision)
		}
	}
}

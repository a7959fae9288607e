package server_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/servertest"
)

// Finding 4: watchers that never read do not each hold a copy of their
// namespace. Each one holds at most one message (a bounded batch of shared
// snapshots); after --write-timeout without progress the server cuts it,
// counts it, and gives its place back.
func TestNonReadingWatchersHoldLittleAndAreCut(t *testing.T) {
	const (
		services = 3000
		watchers = 40
	)
	cfg := servertest.Config(t, "")
	cfg.Limits.WriteTimeout = 3 * time.Second
	cfg.Limits.WriteRate, cfg.Limits.WriteBurst = 100000, 100000
	srv := servertest.Start(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	// A namespace of about 12 MB: every watcher's initial state.
	meta := map[string]string{}
	for i := range 8 {
		meta[fmt.Sprintf("key-%d", i)] = strings.Repeat("v", 480)
	}
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < services; i += 8 {
				_, err := c.Register(ctx, registry.Instance{Service: fmt.Sprintf("svc-%04d", i), ID: "i-1", Address: "127.0.0.1", Port: 1000 + i%50000, Metadata: meta})
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	testutil.Eventually(t, time.Minute, "the view holding every service", func() bool {
		v, _ := metricValue(t, srv, "beacon_services")
		return v >= services
	})
	base := heapMB()

	// Watchers of the whole namespace whose sockets take a few KB and are
	// never read: the server's writes stall as a frozen client's would.
	small := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
		})
		return serr
	}}
	var conns []net.Conn
	defer func() {
		for _, conn := range conns {
			conn.Close()
		}
	}()
	for range watchers {
		conn, err := small.DialContext(ctx, "tcp", srv.Addr())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, conn)
		io.WriteString(conn, "GET /v1/watch?namespace=default HTTP/1.1\r\nHost: x\r\n\r\n")
	}
	// Sample the heap from here until the server has cut every watcher.
	// The first may be cut (after --write-timeout) before the last opens
	// on a busy machine: a watcher counts once open or once cut.
	peak := base
	testutil.Eventually(t, time.Minute, "every watcher open (or already cut)", func() bool {
		peak = max(peak, heapMB())
		open, _ := metricValue(t, srv, "beacon_watchers")
		cut, _ := metricValue(t, srv, "beacon_write_timeouts_total")
		return open+cut >= watchers
	})
	testutil.Eventually(t, 2*time.Minute, "every stalled watcher cut after --write-timeout", func() bool {
		peak = max(peak, heapMB())
		v, _ := metricValue(t, srv, "beacon_write_timeouts_total")
		return v >= watchers
	})
	per := float64(peak-min(peak, base)) / watchers
	t.Logf("heap %d MB with the namespace, peak %d MB with %d stalled watchers: %.2f MB each", base, peak, watchers, per)
	// A copy of the namespace would be over 12 MB each. What a watcher
	// holds is one message (256 KiB of snapshots, more in JSON) and its
	// references to the shared snapshots of each service.
	if per > 3 {
		t.Errorf("each stalled watcher holds %.2f MB of heap, want at most 3", per)
	}
	testutil.Eventually(t, time.Minute, "no watcher left", func() bool {
		v, _ := metricValue(t, srv, "beacon_watchers")
		return v == 0
	})
}

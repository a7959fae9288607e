package client_test

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
)

// muteServer accepts connections and reads them without ever answering:
// a frozen server as its clients see it (its kernel still completes
// handshakes and buffers requests).
func muteServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Go(func() { io.Copy(io.Discard, c) })
		}
	})
	return ln.Addr().String()
}

// A server that never answers is passed over: calls, sessions and watches
// work through the next one, and the error when no server answers says
// why each could not be used.
func TestMuteServerIsPassedOver(t *testing.T) {
	srv := testutil.StartBeacon(t)
	mute := muteServer(t)
	// The attempt timeout is what passes the mute server over, and every
	// call on the real server must fit in it: generous, so that a slow
	// answer under load is not mistaken for silence and sent to the mute
	// server. The watch gives a server three heartbeats of silence.
	c, err := client.New([]string{mute, srv.Addr()}, client.WithOrderedServers(), client.WithAttemptTimeout(3*time.Second), client.WithWatchHeartbeat(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	// The watcher starts on the mute server, hears nothing, moves on.
	w, err := c.Watch(ctx, []string{"orders"})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()

	sess, err := c.NewSession(ctx, client.WithTTL(10*time.Second))
	if err != nil {
		t.Fatalf("NewSession with the first server mute: %v", err)
	}
	defer sess.Close(context.Background())
	if _, err := sess.Register(ctx, registry.Instance{Service: "orders", ID: "o-1", Address: "127.0.0.1", Port: 9001}); err != nil {
		t.Fatalf("Register with the first server mute: %v", err)
	}
	select {
	case <-w.Synced():
	case <-ctx.Done():
		t.Fatalf("the watcher never left the mute server: %+v", w.Status())
	}
	snap := waitFor(ctx, t, w, "orders", 1)
	if snap.Instances[0].ID != "o-1" {
		t.Errorf("watched %v", ids(snap))
	}
	if st := w.Status(); st.Reconnects < 1 || !strings.Contains(st.LastErr.Error(), "sent nothing for 3 heartbeats") {
		t.Errorf("watch status %+v, want a reconnect after the mute server's silence", st)
	}

	// Only the mute server: the caller's deadline is all it gets.
	alone := newClient(t, mute)
	short, cancelShort := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancelShort()
	if _, err := alone.Services(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Services on a mute server alone = %v, want the caller's deadline", err)
	}
}

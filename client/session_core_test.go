package client_test

import (
	"context"
	"errors"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
)

// A session callback that registers, on a real server whose lease was
// revoked behind the session's back: no deadlock, and both the old
// instance and the callback's land on the new lease.
func TestSessionCallbackRegisters(t *testing.T) {
	srv := testutil.StartBeacon(t)
	c := newClient(t, srv.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var sess *client.Session
	ready := make(chan struct{})
	var mu sync.Mutex
	var cbErr error
	sess, err := c.NewSession(ctx, client.WithTTL(2*time.Second), client.WithEvents(func(ev client.SessionEvent) {
		<-ready
		if ev.Kind != client.SessionExpired {
			return
		}
		_, err := sess.Register(ctx, registry.Instance{Service: "orders", ID: "from-callback", Address: "127.0.0.1", Port: 9002})
		mu.Lock()
		cbErr = err
		mu.Unlock()
	}))
	if err != nil {
		t.Fatal(err)
	}
	close(ready)
	defer sess.Close(ctx)
	if _, err := sess.Register(ctx, registry.Instance{Service: "orders", ID: "a", Address: "127.0.0.1", Port: 9001}); err != nil {
		t.Fatal(err)
	}
	old := sess.ID()
	// Someone else ends the lease (as a TTL running out would).
	raw := beaconv1connect.NewRegistryServiceClient(&http.Client{Transport: testutil.H2CTransport()}, "http://"+srv.Addr(), connect.WithGRPC())
	if _, err := raw.CloseSession(ctx, connect.NewRequest(&beaconv1.CloseSessionRequest{SessionId: old})); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "both instances on the new lease", func() bool {
		snap, err := c.Instances(ctx, "orders", client.All())
		if err != nil || len(snap.Instances) != 2 {
			return false
		}
		for _, in := range snap.Instances {
			if in.SessionID == old || in.SessionID != sess.ID() {
				return false
			}
		}
		return true
	})
	mu.Lock()
	defer mu.Unlock()
	if cbErr != nil {
		t.Errorf("Register from the callback: %v", cbErr)
	}
}

// Client.Close ends what was made from it: sessions (their leases
// revoked), watchers and their goroutines.
func TestClientCloseEndsSessionsAndWatchers(t *testing.T) {
	srv := testutil.StartBeacon(t)
	observer := newClient(t, srv.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// Close revokes within its attempt timeout: a generous one, so that a
	// slow revoke under load is not cut short. The TTL is an hour, so the
	// instance leaving can only be the revoke's doing, never an expiry.
	c, err := client.New([]string{srv.Addr()}, client.WithAttemptTimeout(10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	sess, err := c.NewSession(ctx, client.WithTTL(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sess.Register(ctx, registry.Instance{Service: "orders", ID: "a", Address: "127.0.0.1", Port: 9001}); err != nil {
		t.Fatal(err)
	}
	w, err := c.Watch(ctx, []string{"orders"})
	if err != nil {
		t.Fatal(err)
	}
	<-w.Synced()

	c.Close()
	select {
	case <-sess.Done():
	default:
		t.Error("the session's Done is not closed after Client.Close")
	}
	if !errors.Is(sess.Err(), client.ErrClosed) {
		t.Errorf("session Err() = %v, want ErrClosed", sess.Err())
	}
	for { // what was pending may still be handed out, then ErrClosed
		if _, err := w.Next(ctx); err != nil {
			if !errors.Is(err, client.ErrClosed) {
				t.Errorf("watcher Next after Client.Close = %v, want ErrClosed", err)
			}
			break
		}
	}
	testutil.Eventually(t, 30*time.Second, "the instance gone: Client.Close revoked the lease", func() bool {
		snap, err := observer.Instances(ctx, "orders", client.All())
		return err == nil && len(snap.Instances) == 0
	})
	if _, err := c.NewSession(ctx); !errors.Is(err, client.ErrClosed) {
		t.Errorf("NewSession on a closed client = %v, want ErrClosed", err)
	}
	if _, err := c.Watch(ctx, nil); !errors.Is(err, client.ErrClosed) {
		t.Errorf("Watch on a closed client = %v, want ErrClosed", err)
	}
	observer.Close()
	// No heartbeat, watch, keepalive or connection goroutine of a client
	// is left. (The server's own goroutines stay: goleak.VerifyNone would
	// count them.)
	var left string
	defer func() {
		if t.Failed() {
			t.Log(left)
		}
	}()
	testutil.Eventually(t, 30*time.Second, "no client goroutine left", func() bool {
		left = clientGoroutines()
		return left == ""
	})
}

// clientGoroutines returns the stacks of the goroutines that run SDK code
// or an HTTP/2 client connection.
func clientGoroutines() string {
	buf := make([]byte, 1<<22)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "beacon.dev/beacon/client.") || strings.Contains(g, "beacon.dev/beacon/session.") ||
			strings.Contains(g, "golang.org/x/net/http2.(*ClientConn)") {
			out = append(out, g)
		}
	}
	return strings.Join(out, "\n\n")
}

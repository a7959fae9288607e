package server_test

import (
	"context"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/server/servertest"
)

// Close must not wait for long-lived client streams (keepalives, watches)
// to end on their own: they are open for as long as the client lives.
func TestCloseDoesNotWaitForClientStreams(t *testing.T) {
	cfg := servertest.Config(t, "")
	cfg.ShutdownTimeout = time.Minute // a handler that ignores shutdown would hold Close this long
	srv, err := servertest.StartErr(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, _ := client.New([]string{srv.Addr()})
	defer c.Close()
	sess, err := c.NewSession(ctx, client.WithTTL(3*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	w, _ := c.Watch(ctx, nil)
	defer w.Close()
	<-w.Synced()
	testutil.Eventually(t, 20*time.Second, "a heartbeat on the stream", func() bool {
		v, _ := metricValue(t, srv, `beacon_session_keepalives_total{result="ok"}`)
		return v >= 1
	})
	start := time.Now()
	srv.Close()
	if d := time.Since(start); d > 15*time.Second {
		t.Errorf("Close took %s with a keepalive stream and a watch open, want it not to wait for them", d)
	}
	sess.Close(ctx) // the server is gone: this only stops the keepalives
}

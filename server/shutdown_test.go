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
	// A handler that ignores shutdown would hold Close this long: longer
	// than the test waits for it below.
	cfg.ShutdownTimeout = 10 * time.Minute
	srv, err := servertest.StartErr(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
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
	testutil.Eventually(t, time.Minute, "a heartbeat on the stream", func() bool {
		v, _ := metricValue(t, srv, `beacon_session_keepalives_total{result="ok"}`)
		return v >= 1
	})
	done := make(chan struct{})
	go func() {
		srv.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(2 * time.Minute):
		t.Fatal("Close did not return within 2 minutes with a keepalive stream and a watch open: it waits for them")
	}
	sess.Close(ctx) // the server is gone: this only stops the keepalives
}

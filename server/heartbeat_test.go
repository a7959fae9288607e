package server_test

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/internal/testutil"
)

// A watch stream that asked for heartbeats hears from the server while
// nothing changes; a heartbeat out of bounds is refused naming the field.
func TestWatchHeartbeat(t *testing.T) {
	srv := startServer(t)
	cl := beaconv1connect.NewRegistryServiceClient(&http.Client{Transport: testutil.H2CTransport()}, "http://"+srv.Addr(), connect.WithGRPC())
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	st, err := cl.Watch(ctx, connect.NewRequest(&beaconv1.WatchRequest{Services: []string{"quiet"}, Heartbeat: durationpb.New(100 * time.Millisecond)}))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	// The first message says the (empty) view is synced; then heartbeats,
	// each without snapshots, while the service stays quiet.
	heartbeats := 0
	for heartbeats < 3 && st.Receive() {
		if m := st.Msg(); len(m.GetSnapshots()) == 0 && !m.GetSynced() {
			heartbeats++
		}
	}
	if heartbeats < 3 {
		t.Fatalf("stream ended after %d heartbeats: %v", heartbeats, st.Err())
	}

	for _, d := range []time.Duration{time.Millisecond, 2 * time.Minute} {
		bad, err := cl.Watch(ctx, connect.NewRequest(&beaconv1.WatchRequest{Heartbeat: durationpb.New(d)}))
		if err == nil {
			bad.Receive()
			err = bad.Err()
			bad.Close()
		}
		if connect.CodeOf(err) != connect.CodeInvalidArgument || !strings.Contains(err.Error(), "heartbeat") {
			t.Errorf("heartbeat %v: %v, want invalid_argument naming heartbeat", d, err)
		}
	}
}

package server_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"connectrpc.com/connect"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/internal/testutil"
)

// A TTL check's updates sent back to back, each answered before the next,
// end in the last one sent: a transition is judged against the stored
// record, not the server's view, which may not have the previous update
// yet (PASSING then CRITICAL at once used to leave the instance PASSING).
func TestBackToBackCheckUpdatesEndInTheLastOne(t *testing.T) {
	srv := startServer(t)
	rc := regClient(srv, "", connect.WithGRPC())
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, err := rc.Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{Instance: &beaconv1.Instance{
		Service: "web", Id: "w1", Address: "10.0.0.1", Port: 80,
		Checks: []*beaconv1.Check{{Name: "ttl", Kind: beaconv1.CheckKind_CHECK_KIND_TTL}}}})); err != nil {
		t.Fatal(err)
	}
	var last beaconv1.Health
	for i := range 40 {
		last = []beaconv1.Health{beaconv1.Health_HEALTH_PASSING, beaconv1.Health_HEALTH_CRITICAL}[i%2]
		if _, err := rc.UpdateCheck(ctx, connect.NewRequest(&beaconv1.UpdateCheckRequest{Service: "web", Id: "w1", Status: last, Output: fmt.Sprint("update ", i)})); err != nil {
			t.Fatal(err)
		}
	}
	testutil.Eventually(t, time.Minute, "the instance's check at the last update", func() bool {
		resp, err := rc.ListInstances(ctx, connect.NewRequest(&beaconv1.ListInstancesRequest{Service: "web", All: true}))
		if err != nil || len(resp.Msg.GetInstances()) != 1 {
			return false
		}
		c := resp.Msg.GetInstances()[0].GetChecks()[0]
		return c.GetStatus() == last && c.GetOutput() == "update 39"
	})
}

package server_test

import (
	"context"
	"net/http"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/server/servertest"
)

// Session ids are random, so a client cannot reach another's session by
// counting from its own: before, two sessions granted in a row differed
// by 4, and any client could close the neighbours.
func TestSessionIDsCannotBeGuessedFromOnesOwn(t *testing.T) {
	srv := servertest.Start(t, servertest.Config(t, ""))
	rpc := beaconv1connect.NewRegistryServiceClient(&http.Client{Transport: testutil.H2CTransport()}, "http://"+srv.Addr(), connect.WithGRPC())
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	open := func() int64 {
		t.Helper()
		resp, err := rpc.CreateSession(ctx, connect.NewRequest(&beaconv1.CreateSessionRequest{Ttl: durationpb.New(time.Minute)}))
		if err != nil {
			t.Fatal(err)
		}
		return resp.Msg.GetSessionId()
	}
	victim := open()
	if _, err := rpc.Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{SessionId: victim,
		Instance: &beaconv1.Instance{Service: "pay", Id: "p-1", Address: "127.0.0.1", Port: 9000}})); err != nil {
		t.Fatal(err)
	}
	attacker := open()
	if d := attacker - victim; d > -1<<32 && d < 1<<32 {
		t.Errorf("two sessions in a row: %d and %d, %d apart: guessable", victim, attacker, d)
	}
	// The attacker closes every id near its own (closing is idempotent:
	// an unknown id is not an error); none is the victim's.
	for d := int64(-64); d <= 64; d++ {
		if id := attacker + d; d != 0 && id > 0 {
			_, _ = rpc.CloseSession(ctx, connect.NewRequest(&beaconv1.CloseSessionRequest{SessionId: id}))
		}
	}
	if _, err := rpc.KeepAlive(ctx, connect.NewRequest(&beaconv1.KeepAliveRequest{SessionId: victim})); err != nil {
		t.Errorf("the victim's session after the attack: %v", err)
	}
	resp, err := rpc.ListInstances(ctx, connect.NewRequest(&beaconv1.ListInstancesRequest{Service: "pay"}))
	if err != nil || len(resp.Msg.GetInstances()) != 1 || resp.Msg.GetInstances()[0].GetSessionId() != victim {
		t.Errorf("the victim's instance after the attack: %v, %v", resp.Msg.GetInstances(), err)
	}
	seen := map[int64]bool{victim: true, attacker: true}
	for range 20 {
		id := open()
		if id <= 0 || seen[id] {
			t.Fatalf("session id %d: not positive or repeated", id)
		}
		seen[id] = true
	}
}

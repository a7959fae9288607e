package client_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
)

// The ACL client sends the client's token, its errors carry both the
// package's sentinel and the API's code, and it fails over — but never
// repeats a call that must happen once.
func TestACLClient(t *testing.T) {
	srv := testutil.StartBeacon(t, "--acl")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	// The first server refuses connections: even Bootstrap moves on, as
	// its request never left.
	anon := newClient(t, testutil.FreeAddr(t), srv.Addr())
	boot, err := anon.ACL().Bootstrap(ctx, connect.NewRequest(&beaconv1.BootstrapRequest{}))
	if err != nil {
		t.Fatalf("Bootstrap() with the first server down = %v", err)
	}
	secret := boot.Msg.GetToken().GetSecretId()
	_, err = anon.ACL().Bootstrap(ctx, connect.NewRequest(&beaconv1.BootstrapRequest{}))
	if connect.CodeOf(err) != connect.CodeFailedPrecondition || !strings.HasPrefix(err.Error(), "beacon: acl: already bootstrapped") {
		t.Errorf("second Bootstrap() = %v, want FailedPrecondition saying it is bootstrapped", err)
	}
	_, err = anon.ACL().ListTokens(ctx, connect.NewRequest(&beaconv1.ListTokensRequest{}))
	if !errors.Is(err, client.ErrPermissionDenied) || connect.CodeOf(err) != connect.CodePermissionDenied ||
		!strings.Contains(err.Error(), "needs acl:read") || strings.Count(err.Error(), "permission denied") != 1 {
		t.Errorf("ListTokens() without a token = %v, want ErrPermissionDenied naming acl:read, once", err)
	}

	mgmt, err := client.New([]string{srv.Addr()}, client.WithToken(secret))
	if err != nil {
		t.Fatal(err)
	}
	defer mgmt.Close()
	who, err := mgmt.ACL().WhoAmI(ctx, connect.NewRequest(&beaconv1.WhoAmIRequest{}))
	if err != nil || who.Msg.GetToken().GetAccessorId() != boot.Msg.GetToken().GetAccessorId() {
		t.Fatalf("WhoAmI() with the management token = %v, %v", who, err)
	}
	if _, err := mgmt.ACL().ReadPolicy(ctx, connect.NewRequest(&beaconv1.ReadPolicyRequest{Name: "nope"})); !errors.Is(err, client.ErrNotFound) || connect.CodeOf(err) != connect.CodeNotFound {
		t.Errorf("ReadPolicy(nope) = %v, want ErrNotFound", err)
	}
	bad := &beaconv1.AclPolicy{Name: "bad", Rules: "write everything"}
	if _, err := mgmt.ACL().PutPolicy(ctx, connect.NewRequest(&beaconv1.PutPolicyRequest{Policy: bad})); !errors.Is(err, registry.ErrInvalid) {
		t.Errorf("PutPolicy(bad rules) = %v, want ErrInvalid", err)
	}
	forged, err := client.New([]string{srv.Addr()}, client.WithToken(secret[:len(secret)-4]+"AAAA"))
	if err != nil {
		t.Fatal(err)
	}
	defer forged.Close()
	if _, err := forged.ACL().WhoAmI(ctx, connect.NewRequest(&beaconv1.WhoAmIRequest{})); !errors.Is(err, client.ErrUnauthenticated) {
		t.Errorf("WhoAmI() with a forged token = %v, want ErrUnauthenticated", err)
	}

	// The first server takes requests and never answers: CreateToken
	// waits there for the caller's deadline rather than risk making the
	// token twice; a read moves on after the attempt timeout.
	mc, err := client.New([]string{muteServer(t), srv.Addr()}, client.WithOrderedServers(), client.WithToken(secret), client.WithAttemptTimeout(3*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer mc.Close()
	short, cancelShort := context.WithTimeout(ctx, 500*time.Millisecond)
	_, err = mc.ACL().CreateToken(short, connect.NewRequest(&beaconv1.CreateTokenRequest{Token: &beaconv1.AclToken{Description: "once"}}))
	cancelShort()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("CreateToken() with the first server mute = %v, want the caller's deadline", err)
	}
	list, err := mc.ACL().ListTokens(ctx, connect.NewRequest(&beaconv1.ListTokensRequest{}))
	if err != nil {
		t.Fatalf("ListTokens() with the first server mute = %v", err)
	}
	for _, tok := range list.Msg.GetTokens() {
		if tok.GetDescription() == "once" {
			t.Errorf("the CreateToken cut short by its deadline was made on another server: %v", tok)
		}
	}
}

// A token that cannot be a secret is refused before any call: sent, the
// HTTP client would refuse the header and the error would read as if no
// server answered.
func TestTokenIsChecked(t *testing.T) {
	for _, tok := range []string{"bct_abc\nKeep the secret safe", "bct_abc def", "bct_abc\x00"} {
		if c, err := client.New([]string{"127.0.0.1:1"}, client.WithToken(tok)); err == nil || !strings.Contains(err.Error(), "invalid token") {
			if c != nil {
				c.Close()
			}
			t.Errorf("New(WithToken(%q)) = %v, want the token refused", tok, err)
		}
	}
}

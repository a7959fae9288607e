package client_test

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
)

// aclTokens bootstraps a server started with --acl and makes a token with
// a service identity for each service named.
func aclTokens(t *testing.T, addr string, services ...string) (mgmt string, tokens map[string]string) {
	t.Helper()
	ctx := context.Background()
	acls := beaconv1connect.NewAclServiceClient(&http.Client{Transport: testutil.H2CTransport()}, "http://"+addr, connect.WithGRPC())
	boot, err := acls.Bootstrap(ctx, connect.NewRequest(&beaconv1.BootstrapRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	mgmt = boot.Msg.GetToken().GetSecretId()
	tokens = map[string]string{}
	for _, svc := range services {
		req := connect.NewRequest(&beaconv1.CreateTokenRequest{Token: &beaconv1.AclToken{ServiceIdentities: []*beaconv1.AclServiceIdentity{{Service: svc}}}})
		req.Header().Set("Authorization", "Bearer "+mgmt)
		resp, err := acls.CreateToken(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		tokens[svc] = resp.Msg.GetToken().GetSecretId()
	}
	return mgmt, tokens
}

// With ACLs, an SDK session registers with its session-bound credential
// by itself; a second process holding the same service's token cannot
// deregister, re-point or mark out of service the first one's instance.
func TestSessionsUnderACLs(t *testing.T) {
	nd := testutil.StartBeacon(t, "--acl")
	_, tokens := aclTokens(t, nd.Addr(), "web")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	newClient := func(opts ...client.Option) *client.Client {
		c, err := client.New([]string{nd.Addr()}, opts...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	a := newClient(client.WithToken(tokens["web"]))
	sa, err := a.NewSession(ctx, client.WithTTL(5*time.Second))
	if err != nil {
		t.Fatalf("NewSession(service identity) = %v", err)
	}
	defer sa.Close(context.Background())
	if _, err := sa.Register(ctx, registry.Instance{Service: "web", ID: "a", Address: "10.0.0.1", Port: 80}); err != nil {
		t.Fatalf("Register(own service) = %v", err)
	}
	if _, err := sa.Register(ctx, registry.Instance{Service: "db", ID: "a", Address: "10.0.0.1", Port: 80}); !errors.Is(err, client.ErrPermissionDenied) {
		t.Errorf("Register(another service) = %v, want ErrPermissionDenied", err)
	}

	// The owner changes its own instance through the client: the client
	// uses the owning session's credential by itself.
	if _, err := a.SetStatus(ctx, "web", "a", registry.StatusUp); err != nil {
		t.Errorf("SetStatus(own session's instance) = %v", err)
	}

	// The attacker holds the same token in another process.
	b := newClient(client.WithToken(tokens["web"]))
	sb, err := b.NewSession(ctx, client.WithTTL(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer sb.Close(context.Background())
	// A takeover waits for the holder to end, even at the same address:
	// nothing tells a restarted process from a sibling with the token.
	for _, addr := range []string{"10.6.6.6", "10.0.0.1"} {
		short, cancelShort := context.WithTimeout(ctx, time.Second)
		_, err := sb.Register(short, registry.Instance{Service: "web", ID: "a", Address: addr, Port: 80})
		cancelShort()
		if err == nil || !strings.Contains(err.Error(), "held by another live session") {
			t.Errorf("hijack: Register(a at %s, another session) = %v, want it held until a's session ends", addr, err)
		}
	}
	if found, err := b.Deregister(ctx, "web", "a"); err != nil || found {
		t.Errorf("Deregister(a) by another process = %v, %v, want not found: a token deletes only persistent instances", found, err)
	}
	if _, err := b.SetStatus(ctx, "web", "a", registry.StatusOutOfService); !errors.Is(err, client.ErrPermissionDenied) {
		t.Errorf("SetStatus(a) by another process = %v, want ErrPermissionDenied", err)
	}
	snap, err := b.Instances(ctx, "web")
	if err != nil || len(snap.Instances) != 1 || snap.Instances[0].Address != "10.0.0.1" || snap.Instances[0].SessionID != 0 {
		t.Errorf("Instances(web) = %+v, %v, want a at 10.0.0.1 with its session id hidden", snap, err)
	}

	// Without a token the anonymous token reads nothing: filtered, not failed.
	anon := newClient()
	if snap, err := anon.Instances(ctx, "web"); err != nil || len(snap.Instances) != 0 {
		t.Errorf("Instances(no token) = %+v, %v, want empty", snap, err)
	}
	if _, err := anon.NewSession(ctx); !errors.Is(err, client.ErrPermissionDenied) {
		t.Errorf("NewSession(no token) = %v, want ErrPermissionDenied", err)
	}
	bad := newClient(client.WithToken("bct_not-a-token"))
	if _, err := bad.Instances(ctx, "web"); !errors.Is(err, client.ErrUnauthenticated) {
		t.Errorf("Instances(bad token) = %v, want ErrUnauthenticated", err)
	}

	// The session renews itself (over the shared stream, with its
	// token), and closing it removes its instance.
	if err := sa.Close(ctx); err != nil {
		t.Fatalf("Close() = %v", err)
	}
	testutil.Eventually(t, 30*time.Second, "the closed session's instance to go", func() bool {
		snap, err := b.Instances(ctx, "web")
		return err == nil && len(snap.Instances) == 0
	})
}

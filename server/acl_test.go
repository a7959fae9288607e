package server_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	mdns "github.com/miekg/dns"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/server"
	"beacon.dev/beacon/server/audit"
	"beacon.dev/beacon/server/servertest"
)

// aclServer starts a server with ACLs on and bootstraps it; it returns the
// server and the management token's secret.
func aclServer(t *testing.T, edit ...func(*server.Config)) (*server.Server, *server.Config, string) {
	t.Helper()
	cfg := servertest.Config(t, "")
	cfg.ACL = true
	for _, e := range edit {
		e(cfg)
	}
	srv := servertest.Start(t, cfg)
	resp, err := aclClient(srv, "", connect.WithGRPC()).Bootstrap(context.Background(), connect.NewRequest(&beaconv1.BootstrapRequest{}))
	if err != nil {
		t.Fatalf("Bootstrap() = %v", err)
	}
	return srv, cfg, resp.Msg.GetToken().GetSecretId()
}

// bearer sets the token on every call of a client.
type bearer string

func (b bearer) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if b != "" {
			req.Header().Set("Authorization", "Bearer "+string(b))
		}
		return next(ctx, req)
	}
}

func (b bearer) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, spec)
		if b != "" {
			conn.RequestHeader().Set("Authorization", "Bearer "+string(b))
		}
		return conn
	}
}

func (bearer) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

func h2c() *http.Client { return &http.Client{Transport: testutil.H2CTransport()} }

func aclClient(srv *server.Server, secret string, opts ...connect.ClientOption) beaconv1connect.AclServiceClient {
	return beaconv1connect.NewAclServiceClient(h2c(), "http://"+srv.Addr(), append(opts, connect.WithInterceptors(bearer(secret)))...)
}

func regClient(srv *server.Server, secret string, opts ...connect.ClientOption) beaconv1connect.RegistryServiceClient {
	return beaconv1connect.NewRegistryServiceClient(h2c(), "http://"+srv.Addr(), append(opts, connect.WithInterceptors(bearer(secret)))...)
}

func mustToken(t *testing.T, srv *server.Server, mgmt string, tok *beaconv1.AclToken) string {
	t.Helper()
	resp, err := aclClient(srv, mgmt, connect.WithGRPC()).CreateToken(context.Background(), connect.NewRequest(&beaconv1.CreateTokenRequest{Token: tok}))
	if err != nil {
		t.Fatalf("CreateToken(%v) = %v", tok, err)
	}
	return resp.Msg.GetToken().GetSecretId()
}

func mustPolicy(t *testing.T, srv *server.Server, mgmt, name, rules string) {
	t.Helper()
	if _, err := aclClient(srv, mgmt, connect.WithGRPC()).PutPolicy(context.Background(), connect.NewRequest(&beaconv1.PutPolicyRequest{Policy: &beaconv1.AclPolicy{Name: name, Rules: rules}})); err != nil {
		t.Fatalf("PutPolicy(%s) = %v", name, err)
	}
}

func ttlInstance(svc, id, addr string, session int64) *beaconv1.Instance {
	return &beaconv1.Instance{Service: svc, Id: id, Address: addr, Port: 8080, SessionId: session,
		Checks: []*beaconv1.Check{{Kind: beaconv1.CheckKind_CHECK_KIND_TTL, Interval: durationpb.New(time.Minute)}}}
}

// TestACLBootstrapAndBreakGlass: the first bootstrap prints a management
// token, a second one is refused; the break-glass key in the data dir
// makes another management token at any time, once per key.
func TestACLBootstrapAndBreakGlass(t *testing.T) {
	srv, cfg, mgmt := aclServer(t)
	ctx := context.Background()
	ac := aclClient(srv, "", connect.WithGRPC())
	if _, err := ac.Bootstrap(ctx, connect.NewRequest(&beaconv1.BootstrapRequest{})); connect.CodeOf(err) != connect.CodeFailedPrecondition || !strings.Contains(err.Error(), "break-glass") {
		t.Errorf("second Bootstrap() = %v, want FailedPrecondition pointing to the break-glass reset", err)
	}
	who, err := aclClient(srv, mgmt, connect.WithGRPC()).WhoAmI(ctx, connect.NewRequest(&beaconv1.WhoAmIRequest{}))
	if err != nil || !strings.Contains(who.Msg.GetEffectiveRules(), "write acl") || who.Msg.GetToken().GetPolicies()[0] != "global-management" {
		t.Fatalf("WhoAmI(management) = %v, %v", who, err)
	}

	keyFile := filepath.Join(cfg.DataDir, "acl-break-glass.key")
	st, err := os.Stat(keyFile)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("break-glass key file: %v, %v, want mode 0600", st, err)
	}
	key, _ := os.ReadFile(keyFile)
	if _, err := ac.Bootstrap(ctx, connect.NewRequest(&beaconv1.BootstrapRequest{BreakGlassKey: "bct_wrong"})); connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Errorf("Bootstrap(wrong key) = %v, want PermissionDenied", err)
	}
	resp, err := ac.Bootstrap(ctx, connect.NewRequest(&beaconv1.BootstrapRequest{BreakGlassKey: string(key)}))
	if err != nil {
		t.Fatalf("Bootstrap(break-glass key) = %v", err)
	}
	fresh := resp.Msg.GetToken().GetSecretId()
	if _, err := aclClient(srv, fresh, connect.WithGRPC()).ListTokens(ctx, connect.NewRequest(&beaconv1.ListTokensRequest{})); err != nil {
		t.Errorf("the break-glass token cannot list tokens: %v", err)
	}
	if _, err := ac.Bootstrap(ctx, connect.NewRequest(&beaconv1.BootstrapRequest{BreakGlassKey: string(key)})); connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Errorf("Bootstrap(used key again) = %v, want PermissionDenied: a key works once", err)
	}
	if next, _ := os.ReadFile(keyFile); len(next) == 0 || string(next) == string(key) {
		t.Errorf("the key file was not replaced after use")
	}
}

// TestACLTokensExpireAndDeletedTokensStop: an expired or deleted token is
// refused as unauthenticated; a malformed one says what is wrong.
func TestACLTokenLifecycle(t *testing.T) {
	srv, _, mgmt := aclServer(t)
	ctx := context.Background()
	mustPolicy(t, srv, mgmt, "read-all", "read service *")
	ac := aclClient(srv, mgmt, connect.WithGRPC())
	resp, err := ac.CreateToken(ctx, connect.NewRequest(&beaconv1.CreateTokenRequest{Token: &beaconv1.AclToken{Policies: []string{"read-all"}}, Ttl: durationpb.New(time.Hour)}))
	if err != nil || resp.Msg.GetToken().GetExpiresAt() == nil {
		t.Fatalf("CreateToken(ttl 1h) = %v, %v", resp, err)
	}
	secret := resp.Msg.GetToken().GetSecretId()
	rc := regClient(srv, secret, connect.WithGRPC())
	if _, err := rc.ListServices(ctx, connect.NewRequest(&beaconv1.ListServicesRequest{})); err != nil {
		t.Fatalf("ListServices(read token) = %v", err)
	}
	// Expire it by moving expires_at into the past.
	tok := resp.Msg.GetToken()
	tok.SecretId, tok.ExpiresAt = "", nil
	tok.ExpiresAt = timestampAgo(time.Minute)
	if _, err := ac.UpdateToken(ctx, connect.NewRequest(&beaconv1.UpdateTokenRequest{Token: tok})); err != nil {
		t.Fatalf("UpdateToken(expired) = %v", err)
	}
	if _, err := rc.ListServices(ctx, connect.NewRequest(&beaconv1.ListServicesRequest{})); connect.CodeOf(err) != connect.CodeUnauthenticated || !strings.Contains(err.Error(), "expired") {
		t.Errorf("ListServices(expired token) = %v, want Unauthenticated saying expired", err)
	}
	if _, err := ac.DeleteToken(ctx, connect.NewRequest(&beaconv1.DeleteTokenRequest{AccessorId: tok.GetAccessorId()})); err != nil {
		t.Fatalf("DeleteToken() = %v", err)
	}
	if _, err := rc.ListServices(ctx, connect.NewRequest(&beaconv1.ListServicesRequest{})); connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Errorf("ListServices(deleted token) = %v, want Unauthenticated", err)
	}
	if _, err := regClient(srv, secret[:20], connect.WithGRPC()).ListServices(ctx, connect.NewRequest(&beaconv1.ListServicesRequest{})); connect.CodeOf(err) != connect.CodeUnauthenticated || !strings.Contains(err.Error(), "copied whole") {
		t.Errorf("ListServices(truncated token) = %v, want Unauthenticated saying it is truncated", err)
	}
	// Bad input names the field and changes nothing.
	if _, err := ac.PutPolicy(ctx, connect.NewRequest(&beaconv1.PutPolicyRequest{Policy: &beaconv1.AclPolicy{Name: "bad", Rules: "read service *\nwrite everything"}})); connect.CodeOf(err) != connect.CodeInvalidArgument || !strings.Contains(err.Error(), "line 2") {
		t.Errorf("PutPolicy(bad rules) = %v, want InvalidArgument naming line 2", err)
	}
	if _, err := ac.ReadPolicy(ctx, connect.NewRequest(&beaconv1.ReadPolicyRequest{Name: "bad"})); connect.CodeOf(err) != connect.CodeNotFound {
		t.Errorf("ReadPolicy(bad) after a refused put = %v, want NotFound", err)
	}
}

// TestACLAnonymousToken: calls without a token get the anonymous token's
// policy, nothing by default.
func TestACLAnonymousToken(t *testing.T) {
	srv, _, mgmt := aclServer(t)
	ctx := context.Background()
	anon := regClient(srv, "", connect.WithGRPC())
	if _, err := anon.CreateSession(ctx, connect.NewRequest(&beaconv1.CreateSessionRequest{})); connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Errorf("CreateSession(no token) = %v, want PermissionDenied", err)
	}
	mustPolicy(t, srv, mgmt, "register-web", "write service default/web")
	if _, err := aclClient(srv, mgmt, connect.WithGRPC()).UpdateToken(ctx, connect.NewRequest(&beaconv1.UpdateTokenRequest{Token: &beaconv1.AclToken{AccessorId: "anonymous", Policies: []string{"register-web"}}})); err != nil {
		t.Fatalf("UpdateToken(anonymous) = %v", err)
	}
	if _, err := anon.Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{Instance: ttlInstance("web", "p1", "127.0.0.1", 0)})); err != nil {
		t.Errorf("Register(no token, anonymous may write web) = %v", err)
	}
	if _, err := anon.Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{Instance: ttlInstance("db", "p1", "127.0.0.1", 0)})); connect.CodeOf(err) != connect.CodePermissionDenied || !strings.Contains(err.Error(), `service:write on "default/db"`) {
		t.Errorf("Register(no token, db) = %v, want PermissionDenied naming service:write on default/db", err)
	}
}

// registerBatch calls RegisterBatch and returns the call's error, or the
// first instance's refusal as the error Register would have returned.
func registerBatch(ctx context.Context, rc beaconv1connect.RegistryServiceClient, session int64, ins ...*beaconv1.Instance) error {
	resp, err := rc.RegisterBatch(ctx, connect.NewRequest(&beaconv1.RegisterBatchRequest{Instances: ins, SessionId: session}))
	if err != nil {
		return err
	}
	for _, r := range resp.Msg.GetResults() {
		if r.GetErrorCode() != 0 {
			return connect.NewError(connect.Code(r.GetErrorCode()), errors.New(r.GetError()))
		}
	}
	return nil
}

// outcome of one call in the permission matrix.
type outcome string

const (
	allowed  outcome = "allow"
	denied   outcome = "deny"     // PermissionDenied (403)
	unauth   outcome = "unauth"   // Unauthenticated (401)
	filtered outcome = "filtered" // a read that hides the service
)

func outcomeOf(t *testing.T, err error) outcome {
	t.Helper()
	switch connect.CodeOf(err) {
	case connect.CodePermissionDenied:
		if !strings.Contains(err.Error(), "needs ") {
			t.Errorf("PermissionDenied without naming the permission: %v", err)
		}
		return denied
	case connect.CodeUnauthenticated:
		return unauth
	case connect.CodeFailedPrecondition:
		if strings.Contains(err.Error(), "held by another live session") {
			return denied // until the holder ends: a takeover, refused
		}
	}
	if err != nil {
		t.Fatalf("unexpected error: %v", err)
	}
	return allowed
}

// fixture is what every cell of the matrix finds: sessions s1 and s2,
// made with the web service identity's token; instances web/i1 in s1 and
// web/i2 in s2 (TTL checks), and the persistent web/p1.
type fixture struct {
	s1, s2       int64
	cred1, cred2 string
}

func (f *fixture) close(t *testing.T, rc beaconv1connect.RegistryServiceClient) {
	ctx := context.Background()
	for _, s := range []int64{f.s1, f.s2} {
		if _, err := rc.CloseSession(ctx, connect.NewRequest(&beaconv1.CloseSessionRequest{SessionId: s})); err != nil && connect.CodeOf(err) != connect.CodeNotFound {
			t.Fatal(err)
		}
	}
	for _, id := range []string{"p1", "p2", "i1", "i2"} { // a cell may have made i1 persistent
		rc.Deregister(ctx, connect.NewRequest(&beaconv1.DeregisterRequest{Service: "web", Id: id}))
	}
}

func newFixture(t *testing.T, webID, mgmt beaconv1connect.RegistryServiceClient, srv *server.Server) *fixture {
	t.Helper()
	ctx := context.Background()
	f := &fixture{}
	for i, addr := range []string{"10.0.0.1", "10.0.0.2"} {
		resp, err := webID.CreateSession(ctx, connect.NewRequest(&beaconv1.CreateSessionRequest{Ttl: durationpb.New(time.Minute)}))
		if err != nil {
			t.Fatal(err)
		}
		id, cred := resp.Msg.GetSessionId(), resp.Msg.GetSessionToken()
		if cred == "" {
			t.Fatal("CreateSession with ACLs on returned no session_token")
		}
		if _, err := regClient(srv, cred, connect.WithGRPC()).Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{Instance: ttlInstance("web", fmt.Sprintf("i%d", i+1), addr, id)})); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			f.s1, f.cred1 = id, cred
		} else {
			f.s2, f.cred2 = id, cred
		}
	}
	if _, err := mgmt.Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{Instance: ttlInstance("web", "p1", "10.0.0.9", 0)})); err != nil {
		t.Fatal(err)
	}
	// A registration returns once etcd has it; the server's view, which
	// the watch cells and the ownership checks read, follows a moment
	// later. ListInstances answers only once the view has caught up with
	// etcd: after it, the view holds this fixture and not the last one.
	if _, err := mgmt.ListInstances(ctx, connect.NewRequest(&beaconv1.ListInstancesRequest{Service: "web", All: true})); err != nil {
		t.Fatal(err)
	}
	return f
}

// TestACLPermissionMatrix runs every API operation as every kind of
// caller, over gRPC and the Connect protocol's JSON, and the watch also
// as NDJSON, and checks each answer against the expected one.
func TestACLPermissionMatrix(t *testing.T) {
	srv, _, mgmtSecret := aclServer(t, func(c *server.Config) { c.DNS.Addr = "127.0.0.1:0" })
	mustPolicy(t, srv, mgmtSecret, "read-only", "read service *")
	secrets := map[string]string{
		"management": mgmtSecret,
		"read-only":  mustToken(t, srv, mgmtSecret, &beaconv1.AclToken{Policies: []string{"read-only"}}),
		"id-same":    mustToken(t, srv, mgmtSecret, &beaconv1.AclToken{ServiceIdentities: []*beaconv1.AclServiceIdentity{{Service: "web"}}}),
		"id-other":   mustToken(t, srv, mgmtSecret, &beaconv1.AclToken{ServiceIdentities: []*beaconv1.AclServiceIdentity{{Service: "db"}}}),
		"no-token":   "",
		"bad-token":  "bct_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
	}
	rows := []string{"no-token", "bad-token", "read-only", "id-same", "id-other", "cred-same", "cred-other", "management"}
	type op struct {
		name string
		want map[string]outcome // rows not named: denied
		call func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error)
	}
	read := map[string]outcome{"no-token": filtered, "read-only": allowed, "id-same": allowed, "id-other": allowed, "cred-same": allowed, "cred-other": allowed, "management": allowed}
	write := func(rows ...string) map[string]outcome {
		m := map[string]outcome{}
		for _, r := range rows {
			m[r] = allowed
		}
		return m
	}
	plain := func(err error) (outcome, error) { return "", err }
	ops := []op{
		{"CreateSession", write("id-same", "id-other", "management"), func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			resp, err := rc.CreateSession(ctx, connect.NewRequest(&beaconv1.CreateSessionRequest{}))
			if err == nil {
				rc.CloseSession(ctx, connect.NewRequest(&beaconv1.CloseSessionRequest{SessionId: resp.Msg.GetSessionId()}))
			}
			return plain(err)
		}},
		{"KeepAlive", write("id-same", "cred-same", "management"), func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			_, err := rc.KeepAlive(ctx, connect.NewRequest(&beaconv1.KeepAliveRequest{SessionId: f.s1}))
			return plain(err)
		}},
		{"KeepAliveStream", write("id-same", "cred-same", "management"), func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			st := rc.KeepAliveStream(ctx)
			defer st.CloseResponse()
			if err := st.Send(&beaconv1.KeepAliveBatch{SessionIds: []int64{f.s1}}); err != nil {
				if errors.Is(err, io.EOF) {
					// The server answered (a refusal) and closed the stream
					// before the message went: the answer is Receive's.
					_, err = st.Receive()
				}
				return plain(err)
			}
			_, err := st.Receive()
			st.CloseRequest()
			return plain(err)
		}},
		{"CloseSession", write("cred-same", "management"), func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			_, err := rc.CloseSession(ctx, connect.NewRequest(&beaconv1.CloseSessionRequest{SessionId: f.s1}))
			return plain(err)
		}},
		{"Register into s1", write("cred-same", "management"), func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			_, err := rc.Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{Instance: ttlInstance("web", "i1", "10.0.0.1", f.s1)}))
			return plain(err)
		}},
		{"Register persistent", write("id-same", "management"), func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			_, err := rc.Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{Instance: ttlInstance("web", "p2", "10.0.0.8", 0)}))
			return plain(err)
		}},
		// The hijack: take i1 (held by s1) into s2 at another address.
		{"Register i1 into s2 elsewhere", write("management"), func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			_, err := rc.Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{Instance: ttlInstance("web", "i1", "10.6.6.6", f.s2)}))
			return plain(err)
		}},
		// The same at i1's own address: nothing tells a sibling holding
		// the service's token from i1's process restarted.
		{"Register i1 into s2 at its address", write("management"), func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			_, err := rc.Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{Instance: ttlInstance("web", "i1", "10.0.0.1", f.s2)}))
			return plain(err)
		}},
		// A token turning a session's instance persistent.
		{"Register i1 persistent", write("management"), func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			_, err := rc.Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{Instance: ttlInstance("web", "i1", "10.0.0.1", 0)}))
			return plain(err)
		}},
		{"RegisterBatch into s1", write("cred-same", "management"), func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			return plain(registerBatch(ctx, rc, f.s1, ttlInstance("web", "i1", "10.0.0.1", f.s1), ttlInstance("web", "i3", "10.0.0.3", f.s1)))
		}},
		{"RegisterBatch i1 into s2 with i4", write("management"), func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			return plain(registerBatch(ctx, rc, f.s2, ttlInstance("web", "i4", "10.0.0.4", f.s2), ttlInstance("web", "i1", "10.0.0.1", f.s2)))
		}},
		{"Deregister i1", write("cred-same", "management"), func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			resp, err := rc.Deregister(ctx, connect.NewRequest(&beaconv1.DeregisterRequest{Service: "web", Id: "i1"}))
			if err == nil && !resp.Msg.GetFound() {
				return denied, nil // allowed to call, but i1 was not its to delete
			}
			return plain(err)
		}},
		{"Deregister p1", write("id-same", "management"), func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			resp, err := rc.Deregister(ctx, connect.NewRequest(&beaconv1.DeregisterRequest{Service: "web", Id: "p1"}))
			if err == nil && !resp.Msg.GetFound() {
				return denied, nil
			}
			return plain(err)
		}},
		{"SetStatus i1", write("cred-same", "management"), func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			_, err := rc.SetStatus(ctx, connect.NewRequest(&beaconv1.SetStatusRequest{Service: "web", Id: "i1", Status: beaconv1.Status_STATUS_OUT_OF_SERVICE}))
			return plain(err)
		}},
		{"UpdateCheck i1", write("cred-same", "management"), func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			_, err := rc.UpdateCheck(ctx, connect.NewRequest(&beaconv1.UpdateCheckRequest{Service: "web", Id: "i1", Status: beaconv1.Health_HEALTH_PASSING}))
			return plain(err)
		}},
		{"SetServiceConfig", write("management"), func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			_, err := rc.SetServiceConfig(ctx, connect.NewRequest(&beaconv1.SetServiceConfigRequest{Service: "web", ProtectionThreshold: 0.5}))
			return plain(err)
		}},
		{"SetServicePolicy", write("management"), func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			_, err := rc.SetServicePolicy(ctx, connect.NewRequest(&beaconv1.SetServicePolicyRequest{Service: "web", RetryPolicy: &beaconv1.RetryPolicy{RetryOn: []string{"unavailable"}}}))
			return plain(err)
		}},
		// One service's settings: service:read on it; the anonymous
		// token, which may read nothing, is refused (not filtered).
		{"GetServiceConfig", write("read-only", "id-same", "id-other", "cred-same", "cred-other", "management"), func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			_, err := rc.GetServiceConfig(ctx, connect.NewRequest(&beaconv1.GetServiceConfigRequest{Service: "web"}))
			return plain(err)
		}},
		{"ListInstances", read, func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			resp, err := rc.ListInstances(ctx, connect.NewRequest(&beaconv1.ListInstancesRequest{Service: "web", All: true}))
			if err != nil {
				return plain(err)
			}
			return listOutcome(len(resp.Msg.GetInstances()), resp.Msg.GetInstances(), resp.Msg.GetResultsFiltered())
		}},
		{"ListServices", read, func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			resp, err := rc.ListServices(ctx, connect.NewRequest(&beaconv1.ListServicesRequest{}))
			if err != nil {
				return plain(err)
			}
			if len(resp.Msg.GetServices()) == 0 {
				if !resp.Msg.GetResultsFiltered() {
					return "", errors.New("no services and results_filtered unset")
				}
				return filtered, nil
			}
			return allowed, nil
		}},
		{"Watch", read, func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			st, err := rc.Watch(ctx, connect.NewRequest(&beaconv1.WatchRequest{Services: []string{"web"}, Heartbeat: durationpb.New(100 * time.Millisecond)}))
			if err != nil {
				return plain(err)
			}
			defer st.Close()
			if !st.Receive() {
				return plain(st.Err())
			}
			var insts []*beaconv1.Instance
			for _, s := range st.Msg().GetSnapshots() {
				insts = append(insts, s.GetInstances()...)
			}
			return listOutcome(len(insts), insts, st.Msg().GetResultsFiltered())
		}},
		{"AwaitWatchers", write("read-only", "id-same", "id-other", "cred-same", "cred-other", "management"), func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			_, err := rc.AwaitWatchers(ctx, connect.NewRequest(&beaconv1.AwaitWatchersRequest{Service: "web", Revision: 1, Timeout: durationpb.New(time.Millisecond)}))
			return plain(err)
		}},
		// The console's calls (consoleapi.go).
		{"ListNamespaces", read, func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			resp, err := rc.ListNamespaces(ctx, connect.NewRequest(&beaconv1.ListNamespacesRequest{}))
			if err != nil {
				return plain(err)
			}
			for _, ns := range resp.Msg.GetNamespaces() {
				if ns.GetServices() > 0 {
					return allowed, nil
				}
			}
			if !resp.Msg.GetResultsFiltered() {
				return "", errors.New("no namespace with services and results_filtered unset")
			}
			return filtered, nil
		}},
		{"ListSessions", write("management"), func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			_, err := rc.ListSessions(ctx, connect.NewRequest(&beaconv1.ListSessionsRequest{}))
			return plain(err)
		}},
		{"ExplainInstance", write("read-only", "id-same", "id-other", "cred-same", "cred-other", "management"), func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			_, err := rc.ExplainInstance(ctx, connect.NewRequest(&beaconv1.ExplainInstanceRequest{Service: "web", Id: "p1"}))
			return plain(err)
		}},
		{"ServicePropagation", write("read-only", "id-same", "id-other", "cred-same", "cred-other", "management"), func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			_, err := rc.ServicePropagation(ctx, connect.NewRequest(&beaconv1.ServicePropagationRequest{Service: "web"}))
			return plain(err)
		}},
		{"ClusterStatus", write("management"), func(ctx context.Context, rc beaconv1connect.RegistryServiceClient, f *fixture) (outcome, error) {
			_, err := rc.ClusterStatus(ctx, connect.NewRequest(&beaconv1.ClusterStatusRequest{}))
			return plain(err)
		}},
	}

	mgmt := regClient(srv, mgmtSecret, connect.WithGRPC())
	webID := regClient(srv, secrets["id-same"], connect.WithGRPC())
	transports := map[string][]connect.ClientOption{"grpc": {connect.WithGRPC()}, "connect-json": {connect.WithProtoJSON()}}
	for tname, topts := range transports {
		for _, o := range ops {
			for _, row := range rows {
				f := newFixture(t, webID, mgmt, srv)
				secret := secrets[row]
				switch row {
				case "cred-same":
					secret = f.cred1
				case "cred-other":
					secret = f.cred2
				}
				want := o.want[row]
				if want == "" {
					want = denied
				}
				if row == "bad-token" {
					want = unauth
				}
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				got, err := o.call(ctx, regClient(srv, secret, topts...), f)
				cancel()
				if got == "" {
					got = outcomeOf(t, err)
				} else if err != nil {
					t.Fatalf("%s %s as %s: %v", tname, o.name, row, err)
				}
				if got != want {
					t.Errorf("%s: %s as %s = %s (%v), want %s", tname, o.name, row, got, err, want)
				}
				f.close(t, mgmt)
			}
		}
	}

	// The NDJSON watch, as curl reads it.
	f := newFixture(t, webID, mgmt, srv)
	defer f.close(t, mgmt)
	// The HTTP reads below answer each row as a read does: the row's
	// secret (a session credential for the cred rows), unauthenticated
	// for a bad token.
	rowSecret := func(row string) string {
		switch row {
		case "cred-same":
			return f.cred1
		case "cred-other":
			return f.cred2
		}
		return secrets[row]
	}
	wantRead := func(row string) outcome {
		if row == "bad-token" {
			return unauth
		}
		return read[row]
	}
	for _, row := range rows {
		if got, want := ndjsonOutcome(t, srv, rowSecret(row)), wantRead(row); got != want {
			t.Errorf("ndjson: Watch as %s = %s, want %s", row, got, want)
		}
	}

	// Prometheus service discovery (GET /v1/sd/prometheus), as Prometheus
	// reads it: the bearer token of its authorization config.
	testutil.Eventually(t, 30*time.Second, "the fixture's instances in the server's view", func() bool {
		return slices.Contains(sdIDs(promSDGroups(t, srv.Addr(), "service=web", mgmtSecret)), "web/p1")
	})
	for _, row := range rows {
		if got, want := promSDOutcome(t, srv, rowSecret(row)), wantRead(row); got != want {
			t.Errorf("prometheus sd as %s = %s, want %s", row, got, want)
		}
	}

	// DNS carries no token: whatever the row, it answers as no-token does
	// (the anonymous token's policy, nothing by default), so web, which
	// has instances, answers as absent.
	if got := dnsOutcome(t, srv); got != read["no-token"] {
		t.Errorf("DNS (every row: no token) = %s, want %s", got, read["no-token"])
	}
	// Once the anonymous token may read web, DNS answers it.
	mustPolicy(t, srv, mgmtSecret, "anonymous-reads-web", "read service default/web")
	if _, err := aclClient(srv, mgmtSecret, connect.WithGRPC()).UpdateToken(context.Background(), connect.NewRequest(&beaconv1.UpdateTokenRequest{Token: &beaconv1.AclToken{AccessorId: "anonymous", Policies: []string{"anonymous-reads-web"}}})); err != nil {
		t.Fatalf("UpdateToken(anonymous) = %v", err)
	}
	testutil.Eventually(t, 30*time.Second, "DNS answering web once the anonymous token may read it", func() bool {
		return dnsOutcome(t, srv) == allowed
	})
}

// dnsOutcome classifies the DNS answer for web.service.consul: filtered
// when NXDOMAIN (the name hidden), allowed when the name is answered
// (with addresses, or NODATA while none is routable).
func dnsOutcome(t *testing.T, srv *server.Server) outcome {
	t.Helper()
	resp := dnsQuery(t, "udp", srv.DNSAddr(), "web.service.consul.", mdns.TypeSRV, 0)
	switch resp.Rcode {
	case mdns.RcodeNameError:
		return filtered
	case mdns.RcodeSuccess:
		return allowed
	}
	t.Fatalf("DNS web.service.consul SRV = %s", mdns.RcodeToString[resp.Rcode])
	return ""
}

// promSDOutcome classifies GET /v1/sd/prometheus?service=web: filtered
// when it lists nothing and says it left services out.
func promSDOutcome(t *testing.T, srv *server.Server, secret string) outcome {
	t.Helper()
	code, h, body := promSDGet(t, srv.Addr(), "service=web", secret)
	switch code {
	case http.StatusUnauthorized:
		return unauth
	case http.StatusForbidden:
		return denied
	case http.StatusOK:
	default:
		t.Fatalf("GET /v1/sd/prometheus = %d %s", code, body)
	}
	if body == "[]\n" {
		if h.Get("Beacon-Results-Filtered") != "true" {
			t.Errorf("prometheus sd: nothing listed and Beacon-Results-Filtered unset")
		}
		return filtered
	}
	return allowed
}

// listOutcome classifies a read: filtered if it hid the service, allowed
// if it showed it — and session ids must show only to session:read.
func listOutcome(n int, insts []*beaconv1.Instance, resultsFiltered bool) (outcome, error) {
	if n == 0 {
		if !resultsFiltered {
			return "", errors.New("nothing returned and results_filtered unset")
		}
		return filtered, nil
	}
	return allowed, sessionIDsShown(insts, resultsFiltered)
}

func sessionIDsShown(insts []*beaconv1.Instance, resultsFiltered bool) error {
	shown := false
	for _, in := range insts {
		shown = shown || in.GetSessionId() != 0
	}
	if shown == resultsFiltered {
		return fmt.Errorf("session ids shown %v with results_filtered %v", shown, resultsFiltered)
	}
	return nil
}

func ndjsonOutcome(t *testing.T, srv *server.Server, secret string) outcome {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+srv.Addr()+"/v1/watch?service=web", nil)
	if secret != "" {
		req.Header.Set("X-Beacon-Token", secret)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusUnauthorized:
		return unauth
	case http.StatusForbidden:
		return denied
	case http.StatusOK:
	default:
		t.Fatalf("GET /v1/watch = %d", resp.StatusCode)
	}
	line, err := bufio.NewReader(resp.Body).ReadBytes('\n')
	if err != nil {
		t.Fatal(err)
	}
	var msg beaconv1.WatchResponse
	if err := protojson.Unmarshal(line, &msg); err != nil {
		t.Fatal(err)
	}
	var insts []*beaconv1.Instance
	for _, s := range msg.GetSnapshots() {
		insts = append(insts, s.GetInstances()...)
	}
	got, err := listOutcome(len(insts), insts, msg.GetResultsFiltered())
	if err != nil {
		t.Errorf("ndjson: %v", err)
	}
	return got
}

func timestampAgo(d time.Duration) *timestamppb.Timestamp { return timestamppb.New(time.Now().Add(-d)) }

// TestAuditLog: writes and refusals land in the audit log with who, from
// where, what and how it ended, and the chain verifies.
func TestAuditLog(t *testing.T) {
	cfg := servertest.Config(t, "")
	cfg.ACL = true
	cfg.AuditLog = filepath.Join(t.TempDir(), "audit.log")
	srv := servertest.Start(t, cfg)
	ctx := context.Background()
	boot, err := aclClient(srv, "", connect.WithGRPC()).Bootstrap(ctx, connect.NewRequest(&beaconv1.BootstrapRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	mgmt := boot.Msg.GetToken()
	if _, err := regClient(srv, mgmt.GetSecretId(), connect.WithGRPC()).Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{Instance: ttlInstance("web", "p1", "10.0.0.1", 0)})); err != nil {
		t.Fatal(err)
	}
	if _, err := regClient(srv, "", connect.WithGRPC()).SetStatus(ctx, connect.NewRequest(&beaconv1.SetStatusRequest{Service: "web", Id: "p1", Status: beaconv1.Status_STATUS_OUT_OF_SERVICE})); connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Fatalf("SetStatus(no token) = %v", err)
	}
	if _, err := regClient(srv, "bct_nonsense", connect.WithGRPC()).ListServices(ctx, connect.NewRequest(&beaconv1.ListServicesRequest{})); connect.CodeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("ListServices(bad token) = %v", err)
	}
	// A successful read is not audited.
	if _, err := regClient(srv, mgmt.GetSecretId(), connect.WithGRPC()).ListServices(ctx, connect.NewRequest(&beaconv1.ListServicesRequest{})); err != nil {
		t.Fatal(err)
	}
	srv.Close() // flushes the log

	rep, err := audit.VerifyFiles(cfg.AuditLog)
	if err != nil {
		t.Fatalf("VerifyFiles() = %v", err)
	}
	b, _ := os.ReadFile(cfg.AuditLog)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) != rep.Lines || len(lines) != 4 {
		t.Fatalf("audit log has %d lines (verified %d), want 4 (bootstrap, register, denied status, bad token):\n%s", len(lines), rep.Lines, b)
	}
	for i, want := range []string{
		`"made_token":"` + mgmt.GetAccessorId() + `"`,
		`"accessor":"` + mgmt.GetAccessorId() + `"`,
		`"resource":"service:default/web/p1","outcome":"denied"`,
		`"operation":"beacon.v1.RegistryService/ListServices","resource":"","outcome":"denied","reason":"acl: malformed token`,
	} {
		if !strings.Contains(lines[i], want) {
			t.Errorf("audit line %d = %s, want it to contain %s", i+1, lines[i], want)
		}
	}
	if !strings.Contains(lines[1], `"outcome":"allowed"`) || !strings.Contains(lines[1], `"source":"127.0.0.1:`) {
		t.Errorf("register line = %s, want allowed with the source address", lines[1])
	}
}

// TestACLQuotasPerToken: one token's sessions, watch streams and writes
// are bounded on their own; another token is not held back by them.
func TestACLQuotasPerToken(t *testing.T) {
	cfg := servertest.Config(t, "")
	cfg.ACL = true
	cfg.Limits.MaxSessionsPerToken = 2
	cfg.Limits.MaxWatchersPerToken = 1
	cfg.Limits.WriteRatePerToken, cfg.Limits.WriteBurstPerToken = 1, 4
	srv := servertest.Start(t, cfg)
	ctx := context.Background()
	boot, err := aclClient(srv, "", connect.WithGRPC()).Bootstrap(ctx, connect.NewRequest(&beaconv1.BootstrapRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	mgmt := boot.Msg.GetToken().GetSecretId()
	web := mustToken(t, srv, mgmt, &beaconv1.AclToken{ServiceIdentities: []*beaconv1.AclServiceIdentity{{Service: "web"}}})
	db := mustToken(t, srv, mgmt, &beaconv1.AclToken{ServiceIdentities: []*beaconv1.AclServiceIdentity{{Service: "db"}}})
	wc, dc := regClient(srv, web, connect.WithGRPC()), regClient(srv, db, connect.WithGRPC())

	// Sessions: two writes of web's budget of four.
	for range 2 {
		if _, err := wc.CreateSession(ctx, connect.NewRequest(&beaconv1.CreateSessionRequest{})); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := wc.CreateSession(ctx, connect.NewRequest(&beaconv1.CreateSessionRequest{})); connect.CodeOf(err) != connect.CodeResourceExhausted || !strings.Contains(err.Error(), "--max-sessions-per-token") {
		t.Errorf("third session of one token = %v, want ResourceExhausted naming --max-sessions-per-token", err)
	}
	if _, err := dc.CreateSession(ctx, connect.NewRequest(&beaconv1.CreateSessionRequest{})); err != nil {
		t.Errorf("another token's session = %v", err)
	}

	// Writes: the fourth of web's burst passes, the next ones do not.
	in := ttlInstance("web", "p", "10.0.0.1", 0)
	var refused error
	for range 3 {
		if _, err := wc.Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{Instance: in})); err != nil {
			refused = err
			break
		}
	}
	if connect.CodeOf(refused) != connect.CodeResourceExhausted || !strings.Contains(refused.Error(), "--write-rate-per-token") {
		t.Errorf("writes past one token's burst = %v, want ResourceExhausted naming --write-rate-per-token", refused)
	}
	if _, err := dc.Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{Instance: ttlInstance("db", "p", "10.0.0.2", 0)})); err != nil {
		t.Errorf("another token's write = %v", err)
	}

	// Watch streams.
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	first, err := wc.Watch(wctx, connect.NewRequest(&beaconv1.WatchRequest{}))
	if err != nil || !first.Receive() {
		t.Fatalf("first watch: %v %v", err, first.Err())
	}
	defer first.Close()
	second, err := wc.Watch(wctx, connect.NewRequest(&beaconv1.WatchRequest{}))
	if err == nil {
		second.Receive()
		err = second.Err()
		second.Close()
	}
	if connect.CodeOf(err) != connect.CodeResourceExhausted || !strings.Contains(err.Error(), "--max-watchers-per-token") {
		t.Errorf("second watch of one token = %v, want ResourceExhausted naming --max-watchers-per-token", err)
	}
	other, err := dc.Watch(wctx, connect.NewRequest(&beaconv1.WatchRequest{}))
	if err != nil || !other.Receive() {
		t.Errorf("another token's watch: %v %v", err, other.Err())
	}
	other.Close()
}

// TestACLClientCertificateRole: over mTLS, a call without a token takes
// the rights of the role named like its certificate's common name.
func TestACLClientCertificateRole(t *testing.T) {
	dir := t.TempDir()
	ca := testutil.NewCA(t, "ca")
	cfg := servertest.Config(t, "")
	cfg.ACL = true
	cfg.TLSCertFile, cfg.TLSKeyFile = ca.Issue(t, dir, "server", testutil.CertSpec{Names: []string{"127.0.0.1"}})
	cfg.TLSClientCAFile = ca.WriteCert(t, filepath.Join(dir, "ca.pem"))
	srv := servertest.Start(t, cfg)
	ctx := context.Background()
	clientFor := func(cn string) *http.Client {
		cert, key := ca.Issue(t, dir, cn, testutil.CertSpec{Client: true})
		tc, err := client.TLSFromFiles(cfg.TLSClientCAFile, cert, key)
		if err != nil {
			t.Fatal(err)
		}
		return &http.Client{Transport: &http.Transport{TLSClientConfig: tc, ForceAttemptHTTP2: true}}
	}
	boot, err := beaconv1connect.NewAclServiceClient(clientFor("bootstrapper"), "https://"+srv.Addr()).Bootstrap(ctx, connect.NewRequest(&beaconv1.BootstrapRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	mgmt := beaconv1connect.NewAclServiceClient(clientFor("admin"), "https://"+srv.Addr(), connect.WithInterceptors(bearer(boot.Msg.GetToken().GetSecretId())))
	if _, err := mgmt.PutPolicy(ctx, connect.NewRequest(&beaconv1.PutPolicyRequest{Policy: &beaconv1.AclPolicy{Name: "ops", Rules: "write operator\nread service *"}})); err != nil {
		t.Fatal(err)
	}
	if _, err := mgmt.PutRole(ctx, connect.NewRequest(&beaconv1.PutRoleRequest{Role: &beaconv1.AclRole{Name: "ops", Policies: []string{"ops"}}})); err != nil {
		t.Fatal(err)
	}
	setThreshold := func(hc *http.Client) error {
		_, err := beaconv1connect.NewRegistryServiceClient(hc, "https://"+srv.Addr()).SetServiceConfig(ctx, connect.NewRequest(&beaconv1.SetServiceConfigRequest{Service: "web", ProtectionThreshold: 0.5}))
		return err
	}
	if err := setThreshold(clientFor("ops")); err != nil {
		t.Errorf("SetServiceConfig with the ops certificate = %v", err)
	}
	if err := setThreshold(clientFor("intern")); connect.CodeOf(err) != connect.CodePermissionDenied || !strings.Contains(err.Error(), "token anonymous") {
		t.Errorf("SetServiceConfig with a certificate naming no role = %v, want PermissionDenied as anonymous", err)
	}
	who, err := beaconv1connect.NewAclServiceClient(clientFor("ops"), "https://"+srv.Addr()).WhoAmI(ctx, connect.NewRequest(&beaconv1.WhoAmIRequest{}))
	if err != nil || who.Msg.GetToken().GetAccessorId() != "role:ops" {
		t.Errorf("WhoAmI(ops certificate) = %v, %v, want role:ops", who, err)
	}
}

// A session credential is bound to its session even when the token that
// made it may do everything.
func TestACLSessionCredentialHasNoGlobalRights(t *testing.T) {
	srv, _, mgmt := aclServer(t)
	ctx := context.Background()
	mc := regClient(srv, mgmt, connect.WithGRPC())
	mine, err := mc.CreateSession(ctx, connect.NewRequest(&beaconv1.CreateSessionRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	other, err := mc.CreateSession(ctx, connect.NewRequest(&beaconv1.CreateSessionRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	cred := mine.Msg.GetSessionToken()
	if _, err := aclClient(srv, cred, connect.WithGRPC()).ListTokens(ctx, connect.NewRequest(&beaconv1.ListTokensRequest{})); connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Errorf("ListTokens(session credential of a management token) = %v, want PermissionDenied", err)
	}
	cc := regClient(srv, cred, connect.WithGRPC())
	if _, err := cc.CloseSession(ctx, connect.NewRequest(&beaconv1.CloseSessionRequest{SessionId: other.Msg.GetSessionId()})); connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Errorf("CloseSession(another session) with a session credential = %v, want PermissionDenied", err)
	}
	if _, err := cc.SetServiceConfig(ctx, connect.NewRequest(&beaconv1.SetServiceConfigRequest{Service: "web", ProtectionThreshold: 0.5})); connect.CodeOf(err) != connect.CodePermissionDenied {
		t.Errorf("SetServiceConfig with a session credential = %v, want PermissionDenied", err)
	}
	if _, err := cc.CloseSession(ctx, connect.NewRequest(&beaconv1.CloseSessionRequest{SessionId: mine.Msg.GetSessionId()})); err != nil {
		t.Errorf("CloseSession(own session) = %v", err)
	}
}

// Deleting a token ends the streams it opened: watches (gRPC and NDJSON)
// and keepalive streams.
func TestACLRevokedTokenEndsItsStreams(t *testing.T) {
	srv, _, mgmt := aclServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	mustPolicy(t, srv, mgmt, "read-all", "read service *")
	resp, err := aclClient(srv, mgmt, connect.WithGRPC()).CreateToken(ctx, connect.NewRequest(&beaconv1.CreateTokenRequest{Token: &beaconv1.AclToken{Policies: []string{"read-all"}, ServiceIdentities: []*beaconv1.AclServiceIdentity{{Service: "web"}}}}))
	if err != nil {
		t.Fatal(err)
	}
	secret := resp.Msg.GetToken().GetSecretId()
	rc := regClient(srv, secret, connect.WithGRPC())
	sess, err := rc.CreateSession(ctx, connect.NewRequest(&beaconv1.CreateSessionRequest{Ttl: durationpb.New(time.Minute)}))
	if err != nil {
		t.Fatal(err)
	}
	watch, err := rc.Watch(ctx, connect.NewRequest(&beaconv1.WatchRequest{Heartbeat: durationpb.New(100 * time.Millisecond)}))
	if err != nil || !watch.Receive() {
		t.Fatalf("Watch: %v %v", err, watch.Err())
	}
	defer watch.Close()
	ka := rc.KeepAliveStream(ctx)
	defer ka.CloseResponse()
	if err := ka.Send(&beaconv1.KeepAliveBatch{SessionIds: []int64{sess.Msg.GetSessionId()}}); err != nil {
		t.Fatal(err)
	}
	if _, err := ka.Receive(); err != nil {
		t.Fatalf("first keepalive: %v", err)
	}

	if _, err := aclClient(srv, mgmt, connect.WithGRPC()).DeleteToken(ctx, connect.NewRequest(&beaconv1.DeleteTokenRequest{AccessorId: resp.Msg.GetToken().GetAccessorId()})); err != nil {
		t.Fatal(err)
	}
	for watch.Receive() { // heartbeats until the next check ends it
	}
	if connect.CodeOf(watch.Err()) != connect.CodeUnauthenticated {
		t.Errorf("watch of a deleted token ended with %v, want Unauthenticated", watch.Err())
	}
	kaErr := ka.Send(&beaconv1.KeepAliveBatch{SessionIds: []int64{sess.Msg.GetSessionId()}})
	if kaErr == nil {
		_, kaErr = ka.Receive()
	}
	if connect.CodeOf(kaErr) != connect.CodeUnauthenticated {
		t.Errorf("keepalive stream of a deleted token: %v, want Unauthenticated", kaErr)
	}
}

// An acknowledging watch counts only for the services it may read: a
// caller without rights cannot hold up a drain's AwaitWatchers.
func TestACLAcknowledgingWatchersCountOnlyWhatTheyRead(t *testing.T) {
	srv, _, mgmt := aclServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	anon, err := regClient(srv, "", connect.WithGRPC()).Watch(ctx, connect.NewRequest(&beaconv1.WatchRequest{Acknowledge: true}))
	if err != nil || !anon.Receive() {
		t.Fatalf("anonymous watch: %v %v", err, anon.Err())
	}
	defer anon.Close()
	resp, err := regClient(srv, mgmt, connect.WithGRPC()).AwaitWatchers(ctx, connect.NewRequest(&beaconv1.AwaitWatchersRequest{Service: "web", Revision: 1, Timeout: durationpb.New(time.Millisecond)}))
	if err != nil || resp.Msg.GetWatchers() != 0 || !resp.Msg.GetComplete() {
		t.Errorf("AwaitWatchers(web) with only an anonymous watcher = %v, %v, want 0 watchers, complete", resp, err)
	}
}

package server_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/xds"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/server"
	"beacon.dev/beacon/server/servertest"
)

// The xDS control plane, driven by grpc-go's own xDS client: the client
// resolves xds:///orders through beacon and balances over what it is told,
// with no beacon code on its side.

// backend is a real gRPC server answering the interop TestService's
// UnaryCall with its own name, or with what its onCall hook says.
type backend struct {
	testgrpc.UnimplementedTestServiceServer
	name   string
	srv    *grpc.Server
	addr   string
	onCall atomic.Pointer[func(context.Context) error] // nil: answer
}

func (b *backend) UnaryCall(ctx context.Context, _ *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	if f := b.onCall.Load(); f != nil {
		if err := (*f)(ctx); err != nil {
			return nil, err
		}
	}
	return &testgrpc.SimpleResponse{Hostname: b.name}, nil
}

// setOnCall makes every call of b run f first; an error from f is the
// call's answer.
func (b *backend) setOnCall(f func(context.Context) error) { b.onCall.Store(&f) }

func startBackend(t *testing.T, name string) *backend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &backend{name: name, srv: grpc.NewServer(), addr: ln.Addr().String()}
	testgrpc.RegisterTestServiceServer(b.srv, b)
	go b.srv.Serve(ln)
	t.Cleanup(b.srv.Stop)
	return b
}

func startXDS(t *testing.T) (*server.Server, beaconv1connectRegistry) {
	t.Helper()
	cfg := servertest.Config(t, "")
	cfg.XDS.Addr = "127.0.0.1:0"
	srv := servertest.Start(t, cfg)
	return srv, regClient(srv, "")
}

type beaconv1connectRegistry = interface {
	Register(context.Context, *connect.Request[beaconv1.RegisterRequest]) (*connect.Response[beaconv1.RegisterResponse], error)
	SetStatus(context.Context, *connect.Request[beaconv1.SetStatusRequest]) (*connect.Response[beaconv1.SetStatusResponse], error)
	Deregister(context.Context, *connect.Request[beaconv1.DeregisterRequest]) (*connect.Response[beaconv1.DeregisterResponse], error)
}

func registerBackend(t *testing.T, rc beaconv1connectRegistry, b *backend, weight int32, zone string) {
	t.Helper()
	host, port, _ := net.SplitHostPort(b.addr)
	var p int32
	fmt.Sscan(port, &p)
	if _, err := rc.Register(context.Background(), connect.NewRequest(&beaconv1.RegisterRequest{Instance: &beaconv1.Instance{
		Service: "orders", Id: b.name, Address: host, Port: p, Weight: weight, Zone: zone}})); err != nil {
		t.Fatal(err)
	}
}

// xdsClient dials xds:///target through grpc-go's xDS resolver, with a
// bootstrap naming srv's xDS address.
func xdsClient(t *testing.T, srv *server.Server, target string) testgrpc.TestServiceClient {
	t.Helper()
	bootstrap := fmt.Sprintf(`{"xds_servers":[{"server_uri":%q,"channel_creds":[{"type":"insecure"}],"server_features":["xds_v3"]}],"node":{"id":"xds-test","locality":{"zone":"a"}}}`, srv.XDSAddr())
	builder, err := xds.NewXDSResolverWithConfigForTesting([]byte(bootstrap))
	if err != nil {
		t.Fatal(err)
	}
	cc, err := grpc.NewClient("xds:///"+target, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithResolvers(builder))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return testgrpc.NewTestServiceClient(cc)
}

// spread makes n calls and counts them by backend.
func spread(t *testing.T, c testgrpc.TestServiceClient, n int) map[string]int {
	t.Helper()
	got := map[string]int{}
	for range n {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		resp, err := c.UnaryCall(ctx, &testgrpc.SimpleRequest{}, grpc.WaitForReady(true))
		cancel()
		if err != nil {
			t.Fatalf("UnaryCall: %v", err)
		}
		got[resp.GetHostname()]++
	}
	return got
}

func TestXDSGRPCClientFollowsTheRegistry(t *testing.T) {
	srv, rc := startXDS(t)
	bs := []*backend{startBackend(t, "o1"), startBackend(t, "o2"), startBackend(t, "o3")}
	for _, b := range bs {
		registerBackend(t, rc, b, 100, "a")
	}
	c := xdsClient(t, srv, "orders")
	testutil.Eventually(t, 60*time.Second, "calls spread over the three instances", func() bool {
		got := spread(t, c, 30)
		return got["o1"] > 0 && got["o2"] > 0 && got["o3"] > 0
	})

	// A DRAINING instance gets no new calls.
	if _, err := rc.SetStatus(context.Background(), connect.NewRequest(&beaconv1.SetStatusRequest{Service: "orders", Id: "o3", Status: beaconv1.Status_STATUS_DRAINING})); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 60*time.Second, "o3 draining gets nothing", func() bool {
		got := spread(t, c, 30)
		return got["o3"] == 0 && got["o1"] > 0 && got["o2"] > 0
	})

	// An instance that dies and leaves the registry: its calls go to the
	// others, none fails (WaitForReady rides out the moment between).
	bs[1].srv.Stop()
	if _, err := rc.Deregister(context.Background(), connect.NewRequest(&beaconv1.DeregisterRequest{Service: "orders", Id: "o2"})); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 60*time.Second, "everything on o1", func() bool {
		got := spread(t, c, 20)
		return got["o1"] == 20
	})
}

// A beacon weight change shifts the traffic as the weights say: 1 to 3 is
// checked with a chi-squared test (1 degree of freedom; 10.83 is p = 0.001).
func TestXDSWeightsSteerTraffic(t *testing.T) {
	srv, rc := startXDS(t)
	light, heavy := startBackend(t, "light"), startBackend(t, "heavy")
	registerBackend(t, rc, light, 100, "a")
	registerBackend(t, rc, heavy, 100, "a")
	c := xdsClient(t, srv, "orders")
	testutil.Eventually(t, 60*time.Second, "both serve", func() bool {
		got := spread(t, c, 20)
		return got["light"] > 0 && got["heavy"] > 0
	})
	registerBackend(t, rc, heavy, 300, "a")
	const n = 2000
	chi2 := func(got map[string]int) float64 {
		el, eh := n*0.25, n*0.75
		dl, dh := float64(got["light"])-el, float64(got["heavy"])-eh
		return dl*dl/el + dh*dh/eh
	}
	var last map[string]int
	testutil.Eventually(t, 60*time.Second, "traffic 1:3", func() bool {
		last = spread(t, c, n)
		return chi2(last) < 10.83
	})
	if share := float64(last["heavy"]) / n; math.Abs(share-0.75) > 0.05 {
		t.Fatalf("heavy's share %.3f, want 0.75", share)
	}
}

// With ACLs, an ADS stream reads only what its token may: asking for a
// service it may not read ends the stream with PermissionDenied, a bad
// token is refused, and a NACK is counted on the server.
func TestXDSACLAndNACK(t *testing.T) {
	auditPath := filepath.Join(t.TempDir(), "audit.log")
	srv, _, mgmt := aclServer(t, func(c *server.Config) { c.XDS.Addr = "127.0.0.1:0"; c.AuditLog = auditPath })
	mustPolicy(t, srv, mgmt, "read-orders", "read service default/orders")
	token := mustToken(t, srv, mgmt, &beaconv1.AclToken{Policies: []string{"read-orders"}})
	cc, err := grpc.NewClient(srv.XDSAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ads := discoveryv3.NewAggregatedDiscoveryServiceClient(cc)
	ask := func(secret, name, nack string) error {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if secret != "" {
			ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+secret)
		}
		st, err := ads.StreamAggregatedResources(ctx)
		if err != nil {
			return err
		}
		req := &discoveryv3.DiscoveryRequest{Node: nodeOf("acl-test"), TypeUrl: "type.googleapis.com/envoy.config.listener.v3.Listener", ResourceNames: []string{name}}
		if nack != "" {
			req.ErrorDetail = &rpcstatus.Status{Message: nack}
		}
		if err := st.Send(req); err != nil && !errors.Is(err, io.EOF) {
			return err
		}
		_, err = st.Recv() // a refused stream's status (Send may see only EOF)
		return err
	}
	if err := ask(token, "payments", ""); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("asking for an unreadable service: %v, want PermissionDenied", err)
	}
	if err := ask(token, "*", ""); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("asking for every listener (\"*\"): %v, want PermissionDenied", err)
	}
	if err := ask("bct_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "orders", ""); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("a bad token: %v, want Unauthenticated", err)
	}
	// Each refusal is in the audit log, as a refused API call is, and
	// counted.
	testutil.Eventually(t, 30*time.Second, "the refusals audited", func() bool {
		b, _ := os.ReadFile(auditPath)
		log := string(b)
		return strings.Contains(log, `"resource":"service:default/payments"`) && strings.Contains(log, `needs service:read on \"default/payments\"`) &&
			strings.Count(log, "AggregatedDiscoveryService/StreamAggregatedResources") >= 3
	})
	for code, want := range map[string]float64{"PermissionDenied": 2, "Unauthenticated": 1} {
		if v, _ := testutil.Metric(t, srv.Addr(), `beacon_xds_refused_streams_total{code="`+code+`"}`); v != want {
			t.Errorf("beacon_xds_refused_streams_total{code=%q} = %v, want %v", code, v, want)
		}
	}
	// A readable name that no service has yet: the stream stays open
	// (nothing to send), so ask with a deadline and expect it.
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	st, err := ads.StreamAggregatedResources(metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token))
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&discoveryv3.DiscoveryRequest{Node: nodeOf("acl-test"), TypeUrl: "type.googleapis.com/envoy.config.listener.v3.Listener", ResourceNames: []string{"orders"},
		ErrorDetail: &rpcstatus.Status{Message: "test: refusing on purpose"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Recv(); status.Code(err) == codes.PermissionDenied || status.Code(err) == codes.Unauthenticated {
		t.Fatalf("a readable name: %v", err)
	}
	testutil.Eventually(t, 30*time.Second, "the NACK counted", func() bool {
		v, ok := testutil.Metric(t, srv.Addr(), `beacon_xds_nacks_total{type="Listener"}`)
		return ok && v >= 1
	})
}

func nodeOf(id string) *corev3.Node { return &corev3.Node{Id: id} }

// A client in zone a stays in zone a while it has an endpoint there, and
// fails over to the other zone when that one drains.
func TestXDSPrefersTheClientsZone(t *testing.T) {
	srv, rc := startXDS(t)
	a1, b1, b2 := startBackend(t, "a1"), startBackend(t, "b1"), startBackend(t, "b2")
	registerBackend(t, rc, a1, 100, "a")
	registerBackend(t, rc, b1, 100, "b")
	registerBackend(t, rc, b2, 100, "b")
	c := xdsClient(t, srv, "orders") // its node is in zone a
	testutil.Eventually(t, 60*time.Second, "every call in zone a", func() bool {
		return spread(t, c, 30)["a1"] == 30
	})
	if _, err := rc.SetStatus(context.Background(), connect.NewRequest(&beaconv1.SetStatusRequest{Service: "orders", Id: "a1", Status: beaconv1.Status_STATUS_DRAINING})); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 60*time.Second, "calls fail over to zone b", func() bool {
		got := spread(t, c, 30)
		return got["a1"] == 0 && got["b1"] > 0 && got["b2"] > 0
	})
}

// An instance whose owner dies (its session is no longer kept alive) leaves
// the registry when the session's TTL runs out, and the xDS client's calls
// go to the others without one failing.
func TestXDSInstanceOfADeadOwnerLeaves(t *testing.T) {
	srv, _ := startXDS(t)
	rc := regClient(srv, "")
	ctx := context.Background()
	live, doomed := startBackend(t, "live"), startBackend(t, "doomed")
	registerBackend(t, rc, live, 100, "a")
	sess, err := rc.CreateSession(ctx, connect.NewRequest(&beaconv1.CreateSessionRequest{Ttl: durationpb.New(2 * time.Second)}))
	if err != nil {
		t.Fatal(err)
	}
	id := sess.Msg.GetSessionId()
	host, port, _ := net.SplitHostPort(doomed.addr)
	var p int32
	fmt.Sscan(port, &p)
	if _, err := rc.Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{SessionId: id, Instance: &beaconv1.Instance{
		Service: "orders", Id: "doomed", Address: host, Port: p, Zone: "a"}})); err != nil {
		t.Fatal(err)
	}
	alive := make(chan struct{})
	kept := make(chan struct{})
	go func() { // the owner, until it dies
		defer close(kept)
		tick := time.NewTicker(300 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-alive:
				return
			case <-tick.C:
				rc.KeepAlive(ctx, connect.NewRequest(&beaconv1.KeepAliveRequest{SessionId: id}))
			}
		}
	}()
	c := xdsClient(t, srv, "orders")
	testutil.Eventually(t, 60*time.Second, "both serve", func() bool {
		got := spread(t, c, 30)
		return got["live"] > 0 && got["doomed"] > 0
	})
	close(alive) // the owner dies: no more keepalives, and its server goes
	<-kept
	doomed.srv.Stop()
	// A call in flight on the dead server fails (gRPC retries only what
	// never reached the wire, and beacon sets no retry policy for
	// non-idempotent calls); then the client moves on, and once the
	// session expired every call goes to live.
	failed := 0
	testutil.Eventually(t, 60*time.Second, "every call on live", func() bool {
		ok := 0
		for range 20 {
			cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			resp, err := c.UnaryCall(cctx, &testgrpc.SimpleRequest{}, grpc.WaitForReady(true))
			cancel()
			switch {
			case err != nil:
				failed++
			case resp.GetHostname() == "live":
				ok++
			}
		}
		return ok == 20
	})
	t.Logf("calls failed while the client learned of the dead instance: %d", failed)
}

// A token deleted while its ADS stream is open: the stream's next request
// ends it.
func TestXDSDeletedTokenEndsItsStream(t *testing.T) {
	srv, _, mgmt := aclServer(t, func(c *server.Config) { c.XDS.Addr = "127.0.0.1:0" })
	mustPolicy(t, srv, mgmt, "read-orders", "read service default/orders")
	made, err := aclClient(srv, mgmt, connect.WithGRPC()).CreateToken(context.Background(), connect.NewRequest(&beaconv1.CreateTokenRequest{Token: &beaconv1.AclToken{Policies: []string{"read-orders"}}}))
	if err != nil {
		t.Fatal(err)
	}
	cc, err := grpc.NewClient(srv.XDSAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	st, err := discoveryv3.NewAggregatedDiscoveryServiceClient(cc).StreamAggregatedResources(
		metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+made.Msg.GetToken().GetSecretId()))
	if err != nil {
		t.Fatal(err)
	}
	listeners := "type.googleapis.com/envoy.config.listener.v3.Listener"
	if err := st.Send(&discoveryv3.DiscoveryRequest{Node: nodeOf("del"), TypeUrl: listeners, ResourceNames: []string{"orders"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := aclClient(srv, mgmt, connect.WithGRPC()).DeleteToken(context.Background(), connect.NewRequest(&beaconv1.DeleteTokenRequest{AccessorId: made.Msg.GetToken().GetAccessorId()})); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "the server forgot the token", func() bool {
		_, err := regClient(srv, made.Msg.GetToken().GetSecretId()).ListServices(context.Background(), connect.NewRequest(&beaconv1.ListServicesRequest{}))
		return connect.CodeOf(err) == connect.CodeUnauthenticated
	})
	if err := st.Send(&discoveryv3.DiscoveryRequest{Node: nodeOf("del"), TypeUrl: listeners, ResourceNames: []string{"orders", "payments.x"}}); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	for {
		_, err := st.Recv()
		if err != nil {
			if status.Code(err) != codes.Unauthenticated {
				t.Fatalf("the stream ended with %v, want Unauthenticated", err)
			}
			return
		}
	}
}

// Per-service policies (SetServicePolicy) compiled into xDS, and followed
// by grpc-go's own xDS client.

// setPolicy sets orders' policy through the API.
func setPolicy(t *testing.T, srv *server.Server, req *beaconv1.SetServicePolicyRequest) *beaconv1.ServiceConfig {
	t.Helper()
	req.Service = "orders"
	resp, err := regClient(srv, "").SetServicePolicy(context.Background(), connect.NewRequest(req))
	if err != nil {
		t.Fatalf("SetServicePolicy(%v) = %v", req, err)
	}
	return resp.Msg.GetConfig()
}

// waitXDS reads the resource name of typeURL from srv's ADS, as an xDS
// client does (a request, then an ACK of every response), until cond
// holds for it, and returns it.
func waitXDS[T proto.Message](t *testing.T, srv *server.Server, typeURL, name string, cond func(T) bool) T {
	t.Helper()
	cc, err := grpc.NewClient(srv.XDSAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	st, err := discoveryv3.NewAggregatedDiscoveryServiceClient(cc).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	req := &discoveryv3.DiscoveryRequest{Node: nodeOf("policy-test"), TypeUrl: typeURL, ResourceNames: []string{name}}
	var last T
	for {
		if err := st.Send(req); err != nil {
			t.Fatalf("ADS Send: %v", err)
		}
		resp, err := st.Recv()
		if err != nil {
			t.Fatalf("waiting for a %s of %s that holds the condition (last: %v): %v", typeURL, name, last, err)
		}
		for _, a := range resp.GetResources() {
			m, err := a.UnmarshalNew()
			if err != nil {
				t.Fatal(err)
			}
			if last = m.(T); cond(last) {
				return last
			}
		}
		req.VersionInfo, req.ResponseNonce = resp.GetVersionInfo(), resp.GetNonce()
	}
}

func waitCluster(t *testing.T, srv *server.Server, cond func(*clusterv3.Cluster) bool) *clusterv3.Cluster {
	t.Helper()
	return waitXDS(t, srv, "type.googleapis.com/envoy.config.cluster.v3.Cluster", "orders", cond)
}

func waitRoute(t *testing.T, srv *server.Server, cond func(*routev3.RouteConfiguration) bool) *routev3.RouteConfiguration {
	t.Helper()
	return waitXDS(t, srv, "type.googleapis.com/envoy.config.route.v3.RouteConfiguration", "orders", cond)
}

// routeAction is the action of the route's one route.
func routeAction(rc *routev3.RouteConfiguration) *routev3.RouteAction {
	return rc.GetVirtualHosts()[0].GetRoutes()[0].GetRoute()
}

// xdsNACKs sums beacon_xds_nacks_total over its types.
func xdsNACKs(t *testing.T, srv *server.Server) float64 {
	t.Helper()
	resp, err := http.Get("http://" + srv.Addr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	sum := 0.0
	for _, m := range regexp.MustCompile(`(?m)^beacon_xds_nacks_total\{[^}]*\} (\S+)$`).FindAllSubmatch(b, -1) {
		v, _ := strconv.ParseFloat(string(m[1]), 64)
		sum += v
	}
	return sum
}

// call makes one call, as user (the x-user header) when not empty.
func call(c testgrpc.TestServiceClient, user string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if user != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "x-user", user)
	}
	resp, err := c.UnaryCall(ctx, &testgrpc.SimpleRequest{}, grpc.WaitForReady(true))
	return resp.GetHostname(), err
}

// Ring hash on a header, set while a client is connected: every call
// with the same value goes to one instance, different values spread; and
// back to round robin, one value's calls spread again.
func TestXDSRingHashKeepsAHeaderValueOnOneInstance(t *testing.T) {
	srv, rc := startXDS(t)
	for _, name := range []string{"r1", "r2", "r3"} {
		registerBackend(t, rc, startBackend(t, name), 100, "a")
	}
	c := xdsClient(t, srv, "orders")
	hosts := func(user string, n int) map[string]int {
		got := map[string]int{}
		for range n {
			h, err := call(c, user)
			if err != nil {
				t.Fatalf("UnaryCall as %s: %v", user, err)
			}
			got[h]++
		}
		return got
	}
	// Round robin: one user's calls go everywhere.
	testutil.Eventually(t, 60*time.Second, "alice's calls on every instance (round robin)", func() bool {
		return len(hosts("alice", 30)) == 3
	})

	cfg := setPolicy(t, srv, &beaconv1.SetServicePolicyRequest{LoadBalancing: &beaconv1.LoadBalancing{
		Policy: beaconv1.LoadBalancingPolicy_LOAD_BALANCING_POLICY_RING_HASH, HashHeader: "x-user", MaxRingSize: 4096}})
	if got := cfg.GetLoadBalancing().GetHashHeader(); got != "x-user" {
		t.Fatalf("SetServicePolicy returned hash_header %q, want x-user", got)
	}
	cl := waitCluster(t, srv, func(c *clusterv3.Cluster) bool { return c.GetLbPolicy() == clusterv3.Cluster_RING_HASH })
	if lp := cl.GetLoadBalancingPolicy().GetPolicies(); len(lp) != 1 || lp[0].GetTypedExtensionConfig().GetName() != "envoy.load_balancing_policies.ring_hash" {
		t.Errorf("cluster load_balancing_policy = %v, want ring_hash alone", lp)
	}
	hp := routeAction(waitRoute(t, srv, func(r *routev3.RouteConfiguration) bool { return len(routeAction(r).GetHashPolicy()) > 0 })).GetHashPolicy()
	if h := hp[0].GetHeader().GetHeaderName(); len(hp) != 1 || h != "x-user" {
		t.Errorf("route hash_policy = %v, want one on header x-user", hp)
	}

	users := make([]string, 20)
	for i := range users {
		users[i] = fmt.Sprintf("user-%d", i)
	}
	placed := map[string]string{} // user -> its instance
	testutil.Eventually(t, 60*time.Second, "each user's calls on one instance, the users on several", func() bool {
		if n := xdsNACKs(t, srv); n != 0 {
			t.Fatalf("beacon_xds_nacks_total = %v: grpc-go refused the ring hash resources", n)
		}
		clear(placed)
		used := map[string]bool{}
		for _, u := range users {
			h := hosts(u, 5)
			if len(h) != 1 {
				return false
			}
			for name := range h {
				placed[u], used[name] = name, true
			}
		}
		return len(used) >= 2
	})
	// And it stays so: the same users land where they did.
	for _, u := range users {
		if h := hosts(u, 10); h[placed[u]] != 10 {
			t.Fatalf("%s's calls = %v, want all 10 on %s", u, h, placed[u])
		}
	}

	// Back to the defaults while connected: round robin again.
	setPolicy(t, srv, &beaconv1.SetServicePolicyRequest{LoadBalancing: &beaconv1.LoadBalancing{}})
	testutil.Eventually(t, 60*time.Second, "alice's calls on every instance again", func() bool {
		return len(hosts("alice", 30)) == 3
	})
}

// Least request: grpc-go takes it (no NACK) and follows it: with one
// instance holding every call it gets, the others take the new calls,
// where round robin would keep sending it a third of them.
func TestXDSLeastRequestAvoidsTheBusyInstance(t *testing.T) {
	srv, rc := startXDS(t)
	busy := startBackend(t, "busy")
	for _, b := range []*backend{busy, startBackend(t, "l1"), startBackend(t, "l2")} {
		registerBackend(t, rc, b, 100, "a")
	}
	setPolicy(t, srv, &beaconv1.SetServicePolicyRequest{LoadBalancing: &beaconv1.LoadBalancing{
		Policy: beaconv1.LoadBalancingPolicy_LOAD_BALANCING_POLICY_LEAST_REQUEST, ChoiceCount: 10}})
	cl := waitCluster(t, srv, func(c *clusterv3.Cluster) bool { return c.GetLbPolicy() == clusterv3.Cluster_LEAST_REQUEST })
	if n := cl.GetLeastRequestLbConfig().GetChoiceCount().GetValue(); n != 10 {
		t.Errorf("least_request_lb_config.choice_count = %d, want 10", n)
	}
	if lp := cl.GetLoadBalancingPolicy().GetPolicies(); len(lp) != 2 || lp[0].GetTypedExtensionConfig().GetName() != "envoy.load_balancing_policies.least_request" ||
		lp[1].GetTypedExtensionConfig().GetName() != "envoy.load_balancing_policies.wrr_locality" {
		t.Errorf("cluster load_balancing_policy = %v, want least_request, then wrr_locality as the fallback", lp)
	}
	c := xdsClient(t, srv, "orders")
	// Every instance connected first (least request sees only ready ones).
	testutil.Eventually(t, 60*time.Second, "calls on every instance", func() bool {
		return len(spread(t, c, 30)) == 3
	})
	if n := xdsNACKs(t, srv); n != 0 {
		t.Fatalf("beacon_xds_nacks_total = %v, want 0 (grpc-go refused the least request cluster)", n)
	}

	release := make(chan struct{})
	arrived := make(chan struct{}, 100)
	busy.setOnCall(func(ctx context.Context) error {
		arrived <- struct{}{}
		select {
		case <-release:
		case <-ctx.Done():
		}
		return nil
	})
	var held sync.WaitGroup
	defer func() {
		close(release)
		held.Wait()
	}()
	// One call at a time; one that reaches busy stays there, in flight.
	const n = 60
	onBusy := 0
	for range n {
		done := make(chan error, 1)
		held.Add(1)
		go func() {
			defer held.Done()
			_, err := call(c, "")
			done <- err
		}()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("UnaryCall: %v", err)
			}
		case <-arrived:
			onBusy++
		}
	}
	// Each call samples 10 endpoints: it reaches busy only when every
	// sample is busy (3^-10) or while busy holds no more calls than the
	// others (its first call). Round robin sends it about 20 of the 60.
	if onBusy > 2 {
		t.Fatalf("%d of %d calls reached the instance holding its calls, want at most 2", onBusy, n)
	}
}

// A retry policy on UNAVAILABLE: a call an instance fails with
// UNAVAILABLE is retried, and the caller sees a success; without the
// policy it sees the failure.
func TestXDSRetryPolicyRetriesUnavailable(t *testing.T) {
	srv, rc := startXDS(t)
	flaky := startBackend(t, "flaky")
	var failNext atomic.Int32
	failed := make(chan struct{}, 16)
	flaky.setOnCall(func(context.Context) error {
		for {
			n := failNext.Load()
			if n <= 0 {
				return nil
			}
			if failNext.CompareAndSwap(n, n-1) {
				failed <- struct{}{} // before the answer leaves
				return status.Error(codes.Unavailable, "flaky: failing this call")
			}
		}
	})
	for _, b := range []*backend{flaky, startBackend(t, "s1"), startBackend(t, "s2")} {
		registerBackend(t, rc, b, 100, "a")
	}
	c := xdsClient(t, srv, "orders")
	testutil.Eventually(t, 60*time.Second, "calls on every instance", func() bool {
		return len(spread(t, c, 30)) == 3
	})
	// oneFailure has flaky fail one call and calls until it did; it
	// returns what the caller of that call saw.
	oneFailure := func() error {
		t.Helper()
		failNext.Store(1)
		for range 300 {
			_, err := call(c, "")
			select {
			case <-failed:
				return err
			default:
			}
			if err != nil {
				t.Fatalf("a call failed that flaky did not fail: %v", err)
			}
		}
		t.Fatal("flaky got none of 300 calls")
		return nil
	}
	if err := oneFailure(); status.Code(err) != codes.Unavailable {
		t.Fatalf("without a retry policy the caller saw %v, want flaky's UNAVAILABLE", err)
	}

	setPolicy(t, srv, &beaconv1.SetServicePolicyRequest{RetryPolicy: &beaconv1.RetryPolicy{
		RetryOn: []string{"unavailable"}, NumRetries: 2, BaseBackoff: durationpb.New(5 * time.Millisecond)}})
	rp := routeAction(waitRoute(t, srv, func(r *routev3.RouteConfiguration) bool { return routeAction(r).GetRetryPolicy() != nil })).GetRetryPolicy()
	if rp.GetRetryOn() != "unavailable" || rp.GetNumRetries().GetValue() != 2 || rp.GetRetryBackOff().GetBaseInterval().AsDuration() != 5*time.Millisecond ||
		rp.GetRetryBackOff().GetMaxInterval().AsDuration() != 50*time.Millisecond {
		t.Errorf("route retry_policy = %v, want unavailable, 2 retries, backoff 5ms to 50ms", rp)
	}
	testutil.Eventually(t, 60*time.Second, "a failed call retried into a success", func() bool {
		if n := xdsNACKs(t, srv); n != 0 {
			t.Fatalf("beacon_xds_nacks_total = %v: grpc-go refused the retry policy", n)
		}
		return oneFailure() == nil
	})
	for range 5 {
		if err := oneFailure(); err != nil {
			t.Fatalf("with the retry policy the caller saw %v, want a success", err)
		}
	}
	if n := xdsNACKs(t, srv); n != 0 {
		t.Fatalf("beacon_xds_nacks_total = %v, want 0", n)
	}
}

// Outlier detection by failure percentage: an instance failing every
// call is ejected, and calls stop reaching it.
func TestXDSOutlierDetectionEjectsAFailingInstance(t *testing.T) {
	srv, rc := startXDS(t)
	bad := startBackend(t, "bad")
	bad.setOnCall(func(context.Context) error { return status.Error(codes.Internal, "bad: failing every call") })
	for _, b := range []*backend{bad, startBackend(t, "g1"), startBackend(t, "g2")} {
		registerBackend(t, rc, b, 100, "a")
	}
	setPolicy(t, srv, &beaconv1.SetServicePolicyRequest{OutlierDetection: &beaconv1.OutlierDetection{
		Interval: durationpb.New(time.Second), BaseEjectionTime: durationpb.New(time.Hour), MaxEjectionPercent: 50,
		FailurePercentageThreshold: 50, FailurePercentageMinimumHosts: 3, FailurePercentageRequestVolume: 5}})
	od := waitCluster(t, srv, func(c *clusterv3.Cluster) bool { return c.GetOutlierDetection().GetFailurePercentageThreshold() != nil }).GetOutlierDetection()
	if od.GetFailurePercentageThreshold().GetValue() != 50 || od.GetEnforcingFailurePercentage().GetValue() != 100 ||
		od.GetFailurePercentageMinimumHosts().GetValue() != 3 || od.GetFailurePercentageRequestVolume().GetValue() != 5 ||
		od.GetInterval().AsDuration() != time.Second || od.GetBaseEjectionTime().AsDuration() != time.Hour || od.GetMaxEjectionPercent().GetValue() != 50 {
		t.Errorf("cluster outlier_detection = %v", od)
	}
	c := xdsClient(t, srv, "orders")
	failures := 0
	testutil.Eventually(t, 60*time.Second, "bad ejected: 30 calls, none failed", func() bool {
		if n := xdsNACKs(t, srv); n != 0 {
			t.Fatalf("beacon_xds_nacks_total = %v: grpc-go refused the outlier detection", n)
		}
		got := map[string]int{}
		failed := 0
		for range 30 {
			h, err := call(c, "")
			switch {
			case status.Code(err) == codes.Internal:
				failed++
			case err != nil:
				t.Fatalf("UnaryCall: %v", err)
			default:
				got[h]++
			}
		}
		failures += failed
		return failed == 0 && got["g1"] > 0 && got["g2"] > 0
	})
	if failures == 0 {
		t.Fatal("no call failed: bad never served, so its ejection proves nothing")
	}
	if n := xdsNACKs(t, srv); n != 0 {
		t.Fatalf("beacon_xds_nacks_total = %v, want 0", n)
	}
}

// SetServicePolicy refuses every field out of bounds with InvalidArgument
// naming it, and a refused request changes nothing; a request sets only
// the parts it gives, and the threshold stays SetServiceConfig's.
func TestServiceConfigPolicyValidationNamesTheField(t *testing.T) {
	srv := servertest.Start(t, servertest.Config(t, ""))
	rc := regClient(srv, "")
	ctx := context.Background()
	get := func() *beaconv1.ServiceConfig {
		t.Helper()
		resp, err := rc.GetServiceConfig(ctx, connect.NewRequest(&beaconv1.GetServiceConfigRequest{Service: "orders"}))
		if err != nil {
			t.Fatalf("GetServiceConfig = %v", err)
		}
		return resp.Msg.GetConfig()
	}
	if c := get(); !c.GetProtectionThresholdDefault() || c.GetRetryPolicy() != nil || c.GetLoadBalancing().GetPolicy() != beaconv1.LoadBalancingPolicy_LOAD_BALANCING_POLICY_ROUND_ROBIN {
		t.Fatalf("GetServiceConfig of a service never configured = %v, want the defaults", c)
	}
	if _, err := rc.SetServiceConfig(ctx, connect.NewRequest(&beaconv1.SetServiceConfigRequest{Service: "orders", ProtectionThreshold: 0.5})); err != nil {
		t.Fatal(err)
	}
	setPolicy(t, srv, &beaconv1.SetServicePolicyRequest{
		LoadBalancing: &beaconv1.LoadBalancing{Policy: beaconv1.LoadBalancingPolicy_LOAD_BALANCING_POLICY_RING_HASH, HashHeader: "x-user"},
		RetryPolicy:   &beaconv1.RetryPolicy{RetryOn: []string{"unavailable", "resource-exhausted"}, NumRetries: 3},
	})
	// Only the outlier detection: the rest stays.
	setPolicy(t, srv, &beaconv1.SetServicePolicyRequest{OutlierDetection: &beaconv1.OutlierDetection{FailurePercentageThreshold: 20}})
	before := get()
	if before.GetProtectionThreshold() != 0.5 || before.GetLoadBalancing().GetHashHeader() != "x-user" || len(before.GetRetryPolicy().GetRetryOn()) != 2 ||
		before.GetOutlierDetection().GetFailurePercentageThreshold() != 20 {
		t.Fatalf("GetServiceConfig = %v, want the threshold, ring hash, the retries and the outlier detection", before)
	}

	lb := func(p beaconv1.LoadBalancingPolicy, f func(*beaconv1.LoadBalancing)) *beaconv1.SetServicePolicyRequest {
		m := &beaconv1.LoadBalancing{Policy: p}
		f(m)
		return &beaconv1.SetServicePolicyRequest{LoadBalancing: m}
	}
	lr, rh, rr := beaconv1.LoadBalancingPolicy_LOAD_BALANCING_POLICY_LEAST_REQUEST, beaconv1.LoadBalancingPolicy_LOAD_BALANCING_POLICY_RING_HASH, beaconv1.LoadBalancingPolicy_LOAD_BALANCING_POLICY_ROUND_ROBIN
	retry := func(r *beaconv1.RetryPolicy) *beaconv1.SetServicePolicyRequest {
		return &beaconv1.SetServicePolicyRequest{RetryPolicy: r}
	}
	od := func(o *beaconv1.OutlierDetection) *beaconv1.SetServicePolicyRequest {
		return &beaconv1.SetServicePolicyRequest{OutlierDetection: o}
	}
	for _, c := range []struct {
		req   *beaconv1.SetServicePolicyRequest
		field string // the error names it, and its limit
		limit string
	}{
		{lb(lr, func(m *beaconv1.LoadBalancing) { m.ChoiceCount = 11 }), "load_balancing.choice_count", "between 2 and 10"},
		{lb(lr, func(m *beaconv1.LoadBalancing) { m.ChoiceCount = 1 }), "load_balancing.choice_count", "between 2 and 10"},
		{lb(rr, func(m *beaconv1.LoadBalancing) { m.ChoiceCount = 3 }), "load_balancing.choice_count", "least_request only"},
		{lb(rh, func(*beaconv1.LoadBalancing) {}), "load_balancing.hash_header", "required"},
		{lb(rh, func(m *beaconv1.LoadBalancing) { m.HashHeader = "X-User" }), "load_balancing.hash_header", "metadata key"},
		{lb(rh, func(m *beaconv1.LoadBalancing) { m.HashHeader = "x-id-bin" }), "load_balancing.hash_header", "-bin"},
		{lb(rh, func(m *beaconv1.LoadBalancing) { m.HashHeader, m.MaxRingSize = "x-user", 8<<20+1 }), "load_balancing.max_ring_size", "between 1 and 8388608"},
		{lb(rh, func(m *beaconv1.LoadBalancing) { m.HashHeader, m.MinRingSize, m.MaxRingSize = "x-user", 4096, 1024 }), "load_balancing.min_ring_size", "at most max_ring_size"},
		{lb(lr, func(m *beaconv1.LoadBalancing) { m.HashHeader = "x-user" }), "load_balancing.hash_header", "ring_hash only"},
		{lb(beaconv1.LoadBalancingPolicy(9), func(*beaconv1.LoadBalancing) {}), "load_balancing.policy", "ROUND_ROBIN, LEAST_REQUEST or RING_HASH"},
		{retry(&beaconv1.RetryPolicy{RetryOn: []string{"not-found"}}), "retry_policy.retry_on", "cancelled, deadline-exceeded, internal, resource-exhausted, unavailable"},
		{retry(&beaconv1.RetryPolicy{RetryOn: []string{"unavailable", "unavailable"}}), "retry_policy.retry_on", "twice"},
		{retry(&beaconv1.RetryPolicy{NumRetries: 2}), "retry_policy.retry_on", "required"},
		{retry(&beaconv1.RetryPolicy{RetryOn: []string{"unavailable"}, NumRetries: 5}), "retry_policy.num_retries", "between 1 and 4"},
		{retry(&beaconv1.RetryPolicy{RetryOn: []string{"unavailable"}, BaseBackoff: durationpb.New(time.Microsecond)}), "retry_policy.base_backoff", "between 1ms and 30s"},
		{retry(&beaconv1.RetryPolicy{RetryOn: []string{"unavailable"}, BaseBackoff: durationpb.New(time.Second), MaxBackoff: durationpb.New(time.Millisecond)}), "retry_policy.max_backoff", "between base_backoff (1s) and 5m0s"},
		{od(&beaconv1.OutlierDetection{Interval: durationpb.New(-time.Second)}), "outlier_detection.interval", "negative"},
		{od(&beaconv1.OutlierDetection{Interval: durationpb.New(time.Millisecond)}), "outlier_detection.interval", "between 100ms and 1h0m0s"},
		{od(&beaconv1.OutlierDetection{BaseEjectionTime: durationpb.New(2 * time.Hour)}), "outlier_detection.base_ejection_time", "between 100ms and 1h0m0s"},
		{od(&beaconv1.OutlierDetection{MaxEjectionPercent: 101}), "outlier_detection.max_ejection_percent", "between 1 and 100"},
		{od(&beaconv1.OutlierDetection{ConsecutiveFailures: 1001}), "outlier_detection.consecutive_failures", "between 1 and 1000"},
		{od(&beaconv1.OutlierDetection{FailurePercentageThreshold: 101}), "outlier_detection.failure_percentage_threshold", "between 1 and 100"},
		{od(&beaconv1.OutlierDetection{FailurePercentageMinimumHosts: 3}), "outlier_detection.failure_percentage_minimum_hosts", "only with failure_percentage_threshold"},
		// A good part beside a bad one: neither is written.
		{&beaconv1.SetServicePolicyRequest{LoadBalancing: &beaconv1.LoadBalancing{Policy: lr}, RetryPolicy: &beaconv1.RetryPolicy{RetryOn: []string{"unavailable"}, NumRetries: 9}}, "retry_policy.num_retries", "between 1 and 4"},
	} {
		c.req.Service = "orders"
		_, err := rc.SetServicePolicy(ctx, connect.NewRequest(c.req))
		if connect.CodeOf(err) != connect.CodeInvalidArgument || !strings.Contains(err.Error(), c.field) || !strings.Contains(err.Error(), c.limit) {
			t.Errorf("SetServicePolicy(%v) = %v, want InvalidArgument naming %s and %q", c.req, err, c.field, c.limit)
		}
	}
	if _, err := rc.SetServicePolicy(ctx, connect.NewRequest(&beaconv1.SetServicePolicyRequest{Service: "Orders!"})); connect.CodeOf(err) != connect.CodeInvalidArgument || !strings.Contains(err.Error(), "service") {
		t.Errorf("SetServicePolicy(a bad service name) = %v, want InvalidArgument naming service", err)
	}
	if after := get(); !proto.Equal(after, before) {
		t.Errorf("refused requests changed the settings:\nbefore %v\nafter  %v", before, after)
	}

	// The Connect protocol's JSON, durations the Go way included; and the
	// threshold's own call leaves the policies alone.
	if code, body := post(t, srv, "SetServicePolicy", `{"service":"orders","retry_policy":{"retry_on":["internal"],"base_backoff":"10ms"}}`); code != http.StatusOK || !strings.Contains(body, `"baseBackoff":"0.010s"`) {
		t.Fatalf("SetServicePolicy(JSON) = %d %s", code, body)
	}
	if _, err := rc.SetServiceConfig(ctx, connect.NewRequest(&beaconv1.SetServiceConfigRequest{Service: "orders", UseDefault: true})); err != nil {
		t.Fatal(err)
	}
	if c := get(); !c.GetProtectionThresholdDefault() || c.GetRetryPolicy().GetRetryOn()[0] != "internal" || c.GetLoadBalancing().GetHashHeader() != "x-user" {
		t.Errorf("after the threshold's reset: %v, want the server's threshold and the policies kept", c)
	}
}

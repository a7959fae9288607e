package server_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"testing"
	"time"

	"connectrpc.com/connect"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/xds"
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
// UnaryCall with its own name.
type backend struct {
	testgrpc.UnimplementedTestServiceServer
	name string
	srv  *grpc.Server
	addr string
}

func (b *backend) UnaryCall(context.Context, *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	return &testgrpc.SimpleResponse{Hostname: b.name}, nil
}

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
	srv, _, mgmt := aclServer(t, func(c *server.Config) { c.XDS.Addr = "127.0.0.1:0" })
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

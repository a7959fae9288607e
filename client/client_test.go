package client_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/google/go-cmp/cmp"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
)

func newClient(t *testing.T, addrs ...string) *client.Client {
	t.Helper()
	c, err := client.New(addrs)
	if err != nil {
		t.Fatalf("client.New: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func ids(s *registry.Snapshot) []string {
	var out []string
	for _, in := range s.Instances {
		out = append(out, in.ID)
	}
	return out
}

func TestRegisterListDeregister(t *testing.T) {
	srv := testutil.StartBeacon(t)
	c := newClient(t, srv.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	sess, err := c.NewSession(ctx)
	if err != nil {
		t.Fatalf("NewSession: %v", err)
	}
	defer sess.Close(ctx)
	if _, err := sess.Register(ctx, registry.Instance{Service: "orders", ID: "o-1", Address: "127.0.0.1", Port: 9001, Tags: []string{"v1"}}); err != nil {
		t.Fatalf("Session.Register: %v", err)
	}
	if _, err := c.Register(ctx, registry.Instance{Service: "orders", ID: "o-2", Address: "127.0.0.1", Port: 9002, Status: registry.StatusStarting}); err != nil {
		t.Fatalf("Register: %v", err)
	}
	snap, err := c.Instances(ctx, "orders")
	if err != nil {
		t.Fatalf("Instances: %v", err)
	}
	if got, want := ids(snap), []string{"o-1"}; !cmp.Equal(got, want) {
		t.Errorf("Instances(orders) = %v, want %v (STARTING is not routable)", got, want)
	}
	in := snap.Instances[0]
	if in.SessionID != sess.ID() || in.Weight != registry.DefaultWeight || in.Health != registry.HealthPassing || in.Revision == 0 {
		t.Errorf("Instances(orders)[0] = %+v, want session %d, default weight and health, a revision", in, sess.ID())
	}
	all, err := c.Instances(ctx, "orders", client.All())
	if err != nil {
		t.Fatalf("Instances(All): %v", err)
	}
	if got, want := ids(all), []string{"o-1", "o-2"}; !cmp.Equal(got, want) {
		t.Errorf("Instances(orders, All) = %v, want %v", got, want)
	}
	svcs, err := c.Services(ctx)
	if err != nil {
		t.Fatalf("Services: %v", err)
	}
	if len(svcs) != 1 || svcs[0].Name != "orders" || svcs[0].Instances != 2 || svcs[0].Routable != 1 {
		t.Errorf("Services() = %+v, want orders with 2 instances, 1 routable", svcs)
	}
	found, err := c.Deregister(ctx, "orders", "o-2")
	if err != nil || !found {
		t.Fatalf("Deregister(o-2) = %v, %v; want true, nil", found, err)
	}
	found, err = c.Deregister(ctx, "orders", "o-2")
	if err != nil || found {
		t.Fatalf("second Deregister(o-2) = %v, %v; want false, nil", found, err)
	}
}

func TestNamespacesIsolate(t *testing.T) {
	srv := testutil.StartBeacon(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	prod, err := client.New([]string{srv.Addr()}, client.WithNamespace("prod"))
	if err != nil {
		t.Fatal(err)
	}
	defer prod.Close()
	dev := newClient(t, srv.Addr())
	if _, err := prod.Register(ctx, registry.Instance{Service: "orders", ID: "p", Address: "10.0.0.1", Port: 1}); err != nil {
		t.Fatalf("Register(prod): %v", err)
	}
	snap, err := dev.Instances(ctx, "orders")
	if err != nil || len(snap.Instances) != 0 {
		t.Errorf("default namespace sees %v, %v; want nothing", snap, err)
	}
	snap, err = dev.Instances(ctx, "orders", client.InNamespace("prod"))
	if err != nil || len(snap.Instances) != 1 {
		t.Errorf("Instances(InNamespace(prod)) = %v, %v; want 1 instance", snap, err)
	}
}

func TestCloseSessionRemovesInstancesAtOnce(t *testing.T) {
	srv := testutil.StartBeacon(t)
	c := newClient(t, srv.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	w, err := c.Watch(ctx, []string{"orders"})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	// With an hour's TTL, the instances leaving within the test's context
	// can only be the revoke's doing, never an expiry.
	sess, err := c.NewSession(ctx, client.WithTTL(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"a", "b"} {
		if _, err := sess.Register(ctx, registry.Instance{Service: "orders", ID: id, Address: "127.0.0.1", Port: 1000}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(ctx, t, w, "orders", 2)
	if err := sess.Close(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	waitFor(ctx, t, w, "orders", 0)
	if _, err := sess.Register(ctx, registry.Instance{Service: "orders", ID: "c", Address: "127.0.0.1", Port: 1}); !errors.Is(err, client.ErrClosed) {
		t.Errorf("Register after Close = %v, want ErrClosed", err)
	}
}

// waitFor waits until the watcher holds n instances of service.
func waitFor(ctx context.Context, t *testing.T, w *client.Watcher, service string, n int) *registry.Snapshot {
	t.Helper()
	for {
		if s, ok := w.Snapshot(service); ok && len(s.Instances) == n {
			return s
		}
		if _, err := w.Next(ctx); err != nil {
			t.Fatalf("waiting for %d instances of %s: %v", n, service, err)
		}
	}
}

func TestBadInputIsRejectedLocallyAndByServer(t *testing.T) {
	srv := testutil.StartBeacon(t)
	c := newClient(t, srv.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := c.Register(ctx, registry.Instance{Service: "Orders", ID: "x", Address: "127.0.0.1", Port: 1})
	var fe *registry.FieldError
	if !errors.As(err, &fe) || fe.Field != "service" {
		t.Errorf("Register(service=Orders) = %v, want a FieldError on service", err)
	}
	if _, err := c.Deregister(ctx, "orders", "bad id!"); !errors.Is(err, registry.ErrInvalid) {
		t.Errorf("Deregister(bad id) = %v, want ErrInvalid from the server", err)
	}
	if _, err := c.NewSession(ctx, client.WithTTL(time.Second)); !errors.Is(err, registry.ErrInvalid) {
		t.Errorf("NewSession(ttl=1s) = %v, want ErrInvalid", err)
	}
}

func TestFailoverToNextServer(t *testing.T) {
	srv := testutil.StartBeacon(t)
	dead := testutil.FreeAddr(t)
	c := newClient(t, dead, srv.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.Services(ctx); err != nil {
		t.Fatalf("Services with the first server down = %v, want success from the second", err)
	}
}

func TestUnavailableWhenNoServer(t *testing.T) {
	c := newClient(t, testutil.FreeAddr(t))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.Services(ctx); !errors.Is(err, client.ErrUnavailable) {
		t.Errorf("Services() = %v, want ErrUnavailable", err)
	}
}

// The SDK must not drag in the server: a service that only discovers others
// should not link an etcd server — nor an etcd or Consul client unless it
// picks that backend (backend/etcd, backend/consul).
func TestSDKDoesNotImportServer(t *testing.T) {
	sdk := []string{"client", "registry", "endpoint", "discovery", "balancer/...", "outlier", "policy", "beaconhttp", "beacongrpc", "lifecycle", "backend", "backend/beacon", "backend/memory"}
	args := []string{"list", "-deps"}
	for _, p := range sdk {
		args = append(args, "beacon.dev/beacon/"+p)
	}
	out, err := exec.Command("go", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, dep := range strings.Fields(string(out)) {
		if strings.HasPrefix(dep, "go.etcd.io/etcd/server/") || dep == "beacon.dev/beacon/server" ||
			strings.HasPrefix(dep, "go.etcd.io/etcd/client/v3") || strings.HasPrefix(dep, "github.com/hashicorp/") {
			t.Errorf("the SDK depends on %s", dep)
		}
	}
}

// Heartbeats travel on the shared stream, not as one request each.
func TestKeepAlivesUseTheStream(t *testing.T) {
	srv := testutil.StartBeacon(t)
	c := newClient(t, srv.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	var sessions []*client.Session
	for range 3 {
		s, err := c.NewSession(ctx, client.WithTTL(3*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close(ctx)
		sessions = append(sessions, s)
	}
	metrics := func() string {
		resp, err := http.Get("http://" + srv.Addr() + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	ok := regexp.MustCompile(`beacon_session_keepalives_total\{result="ok"\} (\d+)`)
	testutil.Eventually(t, 30*time.Second, "6 keepalives", func() bool {
		m := ok.FindStringSubmatch(metrics())
		if m == nil {
			return false
		}
		n, _ := strconv.Atoi(m[1])
		return n >= 6
	})
	m := metrics()
	if strings.Contains(m, `procedure="/beacon.v1.RegistryService/KeepAlive"`) {
		t.Errorf("heartbeats went as unary KeepAlive calls, want them on KeepAliveStream")
	}
	if strings.Contains(m, `beacon_watchers 1`) {
		t.Errorf("the keepalive stream is counted as a watcher")
	}
}

// RegisterMany puts a session's instances in one RegisterBatch call; each
// instance gets its own outcome — refused locally, refused by a limit, or
// registered — and the registered ones are the session's.
func TestRegisterManyInOneRequest(t *testing.T) {
	srv := testutil.StartBeacon(t, "--max-instances-per-service", "4")
	c := newClient(t, srv.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sess, err := c.NewSession(ctx, client.WithTTL(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	ins := []registry.Instance{{Service: "orders", ID: "bad", Address: "", Port: 1}}
	for i := range 5 {
		ins = append(ins, registry.Instance{Service: "orders", ID: fmt.Sprintf("o-%d", i), Address: "127.0.0.1", Port: 9000 + i})
	}
	revs, err := sess.RegisterMany(ctx, ins)
	if !errors.Is(err, registry.ErrInvalid) || !strings.Contains(err.Error(), "instance 0 (orders/bad)") || !strings.Contains(err.Error(), "max-instances-per-service") {
		t.Errorf("RegisterMany = %v, want instance 0 invalid and one past max-instances-per-service", err)
	}
	registered := 0
	for _, r := range revs {
		if r > 0 {
			registered++
		}
	}
	if revs[0] != 0 || registered != 4 {
		t.Errorf("revisions %v: want 0 for the invalid instance and 4 registered", revs)
	}
	snap, err := c.Instances(ctx, "orders")
	if err != nil || len(snap.Instances) != 4 {
		t.Fatalf("Instances(orders) = %v, %v; want the 4 registered", ids(snap), err)
	}
	for _, in := range snap.Instances {
		if in.SessionID != sess.ID() {
			t.Errorf("%s is bound to session %d, want the session's %d", in.ID, in.SessionID, sess.ID())
		}
	}
	batches, _ := testutil.Metric(t, srv.Addr(), `beacon_requests_total{code="ok",procedure="/beacon.v1.RegistryService/RegisterBatch"}`)
	singles, _ := testutil.Metric(t, srv.Addr(), `beacon_request_duration_seconds_count{procedure="/beacon.v1.RegistryService/Register"}`) // any code
	if batches != 1 || singles != 0 {
		t.Errorf("%v RegisterBatch and %v Register calls, want exactly one RegisterBatch call and no Register", batches, singles)
	}
	if err := sess.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if snap, err := c.Instances(ctx, "orders"); err != nil || len(snap.Instances) != 0 {
		t.Errorf("after the session closed: %v, %v; want none", ids(snap), err)
	}
}

// A long list goes as several requests, each under the server's default
// bounds, and an instance listed twice is refused before any is sent.
func TestRegisterManySplitsLongListsAndRefusesDuplicates(t *testing.T) {
	srv := testutil.StartBeacon(t)
	c := newClient(t, srv.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	sess, err := c.NewSession(ctx, client.WithTTL(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close(ctx)
	var ins []registry.Instance
	for i := range 1100 {
		ins = append(ins, registry.Instance{Service: "many", ID: fmt.Sprintf("m-%d", i), Address: "127.0.0.1", Port: 1 + i})
	}
	ins = append(ins, registry.Instance{Service: "many", ID: "m-7", Address: "127.0.0.2", Port: 1})
	revs, err := sess.RegisterMany(ctx, ins)
	if !errors.Is(err, registry.ErrInvalid) || !strings.Contains(err.Error(), "instance 1100 (many/m-7)") || !strings.Contains(err.Error(), "already instances[7]") {
		t.Errorf("RegisterMany = %v, want only instance 1100 refused as a duplicate of instances[7]", err)
	}
	for i, r := range revs[:1100] {
		if r == 0 {
			t.Fatalf("instance %d not registered", i)
		}
	}
	snap, err := c.Instances(ctx, "many")
	if err != nil || len(snap.Instances) != 1100 {
		t.Fatalf("Instances(many) = %d, %v; want 1100", len(snap.Instances), err)
	}
	for _, in := range snap.Instances {
		if in.ID == "m-7" && in.Address != "127.0.0.1" {
			t.Errorf("m-7 at %s: the refused duplicate replaced the first", in.Address)
		}
	}
	if calls, _ := testutil.Metric(t, srv.Addr(), `beacon_requests_total{code="ok",procedure="/beacon.v1.RegistryService/RegisterBatch"}`); calls != 3 {
		t.Errorf("%v RegisterBatch calls for 1,100 instances, want 3 (500, 500, 100)", calls)
	}
}

// outOfTime answers every ListServices call at once with DeadlineExceeded,
// as a server whose own deadline for etcd passed, or one that noticed the
// attempt's deadline (sent with the request) a moment before the client
// did.
type outOfTime struct {
	beaconv1connect.UnimplementedRegistryServiceHandler
	calls atomic.Int64
}

func (o *outOfTime) ListServices(context.Context, *connect.Request[beaconv1.ListServicesRequest]) (*connect.Response[beaconv1.ListServicesResponse], error) {
	o.calls.Add(1)
	return nil, connect.NewError(connect.CodeDeadlineExceeded, errors.New("out of time"))
}

// A server that answers DeadlineExceeded while the caller's own deadline
// holds has timed out the attempt: the call moves on to the next server
// rather than hand the caller a deadline error it did not cause.
func TestServerDeadlineMovesTheCallOn(t *testing.T) {
	good := testutil.StartBeacon(t)
	slow := &outOfTime{}
	mux := http.NewServeMux()
	mux.Handle(beaconv1connect.NewRegistryServiceHandler(slow))
	var protocols http.Protocols
	protocols.SetUnencryptedHTTP2(true)
	hs := httptest.NewUnstartedServer(mux)
	hs.Config.Protocols = &protocols
	hs.Start()
	defer hs.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// The server out of time first.
	c, err := client.New([]string{strings.TrimPrefix(hs.URL, "http://"), good.Addr()}, client.WithOrderedServers())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Services(ctx); err != nil {
		t.Fatalf("Services = %v, want the second server's answer", err)
	}
	if slow.calls.Load() == 0 {
		t.Fatal("the server out of time was never asked")
	}
}

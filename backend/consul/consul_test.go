package consul_test

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/consul/api"
	"go.uber.org/goleak"

	"beacon.dev/beacon/backend"
	"beacon.dev/beacon/backend/backendtest"
	"beacon.dev/beacon/backend/consul"
	"beacon.dev/beacon/backend/consul/consultest"
	"beacon.dev/beacon/discovery"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/session"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m, testutil.LeakOptions()...) }

// apiClient is an api client of its own transport, closed with the test.
func apiClient(t *testing.T, addr string) *api.Client {
	t.Helper()
	tr := &http.Transport{MaxIdleConnsPerHost: 16}
	t.Cleanup(tr.CloseIdleConnections)
	c, err := api.NewClient(&api.Config{Address: addr, Transport: tr})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func testServer(t *testing.T, opts consultest.Options) *consultest.Server {
	t.Helper()
	s, err := consultest.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

func newBackend(t *testing.T, addr string, cfg consul.Config) *consul.Backend {
	t.Helper()
	cfg.Client = apiClient(t, addr)
	b, err := consul.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// conformanceAgent is a conformance backend's test agent and the proxy
// its client goes through.
type conformanceAgent struct {
	srv   *consultest.Server
	proxy *testutil.Proxy
}

var agents sync.Map // backend.Backend → conformanceAgent

// On the recorded-behaviour test server: a fresh agent per case.
func TestConformanceTestServer(t *testing.T) {
	backendtest.Run(t, backendtest.Harness{
		New: func(t *testing.T) backend.Backend {
			srv := testServer(t, consultest.Options{})
			proxy := testutil.NewProxy(t, srv.Addr())
			b := newBackend(t, proxy.Addr(), consul.Config{WaitTime: 2 * time.Second})
			agents.Store(b, conformanceAgent{srv, proxy})
			return b
		},
		TTL: 2 * time.Second,
		// A Consul session is the session checks of its instances: it is
		// lost when the agent loses them, as a dev agent restarted without
		// its state does.
		Expire: func(t *testing.T, b backend.Backend, _ int64) {
			a, _ := agents.Load(b)
			if err := a.(conformanceAgent).srv.Restart(); err != nil {
				t.Fatal(err)
			}
		},
		Freeze: func(t *testing.T, b backend.Backend) func() {
			a, _ := agents.Load(b)
			a.(conformanceAgent).proxy.Freeze(true)
			return func() { a.(conformanceAgent).proxy.Freeze(false) }
		},
	})
}

// On a real agent, whenever a consul binary is on PATH (none can be
// installed from the package registries this project's CI reaches).
func TestConformanceRealAgent(t *testing.T) {
	bin, err := exec.LookPath("consul")
	if err != nil {
		t.Skip("no consul binary on PATH; the recorded-behaviour server covers the protocol")
	}
	backendtest.Run(t, backendtest.Harness{
		New: func(t *testing.T) backend.Backend {
			return newBackend(t, startAgent(t, bin), consul.Config{WaitTime: 2 * time.Second})
		},
		TTL: 2 * time.Second,
	})
}

// startAgent runs `consul agent -dev` on loopback ports until the test ends.
func startAgent(t *testing.T, bin string) string {
	t.Helper()
	port := func() string { a := testutil.FreeAddr(t); return a[strings.LastIndex(a, ":")+1:] }
	httpPort := port()
	cmd := exec.Command(bin, "agent", "-dev", "-bind=127.0.0.1", "-client=127.0.0.1", "-log-level=warn",
		"-http-port="+httpPort, "-dns-port=-1", "-grpc-port=-1", "-grpc-tls-port=-1",
		"-serf-lan-port="+port(), "-serf-wan-port="+port(), "-server-port="+port())
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
	})
	addr := "127.0.0.1:" + httpPort
	c := apiClient(t, addr)
	deadline := time.Now().Add(30 * time.Second)
	for {
		if leader, err := c.Status().Leader(); err == nil && leader != "" {
			return addr
		}
		if time.Now().After(deadline) {
			t.Fatalf("consul agent never elected itself: %s", out.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func ctxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func ids(s *registry.Snapshot) []string {
	var out []string
	for _, in := range s.Instances {
		out = append(out, in.ID)
	}
	return out
}

// follow reads a stream as the discovery cache does and records every
// revision, failing on one that goes back.
type follower struct {
	st      discovery.Stream
	stopped chan struct{}
	bad     atomic.Pointer[error]
	count   atomic.Int64
}

func follow(t *testing.T, ctx context.Context, st discovery.Stream) *follower {
	f := &follower{st: st, stopped: make(chan struct{})}
	revs := map[string]int64{}
	go func() {
		defer close(f.stopped)
		for {
			snaps, err := st.Next(ctx)
			if err != nil {
				return
			}
			for _, s := range snaps {
				f.count.Add(1)
				if s.Revision <= revs[s.Service] {
					err := fmt.Errorf("%s went from revision %d to %d", s.Service, revs[s.Service], s.Revision)
					f.bad.CompareAndSwap(nil, &err)
				}
				revs[s.Service] = s.Revision
			}
		}
	}()
	t.Cleanup(func() {
		st.Close()
		<-f.stopped
		if err := f.bad.Load(); err != nil {
			t.Error(*err)
		}
	})
	return f
}

func (f *follower) ids(service string) []string {
	s, ok := f.st.Snapshot(service)
	if !ok {
		return nil
	}
	return ids(s)
}

// A dev agent restarted forgets every registration and starts its index
// again low. The HTTP client replays the blocked query on the new agent,
// which would block on the old, higher index for the whole wait: the
// session that finds its check gone cuts the watch short, instances come
// back, and revisions keep growing.
func TestAgentRestartSessionsRegisterAgainAndWatchesReadAfresh(t *testing.T) {
	srv := testServer(t, consultest.Options{})
	b := newBackend(t, srv.Addr(), consul.Config{WaitTime: 5 * time.Minute})
	ctx := ctxFor(t, 2*time.Minute)
	st, err := b.Watch(ctx, []string{"orders"})
	if err != nil {
		t.Fatal(err)
	}
	f := follow(t, ctx, st)
	sess, err := b.NewSession(ctx, session.WithTTL(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close(ctx)
	if _, err := sess.Register(ctx, registry.Instance{Service: "orders", ID: "ephemeral", Address: "127.0.0.1", Port: 9001}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Register(ctx, registry.Instance{Service: "orders", ID: "persistent", Address: "127.0.0.1", Port: 9002}); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "the watch sees both", func() bool {
		return slices.Equal(f.ids("orders"), []string{"ephemeral", "persistent"})
	})
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	// The persistent registration died with the agent's state (as with
	// Consul); the session's instance comes back within a renewal period
	// (TTL/3). The replayed query would block for its whole 5 m wait: a
	// convergence within the (generous) 30 s shows it was cut short.
	start := time.Now()
	testutil.Eventually(t, 30*time.Second, "the watch converges on the restarted agent", func() bool {
		return slices.Equal(f.ids("orders"), []string{"ephemeral"})
	})
	t.Logf("converged %v after the restart", time.Since(start).Round(time.Millisecond))
	snap, err := b.Instances(ctx, "orders")
	if err != nil || !slices.Equal(ids(snap), []string{"ephemeral"}) {
		t.Errorf("Instances after the restart: %v, %v", snap, err)
	}
}

// A session lets an instance go when it is registered again without the
// session or deregistered on purpose — in this process or another — and
// does not take the vanished session check for a lost agent (it used to
// register the old instance again; the conformance suite's watch test
// caught it).
func TestSessionLetsGoOfInstancesTakenOrRemoved(t *testing.T) {
	srv := testServer(t, consultest.Options{})
	b := newBackend(t, srv.Addr(), consul.Config{WaitTime: 2 * time.Second})
	other := newBackend(t, srv.Addr(), consul.Config{WaitTime: 2 * time.Second}) // another process
	ctx := ctxFor(t, 60*time.Second)
	const ttl = 2 * time.Second // the shortest; renewals every 667 ms
	sess, err := b.NewSession(ctx, session.WithTTL(ttl))
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close(ctx)
	for _, id := range []string{"retaken", "retaken-elsewhere", "removed"} {
		if _, err := sess.Register(ctx, registry.Instance{Service: "orders", ID: id, Address: "127.0.0.1", Port: 9001}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := b.Register(ctx, registry.Instance{Service: "orders", ID: "retaken", Address: "127.0.0.1", Port: 9101}); err != nil {
		t.Fatal(err)
	}
	if _, err := other.Register(ctx, registry.Instance{Service: "orders", ID: "retaken-elsewhere", Address: "127.0.0.1", Port: 9102}); err != nil {
		t.Fatal(err)
	}
	if ok, err := b.Deregister(ctx, "orders", "removed"); !ok || err != nil {
		t.Fatalf("Deregister = %v, %v", ok, err)
	}
	time.Sleep(2 * ttl) // several renewals
	snap, err := b.Instances(ctx, "orders")
	if err != nil {
		t.Fatal(err)
	}
	ports := map[string]int{}
	for _, in := range snap.Instances {
		ports[in.ID] = in.Port
		if in.Ephemeral() {
			t.Errorf("%s is the session's again: it registered it back", in.ID)
		}
	}
	if want := map[string]int{"retaken": 9101, "retaken-elsewhere": 9102}; !maps.Equal(ports, want) {
		t.Errorf("after the renewals: %v, want %v (nothing brought back by the session)", ports, want)
	}
	// Closing the session deregisters nothing it let go of.
	if err := sess.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if snap, err := b.Instances(ctx, "orders"); err != nil || len(snap.Instances) != 2 {
		t.Errorf("after the session closed: %v, %v; want both registrations kept", snap, err)
	}
}

// With nothing to reveal the restart, Consul's index rule does: the
// replayed query ends at its wait with a lower index, taken as a reset.
func TestIndexGoingBackwardsResetsTheWatch(t *testing.T) {
	srv := testServer(t, consultest.Options{})
	b := newBackend(t, srv.Addr(), consul.Config{WaitTime: 2 * time.Second})
	ctx := ctxFor(t, 2*time.Minute)
	st := must(b.Watch(ctx, []string{"orders"}))
	f := follow(t, ctx, st)
	for _, id := range []string{"a", "b", "c"} {
		if _, err := b.Register(ctx, registry.Instance{Service: "orders", ID: id, Address: "127.0.0.1", Port: 9001}); err != nil {
			t.Fatal(err)
		}
	}
	testutil.Eventually(t, 30*time.Second, "the watch sees a, b, c", func() bool {
		return slices.Equal(f.ids("orders"), []string{"a", "b", "c"})
	})
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Register(ctx, registry.Instance{Service: "orders", ID: "d", Address: "127.0.0.1", Port: 9001}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	testutil.Eventually(t, 30*time.Second, "the watch resets to the new agent's state", func() bool {
		return slices.Equal(f.ids("orders"), []string{"d"})
	})
	t.Logf("reset seen %v after the restart (wait 2 s)", time.Since(start).Round(time.Millisecond))
}

// Blocking queries block: idle, a watch asks about once per wait, and
// keeps asking.
func TestBlockingQueriesDoNotSpin(t *testing.T) {
	srv := testServer(t, consultest.Options{})
	const wait = time.Second
	b := newBackend(t, srv.Addr(), consul.Config{WaitTime: wait})
	ctx := ctxFor(t, 90*time.Second)
	services := []string{"orders", "payments"}
	st, err := b.Watch(ctx, services)
	if err != nil {
		t.Fatal(err)
	}
	follow(t, ctx, st)
	<-st.Synced()
	asked := func(svc string) int { return srv.Queries("health/" + svc) }
	start := time.Now() // before the first count: the window holds every query counted
	before := map[string]int{}
	for _, svc := range services {
		before[svc] = asked(svc)
	}
	time.Sleep(3 * wait) // idle
	// Liveness: every service's watch keeps asking (a generous bound).
	testutil.Eventually(t, 30*time.Second, "every service asked again", func() bool {
		for _, svc := range services {
			if asked(svc)-before[svc] < 1 {
				return false
			}
		}
		return true
	})
	n := 0
	for _, svc := range services {
		n += asked(svc) - before[svc]
	}
	// Anti-spin: an idle query is answered once per wait (plus jitter), so
	// a service is answered at most window/wait + 1 times in the window;
	// twice that and 4 more is generous, and a spinning watch (one query
	// per round trip) is far above it. A loaded machine only lengthens the
	// window, which only raises the bound.
	window := time.Since(start)
	t.Logf("%d health queries in %v idle", n, window.Round(time.Millisecond))
	if limit := int(float64(len(services))*window.Seconds()/wait.Seconds()*2) + 4; n > limit {
		t.Errorf("%d health queries in %v idle for %d services at a %v wait; want at most %d", n, window, len(services), wait, limit)
	}
}

// Checks the agent runs decide health; the passing-only filter leaves
// unhealthy (and warning) instances out at the source.
func TestAgentChecksDriveHealthAndThePassingFilter(t *testing.T) {
	var code atomic.Int32
	code.Store(http.StatusOK)
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(int(code.Load())) }))
	defer hs.Close()
	srv := testServer(t, consultest.Options{})
	all := newBackend(t, srv.Addr(), consul.Config{WaitTime: 5 * time.Second})
	passing := newBackend(t, srv.Addr(), consul.Config{WaitTime: 5 * time.Second, PassingOnly: true})
	ctx := ctxFor(t, 3*time.Minute)
	fAll := follow(t, ctx, must(all.Watch(ctx, []string{"orders"})))
	fPassing := follow(t, ctx, must(passing.Watch(ctx, []string{"orders"})))
	in := registry.Instance{Service: "orders", ID: "o-1", Address: "127.0.0.1", Port: 9001, Checks: []registry.Check{{
		Kind: registry.CheckHTTP, Target: hs.URL + "/healthz", Interval: 100 * time.Millisecond, Timeout: 50 * time.Millisecond,
		FailuresBeforeCritical: 2, SuccessesBeforePassing: 2}}}
	if _, err := all.Register(ctx, in); err != nil {
		t.Fatal(err)
	}
	if _, err := all.Register(ctx, registry.Instance{Service: "orders", ID: "o-2", Address: "127.0.0.1", Port: 9002}); err != nil {
		t.Fatal(err)
	}
	health := func() registry.Health {
		s, ok := fAll.st.Snapshot("orders")
		if !ok {
			return 0
		}
		for _, in := range s.Instances {
			if in.ID == "o-1" {
				return in.Health
			}
		}
		return 0
	}
	for _, step := range []struct {
		code    int
		health  registry.Health
		passing []string
	}{
		{http.StatusOK, registry.HealthPassing, []string{"o-1", "o-2"}},
		{http.StatusInternalServerError, registry.HealthCritical, []string{"o-2"}},
		{http.StatusTooManyRequests, registry.HealthWarning, []string{"o-2"}},
		{http.StatusOK, registry.HealthPassing, []string{"o-1", "o-2"}},
	} {
		code.Store(int32(step.code))
		want := 2 // WARNING stays routable without the passing filter
		if step.health == registry.HealthCritical {
			want = 1
		}
		testutil.Eventually(t, 30*time.Second, fmt.Sprintf("HTTP %d makes o-1 %v, %d routable", step.code, step.health, want), func() bool {
			s, ok := fAll.st.Snapshot("orders")
			return ok && health() == step.health && len(s.Routable()) == want && slices.Equal(fPassing.ids("orders"), step.passing)
		})
	}
}

// A beacon TTL check is a Consul TTL check: critical until reported,
// passing while reports come, critical when they stop.
func TestTTLCheckTransitions(t *testing.T) {
	srv := testServer(t, consultest.Options{})
	b := newBackend(t, srv.Addr(), consul.Config{WaitTime: 5 * time.Second})
	ctx := ctxFor(t, 3*time.Minute)
	f := follow(t, ctx, must(b.Watch(ctx, []string{"jobs"})))
	// Long enough that a loaded machine cannot let it lapse between the
	// reports below, or before the watch shows them.
	const ttl = 10 * time.Second
	in := registry.Instance{Service: "jobs", ID: "j-1", Address: "127.0.0.1", Port: 9001,
		Checks: []registry.Check{{Name: "heartbeat", Kind: registry.CheckTTL, Interval: ttl}}}
	if _, err := b.Register(ctx, in); err != nil {
		t.Fatal(err)
	}
	health := func() registry.Health {
		s, ok := f.st.Snapshot("jobs")
		if !ok || len(s.Instances) != 1 {
			return 0
		}
		return s.Instances[0].Health
	}
	testutil.Eventually(t, 30*time.Second, "CRITICAL before the first report", func() bool { return health() == registry.HealthCritical })
	agent := apiClient(t, srv.Addr()).Agent()
	checkID := "default.jobs.j-1:heartbeat"
	// Three reports at least a second apart from first to last. silent is
	// taken just before the last: the check cannot turn critical sooner
	// than a TTL after it - a lower bound no load can break - and had a
	// report not renewed the TTL, it would have, a second or more sooner.
	var silent time.Time
	for i := range 3 {
		if i > 0 {
			time.Sleep(500 * time.Millisecond)
		}
		silent = time.Now()
		if err := agent.UpdateTTL(checkID, "working", api.HealthPassing); err != nil {
			t.Fatal(err)
		}
	}
	testutil.Eventually(t, 30*time.Second, "PASSING while reported", func() bool { return health() == registry.HealthPassing })
	testutil.Eventually(t, ttl+30*time.Second, "CRITICAL once the reports stop", func() bool { return health() == registry.HealthCritical })
	if d := time.Since(silent); d < ttl-100*time.Millisecond {
		t.Errorf("critical %v after the last report began, before the %v TTL", d, ttl)
	}
}

func must(st discovery.Stream, err error) discovery.Stream {
	if err != nil {
		panic(err)
	}
	return st
}

// What Consul cannot hold is refused by field and leaves the catalog as
// it was; metadata keys Consul would refuse round-trip escaped.
func TestMappingLimitsAndMetadataRoundTrip(t *testing.T) {
	srv := testServer(t, consultest.Options{})
	b := newBackend(t, srv.Addr(), consul.Config{})
	ctx := ctxFor(t, 30*time.Second)
	meta := map[string]string{"team": "core", "app.kubernetes.io/name": "orders", "beacon-shadow": "x", "consul-ish": "y", "under_score": "z"}
	if _, err := b.Register(ctx, registry.Instance{Service: "orders", ID: "o-1", Address: "127.0.0.1", Port: 9001, Metadata: meta}); err != nil {
		t.Fatal(err)
	}
	before, err := b.Instances(ctx, "orders")
	if err != nil || len(before.Instances) != 1 {
		t.Fatal(before, err)
	}
	if got := before.Instances[0].Metadata; !mapsEqual(got, meta) {
		t.Errorf("metadata came back as %v, registered %v", got, meta)
	}
	many := map[string]string{}
	for i := range 63 {
		many[fmt.Sprint("k", i)] = "v"
	}
	for _, tc := range []struct {
		field string
		in    registry.Instance
	}{
		{"metadata", registry.Instance{Metadata: many}},
		{"metadata key", registry.Instance{Metadata: map[string]string{strings.Repeat("/", 60): "v"}}},
		{"checks[0].expect_status", registry.Instance{Checks: []registry.Check{{Kind: registry.CheckHTTP, ExpectStatus: "3xx"}}}},
		{"checks[0].body_contains", registry.Instance{Checks: []registry.Check{{Kind: registry.CheckHTTP, BodyContains: "ok"}}}},
		{"namespace", registry.Instance{Namespace: "other"}},
	} {
		in := tc.in
		in.Service, in.ID, in.Address, in.Port = "orders", "o-1", "127.0.0.1", 9009
		_, err := b.Register(ctx, in)
		if !errors.Is(err, registry.ErrInvalid) || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("bad %s: %v, want an invalid-argument error naming it", tc.field, err)
		}
	}
	after, err := b.Instances(ctx, "orders")
	if err != nil || after.Revision != before.Revision || after.Instances[0].Port != 9001 {
		t.Errorf("refused registrations changed the catalog: %+v → %+v (%v)", before, after, err)
	}
	if _, err := consul.New(consul.Config{Client: apiClient(t, srv.Addr()), WaitTime: time.Hour}); !errors.Is(err, registry.ErrInvalid) || !strings.Contains(err.Error(), "wait_time") {
		t.Errorf("WaitTime 1h: %v", err)
	}
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// Services registered with Consul by anything else are in the default
// namespace, and the SDK's discovery cache follows them unchanged.
func TestNativeRegistrationsAreDiscovered(t *testing.T) {
	srv := testServer(t, consultest.Options{})
	b := newBackend(t, srv.Addr(), consul.Config{WaitTime: 5 * time.Second})
	cache, err := discovery.New(b, discovery.Config{}, "legacy")
	if err != nil {
		t.Fatal(err)
	}
	defer cache.Close()
	agent := apiClient(t, srv.Addr()).Agent()
	if err := agent.ServiceRegister(&api.AgentServiceRegistration{ID: "legacy-1", Name: "legacy", Port: 7001,
		Check: &api.AgentServiceCheck{TTL: "30s", Status: api.HealthPassing}}); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "the cache sees the native registration at the node's address", func() bool {
		set, ok := cache.Endpoints("legacy")
		return ok && len(set.Endpoints) == 1 && set.Endpoints[0].Addr == "127.0.0.1:7001"
	})
	if err := agent.UpdateTTL("service:legacy-1", "down", api.HealthCritical); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "a critical native instance leaves the cache", func() bool {
		set, ok := cache.Endpoints("legacy")
		return ok && len(set.Endpoints) == 0
	})
}

// Following every service: services appear and disappear.
func TestWatchAllServices(t *testing.T) {
	srv := testServer(t, consultest.Options{})
	b := newBackend(t, srv.Addr(), consul.Config{WaitTime: 5 * time.Second})
	ctx := ctxFor(t, 90*time.Second)
	st := must(b.Watch(ctx, nil))
	f := follow(t, ctx, st)
	<-st.Synced()
	for _, svc := range []string{"alpha", "beta"} {
		if _, err := b.Register(ctx, registry.Instance{Service: svc, ID: "1", Address: "127.0.0.1", Port: 9001}); err != nil {
			t.Fatal(err)
		}
	}
	testutil.Eventually(t, 30*time.Second, "both services seen", func() bool {
		return slices.Equal(f.ids("alpha"), []string{"1"}) && slices.Equal(f.ids("beta"), []string{"1"})
	})
	if _, err := b.Deregister(ctx, "alpha", "1"); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "alpha gone, beta kept", func() bool {
		return f.ids("alpha") == nil && slices.Equal(f.ids("beta"), []string{"1"})
	})
}

// The agent unreachable: calls fail with the cause, the watch reports it
// and keeps what it had, a session shorter than the outage keeps its
// instance (the agent's TTL runs, not ours), and all resumes after.
func TestAgentOutage(t *testing.T) {
	srv := testServer(t, consultest.Options{})
	b := newBackend(t, srv.Addr(), consul.Config{WaitTime: 5 * time.Second, SyncTimeout: 2 * time.Second})
	ctx := ctxFor(t, 3*time.Minute)
	st := must(b.Watch(ctx, []string{"orders"}))
	f := follow(t, ctx, st)
	sess, err := b.NewSession(ctx, session.WithTTL(3*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close(ctx)
	if _, err := sess.Register(ctx, registry.Instance{Service: "orders", ID: "o-1", Address: "127.0.0.1", Port: 9001}); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "the watch sees o-1", func() bool { return slices.Equal(f.ids("orders"), []string{"o-1"}) })
	srv.Pause()
	if _, err := b.Instances(ctx, "orders"); err == nil || !strings.Contains(err.Error(), "connection refused") {
		t.Errorf("Instances with the agent down: %v, want connection refused", err)
	}
	testutil.Eventually(t, 30*time.Second, "the watch reports the outage", func() bool { return !st.Status().Connected })
	if !slices.Equal(f.ids("orders"), []string{"o-1"}) {
		t.Errorf("the watch dropped what it had: %v", f.ids("orders"))
	}
	time.Sleep(time.Second)
	if err := srv.Resume(); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "the watch reconnects", func() bool { return st.Status().Connected })
	if _, err := b.Register(ctx, registry.Instance{Service: "orders", ID: "o-2", Address: "127.0.0.1", Port: 9002}); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "the watch sees o-1 (kept) and o-2", func() bool {
		return slices.Equal(f.ids("orders"), []string{"o-1", "o-2"})
	})
}

// On beacon's own Consul-compatible API (beacon server --consul-addr):
// the backend, written against Consul's documented behaviour, works
// unchanged against beacon speaking Consul.
func TestConformanceBeaconConsulAPI(t *testing.T) {
	backendtest.Run(t, backendtest.Harness{
		New: func(t *testing.T) backend.Backend {
			addr := testutil.FreeAddr(t)
			testutil.StartBeacon(t, "--consul-addr", addr)
			proxy := testutil.NewProxy(t, addr)
			b := newBackend(t, proxy.Addr(), consul.Config{WaitTime: 2 * time.Second})
			agents.Store(b, conformanceAgent{proxy: proxy})
			return b
		},
		TTL: 2 * time.Second,
		Freeze: func(t *testing.T, b backend.Backend) func() {
			a, _ := agents.Load(b)
			a.(conformanceAgent).proxy.Freeze(true)
			return func() { a.(conformanceAgent).proxy.Freeze(false) }
		},
	})
}

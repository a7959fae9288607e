package server_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/server"
	"beacon.dev/beacon/server/servertest"
)

// consoleCall makes a Connect JSON call on the console's port, as the
// console's script does: the same origin serves the page and the API.
func consoleCall(t *testing.T, srv *server.Server, secret, procedure, body string) (int, map[string]any) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, "http://"+srv.ConsoleAddr()+"/beacon.v1."+procedure, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	if secret != "" {
		req.Header.Set("Authorization", "Bearer "+secret)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	b, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatalf("%s: answer is not JSON (%v): %s", procedure, err, b)
	}
	return resp.StatusCode, out
}

func consoleServer(t *testing.T, edit ...func(*server.Config)) *server.Server {
	cfg := servertest.Config(t, "")
	cfg.ConsoleAddr = "127.0.0.1:0"
	for _, e := range edit {
		e(cfg)
	}
	return servertest.Start(t, cfg)
}

func TestConsoleServesItsPageAndTheAPI(t *testing.T) {
	srv := consoleServer(t)
	if srv.ConsoleURL() != "http://"+srv.ConsoleAddr()+"/" {
		t.Fatalf("ConsoleURL = %q", srv.ConsoleURL())
	}
	resp, err := http.Get(srv.ConsoleURL())
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(resp.Header.Get("Content-Type"), "text/html") || !strings.Contains(string(page), "app.js") {
		t.Fatalf("GET / = %d %q: %.200s", resp.StatusCode, resp.Header.Get("Content-Type"), page)
	}
	if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "script-src 'self'") {
		t.Errorf("Content-Security-Policy = %q", csp)
	}
	code, out := consoleCall(t, srv, "", "RegistryService/ListServices", `{}`)
	if code != 200 || out["revision"] == nil {
		t.Fatalf("ListServices on the console port = %d %v", code, out)
	}
	// A page whose name points at 127.0.0.1 (DNS rebinding) is refused.
	req, _ := http.NewRequest(http.MethodGet, srv.ConsoleURL(), nil)
	req.Host = "attacker.example"
	if resp, err := http.DefaultClient.Do(req); err != nil {
		t.Fatal(err)
	} else if resp.Body.Close(); resp.StatusCode != http.StatusMisdirectedRequest {
		t.Errorf("GET / with Host attacker.example = %d, want 421", resp.StatusCode)
	}
	// The API port does not serve the console.
	resp, err = http.Get("http://" + srv.Addr() + "/ui/app.js")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("GET /ui/app.js on --addr = %d, want 404", resp.StatusCode)
	}
}

// "auto" derives the console's port from --addr's; a taken port leaves
// the server running without a console instead of failing its start.
func TestConsoleAutoPortTakenStartsWithoutConsole(t *testing.T) {
	apiLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := apiLn.Addr().(*net.TCPAddr).Port
	apiLn.Close()
	if port+3 > 65535 {
		t.Skip("no port + 3")
	}
	taken, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port+3)))
	if err != nil {
		t.Skipf("port + 3 not free to take: %v", err)
	}
	defer taken.Close()
	cfg := servertest.Config(t, "")
	cfg.Addr = apiLn.Addr().String()
	cfg.ConsoleAddr = server.ConsoleAuto
	srv, err := servertest.StartErr(cfg)
	if err != nil {
		t.Skipf("the API port was taken meanwhile: %v", err)
	}
	t.Cleanup(func() { srv.Close() })
	if srv.ConsoleAddr() != "" {
		t.Errorf("ConsoleAddr = %q, want none (its port is taken)", srv.ConsoleAddr())
	}
	// An explicit address that is taken is an error.
	cfg = servertest.Config(t, "")
	cfg.ConsoleAddr = taken.Addr().String()
	if srv, err := servertest.StartErr(cfg); err == nil {
		srv.Close()
		t.Error("Start with a taken --console-addr succeeded")
	} else if !strings.Contains(err.Error(), "--console-addr") {
		t.Errorf("Start error %q does not name --console-addr", err)
	}
}

// A token's rights on the console's port are the API's: a read-only token
// reads, is refused writes and session listings with the permission
// named, and Authorize tells the console which buttons to show.
func TestConsolePortEnforcesACLs(t *testing.T) {
	srv, _, mgmt := aclServer(t, func(c *server.Config) { c.ConsoleAddr = "127.0.0.1:0" })
	mustPolicy(t, srv, mgmt, "read-only", "read service *")
	ro := mustToken(t, srv, mgmt, &beaconv1.AclToken{Policies: []string{"read-only"}})
	if code, out := consoleCall(t, srv, "", "RegistryService/ListSessions", `{}`); code != http.StatusForbidden {
		t.Errorf("ListSessions without a token = %d %v, want 403", code, out)
	}
	code, out := consoleCall(t, srv, ro, "RegistryService/ListSessions", `{}`)
	if code != http.StatusForbidden || !strings.Contains(out["message"].(string), "session:read") {
		t.Errorf("ListSessions as read-only = %d %v, want 403 naming session:read", code, out)
	}
	code, out = consoleCall(t, srv, ro, "RegistryService/Register", `{"instance":{"service":"web","id":"w1","address":"10.0.0.1","port":80}}`)
	if code != http.StatusForbidden || !strings.Contains(out["message"].(string), "service:write") {
		t.Errorf("Register as read-only = %d %v, want 403 naming service:write", code, out)
	}
	checks := `{"checks":[{"resource":"service","name":"web","access":"read"},{"resource":"service","name":"web","access":"write"},{"resource":"acl","access":"read"},{"resource":"operator","access":"read"}]}`
	for secret, want := range map[string]string{ro: "[true false false false]", mgmt: "[true true true true]"} {
		code, out = consoleCall(t, srv, secret, "AclService/Authorize", checks)
		if got := fmtAny(out["allowed"]); code != 200 || got != want || out["aclEnabled"] != true {
			t.Errorf("Authorize = %d %v, want allowed %s", code, out, want)
		}
	}
	code, out = consoleCall(t, srv, ro, "AclService/Authorize", `{"checks":[{"resource":"disk","access":"read"}]}`)
	if code != http.StatusBadRequest || !strings.Contains(out["message"].(string), "checks[0].resource") {
		t.Errorf("Authorize with a bad resource = %d %v, want 400 naming the field", code, out)
	}
}

func fmtAny(v any) string {
	b, _ := json.Marshal(v)
	return strings.NewReplacer(",", " ", "\"", "").Replace(string(b))
}

func TestListNamespacesAndSessions(t *testing.T) {
	srv := startServer(t)
	rc := regClient(srv, "", connect.WithGRPC())
	ctx := context.Background()
	sess, err := rc.CreateSession(ctx, connect.NewRequest(&beaconv1.CreateSessionRequest{Name: "host-a pid 7"}))
	if err != nil {
		t.Fatal(err)
	}
	sid := sess.Msg.GetSessionId()
	for _, in := range []*beaconv1.Instance{
		{Namespace: "prod", Service: "web", Id: "w1", Address: "10.0.0.1", Port: 80, SessionId: sid},
		{Namespace: "prod", Service: "db", Id: "d1", Address: "10.0.0.2", Port: 80, SessionId: sid},
		{Namespace: "dev", Service: "web", Id: "w1", Address: "10.0.0.3", Port: 80},
	} {
		if _, err := rc.Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{Instance: in})); err != nil {
			t.Fatal(err)
		}
	}
	ns, err := rc.ListNamespaces(ctx, connect.NewRequest(&beaconv1.ListNamespacesRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, n := range ns.Msg.GetNamespaces() {
		got = append(got, n.GetName()+":"+strconv.Itoa(int(n.GetServices()))+"/"+strconv.Itoa(int(n.GetInstances())))
	}
	if strings.Join(got, " ") != "default:0/0 dev:1/1 prod:2/2" {
		t.Errorf("ListNamespaces = %v", got)
	}
	list, err := rc.ListSessions(ctx, connect.NewRequest(&beaconv1.ListSessionsRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	if n := len(list.Msg.GetSessions()); n != 1 {
		t.Fatalf("ListSessions = %d sessions, want 1", n)
	}
	s := list.Msg.GetSessions()[0]
	if s.GetId() != sid || s.GetName() != "host-a pid 7" || s.GetInstances() != 2 || s.GetTtl().AsDuration() != 10*time.Second || s.GetCreated().AsTime().IsZero() {
		t.Errorf("session = %v", s)
	}
	// Paging: after the only session, nothing.
	list, err = rc.ListSessions(ctx, connect.NewRequest(&beaconv1.ListSessionsRequest{After: sid, Limit: 5}))
	if err != nil || len(list.Msg.GetSessions()) != 0 || list.Msg.GetMore() {
		t.Errorf("ListSessions after the last = %v, %v", list, err)
	}
	if _, err := rc.ListSessions(ctx, connect.NewRequest(&beaconv1.ListSessionsRequest{Limit: 100000})); connect.CodeOf(err) != connect.CodeInvalidArgument || !strings.Contains(err.Error(), "limit") {
		t.Errorf("ListSessions with limit 100000 = %v, want invalid_argument naming limit", err)
	}
}

// explain returns the verdict and the reasons' rules, with the excluding
// ones marked "!".
func explain(t *testing.T, srv *server.Server, id string) (bool, string, []*beaconv1.ExplainReason) {
	t.Helper()
	return explainIn(t, srv, "web", id)
}

func explainIn(t *testing.T, srv *server.Server, service, id string) (bool, string, []*beaconv1.ExplainReason) {
	t.Helper()
	resp, err := regClient(srv, "", connect.WithGRPC()).ExplainInstance(context.Background(), connect.NewRequest(&beaconv1.ExplainInstanceRequest{Service: service, Id: id}))
	if err != nil {
		t.Fatalf("ExplainInstance(%s/%s) = %v", service, id, err)
	}
	var rules []string
	for _, r := range resp.Msg.GetReasons() {
		rule := r.GetRule()
		if r.GetExcludes() {
			rule = "!" + rule
		}
		rules = append(rules, rule)
	}
	return resp.Msg.GetGetsTraffic(), strings.Join(rules, " "), resp.Msg.GetReasons()
}

func reasonDetail(reasons []*beaconv1.ExplainReason, rule string) string {
	for _, r := range reasons {
		if r.GetRule() == rule {
			return r.GetDetail()
		}
	}
	return ""
}

func TestExplainInstanceNamesTheRule(t *testing.T) {
	srv := startServer(t)
	rc := regClient(srv, "", connect.WithGRPC())
	ctx := context.Background()
	register := func(in *beaconv1.Instance) {
		t.Helper()
		in.Service, in.Port = "web", 80
		if _, err := rc.Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{Instance: in})); err != nil {
			t.Fatal(err)
		}
	}
	register(&beaconv1.Instance{Id: "up", Address: "10.0.0.1"})
	register(&beaconv1.Instance{Id: "draining", Address: "10.0.0.2", Status: beaconv1.Status_STATUS_DRAINING})
	register(&beaconv1.Instance{Id: "sick", Address: "10.0.0.3", Checks: []*beaconv1.Check{{Name: "ttl", Kind: beaconv1.CheckKind_CHECK_KIND_TTL}}})
	register(&beaconv1.Instance{Id: "backup", Address: "10.0.0.4", Metadata: map[string]string{"tier": "1"}})
	// A TTL check starts CRITICAL ("no update yet"); its output is written
	// on transitions: pass once, then fail with a reason. The pass must be
	// seen before the failure is sent: two updates the checker takes in
	// one go are one CRITICAL → CRITICAL, no transition, and no output (on
	// a busy machine that happened).
	update := func(h beaconv1.Health) {
		t.Helper()
		if _, err := rc.UpdateCheck(ctx, connect.NewRequest(&beaconv1.UpdateCheckRequest{Service: "web", Id: "sick", Status: h, Output: "disk full"})); err != nil {
			t.Fatal(err)
		}
	}
	update(beaconv1.Health_HEALTH_PASSING)
	testutil.Eventually(t, time.Minute, "the check's pass in the view", func() bool {
		gets, _, _ := explain(t, srv, "sick")
		return gets
	})
	update(beaconv1.Health_HEALTH_CRITICAL)
	sess, err := rc.CreateSession(ctx, connect.NewRequest(&beaconv1.CreateSessionRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	register(&beaconv1.Instance{Id: "leased", Address: "10.0.0.5", SessionId: sess.Msg.GetSessionId()})
	register(&beaconv1.Instance{Id: "left", Address: "10.0.0.7", SessionId: sess.Msg.GetSessionId()})
	register(&beaconv1.Instance{Id: "gone", Address: "10.0.0.6"})

	testutil.Eventually(t, time.Minute, "the check's CRITICAL with its output in the view", func() bool {
		_, rules, reasons := explain(t, srv, "sick")
		return strings.HasPrefix(rules, "!check") && strings.Contains(reasonDetail(reasons, "check"), "disk full")
	})
	cases := []struct {
		id, rules string
		gets      bool
	}{
		{"up", "status health session", true},
		{"draining", "!status health session", false},
		{"sick", "!check status session", false},
		{"backup", "!tier status health session", false},
		{"leased", "status health session", true},
	}
	for _, c := range cases {
		gets, rules, reasons := explain(t, srv, c.id)
		if gets != c.gets || rules != c.rules {
			t.Errorf("explain %s = %v [%s], want %v [%s]: %v", c.id, gets, rules, c.gets, c.rules, reasons)
		}
	}

	// Protection: with a threshold of 0.9, 3 healthy of the 4 declared UP
	// engage it, and the sick instance is served again.
	if _, err := rc.SetServiceConfig(ctx, connect.NewRequest(&beaconv1.SetServiceConfigRequest{Service: "web", ProtectionThreshold: 0.9})); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "protection engaged for the sick instance", func() bool {
		gets, rules, _ := explain(t, srv, "sick")
		return gets && strings.Contains(rules, "protection")
	})

	// Gone: deregistered (one persistent, one of the session's before the
	// session ended), and taken by its session's end.
	for _, id := range []string{"gone", "left"} {
		if _, err := rc.Deregister(ctx, connect.NewRequest(&beaconv1.DeregisterRequest{Service: "web", Id: id})); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := rc.CloseSession(ctx, connect.NewRequest(&beaconv1.CloseSessionRequest{SessionId: sess.Msg.GetSessionId()})); err != nil {
		t.Fatal(err)
	}
	for id, want := range map[string]string{"gone": "deregistered", "left": "deregistered", "leased": "session ended", "never": "never existed"} {
		testutil.Eventually(t, 30*time.Second, id+" explained as "+want, func() bool {
			gets, rules, reasons := explain(t, srv, id)
			return !gets && rules == "!registered" && strings.Contains(reasonDetail(reasons, "registered"), want)
		})
	}
	if _, err := rc.ExplainInstance(ctx, connect.NewRequest(&beaconv1.ExplainInstanceRequest{Service: "web"})); connect.CodeOf(err) != connect.CodeInvalidArgument {
		t.Errorf("ExplainInstance without an id = %v, want invalid_argument", err)
	}
}

// Tiers as the SDK reads them (endpoint.TierOf): callers use the lowest
// tier with an available instance; a tier that is not a small number is 0.
func TestExplainInstanceFollowsTiers(t *testing.T) {
	srv := startServer(t)
	rc := regClient(srv, "", connect.WithGRPC())
	register := func(id, tier string) {
		t.Helper()
		in := &beaconv1.Instance{Service: "tiers", Id: id, Address: "10.0.0.1", Port: 80, Metadata: map[string]string{"tier": tier}}
		if _, err := rc.Register(context.Background(), connect.NewRequest(&beaconv1.RegisterRequest{Instance: in})); err != nil {
			t.Fatal(err)
		}
	}
	check := func(id, rules string, gets bool) {
		t.Helper()
		testutil.Eventually(t, 30*time.Second, fmt.Sprintf("%s: %v [%s]", id, gets, rules), func() bool {
			g, r, _ := explainIn(t, srv, "tiers", id)
			return g == gets && r == rules
		})
	}
	register("t1", "1")
	register("t2", "2")
	check("t1", "status health tier session", true) // tier 1 is the lowest available
	check("t2", "!tier status health session", false)
	register("odd", "abc") // not a number: tier 0, a primary
	check("odd", "status health session", true)
	check("t1", "!tier status health session", false)
}

// A tracked service's changes are counted as its watchers acknowledge
// them: an SDK watcher applies each change and says so when asked.
func TestServicePropagationCountsAcknowledgements(t *testing.T) {
	srv := startServer(t)
	rc := regClient(srv, "", connect.WithGRPC())
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	w, err := c.Watch(ctx, []string{"web"})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	applied := make(chan struct{})
	go func() { // the application: applies every batch it is handed
		defer close(applied)
		for {
			if _, err := w.Next(ctx); err != nil {
				return
			}
		}
	}()
	track := func() *beaconv1.ServicePropagationResponse {
		resp, err := rc.ServicePropagation(ctx, connect.NewRequest(&beaconv1.ServicePropagationRequest{Service: "web"}))
		if err != nil {
			t.Fatal(err)
		}
		return resp.Msg
	}
	// Only a service the server has seen is tracked, from the first look.
	if _, err := rc.ServicePropagation(ctx, connect.NewRequest(&beaconv1.ServicePropagationRequest{Service: "web"})); connect.CodeOf(err) != connect.CodeNotFound {
		t.Errorf("ServicePropagation of a service never seen = %v, want not_found", err)
	}
	if _, err := rc.Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{Instance: &beaconv1.Instance{Service: "web", Id: "w0", Address: "10.0.0.1", Port: 80}})); err != nil {
		t.Fatal(err)
	}
	var first *beaconv1.ServicePropagationResponse
	testutil.Eventually(t, 30*time.Second, "web in the server's view", func() bool {
		resp, err := rc.ServicePropagation(ctx, connect.NewRequest(&beaconv1.ServicePropagationRequest{Service: "web"}))
		if err != nil {
			return false
		}
		first = resp.Msg
		return true
	})
	if len(first.GetChanges()) != 0 || first.GetTrackedUntil().AsTime().Before(time.Now()) {
		t.Fatalf("before any change: %v", first)
	}
	for _, id := range []string{"w1", "w2"} {
		resp, err := rc.Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{Instance: &beaconv1.Instance{Service: "web", Id: id, Address: "10.0.0.1", Port: 80}}))
		if err != nil {
			t.Fatal(err)
		}
		rev := resp.Msg.GetRevision()
		testutil.Eventually(t, 60*time.Second, "the watcher's acknowledgement of "+id, func() bool {
			ch := track().GetChanges()
			return len(ch) > 0 && ch[0].GetRevision() == rev && ch[0].GetWatchers() == 1 && ch[0].GetAcknowledged() == 1
		})
	}
	ch := track().GetChanges()
	if len(ch) != 2 || ch[1].GetRevision() >= ch[0].GetRevision() || ch[0].GetLastAck().AsTime().Before(ch[0].GetPublished().AsTime()) {
		t.Errorf("changes = %v, want two, newest first, acknowledged after publication", ch)
	}
	// A watcher that leaves before acknowledging counts as gone: a raw
	// stream that says it acknowledges and never does.
	w.Close()
	<-applied
	sctx, stop := context.WithCancel(ctx)
	st, err := rc.Watch(sctx, connect.NewRequest(&beaconv1.WatchRequest{Services: []string{"web"}, Acknowledge: true}))
	if err != nil {
		t.Fatal(err)
	}
	if !st.Receive() {
		t.Fatalf("the silent watcher's first message: %v", st.Err())
	}
	resp, err := rc.Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{Instance: &beaconv1.Instance{Service: "web", Id: "w3", Address: "10.0.0.1", Port: 80}}))
	if err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 60*time.Second, "the change pending on the silent watcher", func() bool {
		ch := track().GetChanges()
		return len(ch) == 3 && ch[0].GetRevision() == resp.Msg.GetRevision() && ch[0].GetWatchers() == 1 && ch[0].GetAcknowledged() == 0
	})
	stop()
	st.Close()
	testutil.Eventually(t, 60*time.Second, "the silent watcher counted as gone", func() bool {
		c := track().GetChanges()[0]
		return c.GetGone() == 1 && c.GetAcknowledged() == 0
	})
}

func TestClusterStatus(t *testing.T) {
	srv := startServer(t)
	var resp *connect.Response[beaconv1.ClusterStatusResponse]
	var self *beaconv1.ClusterMember
	testutil.Eventually(t, 30*time.Second, "this server among the live ones", func() bool {
		var err error
		resp, err = regClient(srv, "", connect.WithGRPC()).ClusterStatus(context.Background(), connect.NewRequest(&beaconv1.ClusterStatusRequest{}))
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range resp.Msg.GetServers() {
			if m.GetSelf() {
				self = m
			}
		}
		return self != nil
	})
	if len(self.GetAddresses()) != 1 || self.GetAddresses()[0] != srv.Addr() {
		t.Errorf("this server = %v, want its address %s", self, srv.Addr())
	}
	etcd := resp.Msg.GetEtcd()
	if len(etcd) != 1 || !etcd[0].GetHealthy() || !etcd[0].GetLeader() || !etcd[0].GetSelf() || etcd[0].GetDbSizeBytes() <= 0 || etcd[0].GetVersion() == "" {
		t.Errorf("etcd members = %v, want one healthy leader, this server's own, with its size and version", etcd)
	}
	if len(resp.Msg.GetAlarms()) != 0 {
		t.Errorf("alarms = %v", resp.Msg.GetAlarms())
	}
}

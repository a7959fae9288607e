package server_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server"
	"beacon.dev/beacon/server/servertest"
)

func startServer(t *testing.T) *server.Server {
	return servertest.Start(t, servertest.Config(t, ""))
}

// post sends a Connect-protocol JSON call, as curl would.
func post(t *testing.T, srv *server.Server, method, body string) (int, string) {
	t.Helper()
	resp, err := http.Post("http://"+srv.Addr()+"/beacon.v1.RegistryService/"+method, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestReadyzAndHealth(t *testing.T) {
	srv := startServer(t)
	for _, path := range []string{"/livez", "/readyz", "/healthz"} {
		resp, err := http.Get("http://" + srv.Addr() + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s = %d, want 200", path, resp.StatusCode)
		}
	}
}

// Behaviour 7: bad input gets 400 / InvalidArgument naming the field and
// the limit, and nothing stored changes.
func TestBadInputIsRejectedAndNothingChanges(t *testing.T) {
	srv := startServer(t)
	good := `{"instance":{"service":"orders","id":"o-1","address":"127.0.0.1","port":9001,"tags":["v1"],"metadata":{"k":"v"}}}`
	if code, body := post(t, srv, "Register", good); code != 200 {
		t.Fatalf("Register(good) = %d %s", code, body)
	}
	_, before := post(t, srv, "ListInstances", `{"service":"orders","all":true}`)

	withInst := func(fields string) string {
		return `{"instance":{"service":"orders","id":"o-1","address":"127.0.0.1","port":9001,` + fields + `}}`
	}
	many := func(n int, f func(i int) string) string {
		parts := make([]string, n)
		for i := range parts {
			parts[i] = f(i)
		}
		return strings.Join(parts, ",")
	}
	for _, tc := range []struct {
		name, method, body string
		want               []string // substrings of the error message
	}{
		{"empty service", "Register", `{"instance":{"service":"","id":"o-1","address":"127.0.0.1","port":1}}`, []string{"service", "must not be empty"}},
		{"overlong service", "Register", `{"instance":{"service":"` + strings.Repeat("a", 64) + `","id":"o-1","address":"127.0.0.1","port":1}}`, []string{"service", "at most 63"}},
		{"ill-formed service", "Register", `{"instance":{"service":"Orders_1","id":"o-1","address":"127.0.0.1","port":1}}`, []string{"service", "lowercase"}},
		{"ill-formed namespace", "Register", withInst(`"namespace":"-prod"`), []string{"namespace"}},
		{"ill-formed id", "Register", `{"instance":{"service":"orders","id":"o 1","address":"127.0.0.1","port":1}}`, []string{"id"}},
		{"overlong id", "Register", `{"instance":{"service":"orders","id":"` + strings.Repeat("x", 129) + `","address":"127.0.0.1","port":1}}`, []string{"id", "at most 128"}},
		{"bad address", "Register", `{"instance":{"service":"orders","id":"o-1","address":"no spaces here","port":1}}`, []string{"address"}},
		{"port zero", "Register", `{"instance":{"service":"orders","id":"o-1","address":"127.0.0.1","port":0}}`, []string{"port", "between 1 and 65535"}},
		{"port too big", "Register", `{"instance":{"service":"orders","id":"o-1","address":"127.0.0.1","port":70000}}`, []string{"port", "between 1 and 65535"}},
		{"negative port", "Register", `{"instance":{"service":"orders","id":"o-1","address":"127.0.0.1","port":-1}}`, []string{"port", "between 1 and 65535"}},
		{"negative weight", "Register", withInst(`"weight":-5`), []string{"weight", "between 1 and 10000"}},
		{"weight too big", "Register", withInst(`"weight":20000`), []string{"weight", "between 1 and 10000"}},
		{"too many tags", "Register", withInst(`"tags":[` + many(33, func(i int) string { return fmt.Sprintf(`"t%d"`, i) }) + `]`), []string{"tags", "at most 32"}},
		{"overlong tag", "Register", withInst(`"tags":["` + strings.Repeat("t", 129) + `"]`), []string{"tags[0]", "at most 128"}},
		{"too many metadata entries", "Register", withInst(`"metadata":{` + many(65, func(i int) string { return fmt.Sprintf(`"k%d":"v"`, i) }) + `}`), []string{"metadata", "at most 64"}},
		{"overlong metadata value", "Register", withInst(`"metadata":{"k":"` + strings.Repeat("v", 513) + `"}`), []string{`metadata["k"]`, "at most 512"}},
		{"oversized metadata", "Register", withInst(`"metadata":{` + many(10, func(i int) string { return fmt.Sprintf(`"k%d":"%s"`, i, strings.Repeat("v", 500)) }) + `}`), []string{"metadata", "at most 4096"}},
		{"control character in version", "Register", withInst(`"version":"1\u0000"`), []string{"version", "control"}},
		{"unknown status", "Register", withInst(`"status":"BOGUS"`), []string{"status"}},
		{"missing instance", "Register", `{}`, []string{"instance", "must be set"}},
		{"malformed JSON", "Register", `{"instance":`, []string{"unmarshal"}},
		{"unknown field", "Register", withInst(`"wieght":3`), []string{"wieght"}},
		{"wrong type", "Register", `{"instance":{"service":"orders","id":"o-1","address":"127.0.0.1","port":"abc"}}`, []string{"port"}},
		{"ttl too short", "CreateSession", `{"ttl":"1s"}`, []string{"ttl", "between 2s and 1h0m0s"}},
		{"ttl not whole seconds", "CreateSession", `{"ttl":"2.5s"}`, []string{"ttl", "whole number"}},
		{"ttl malformed", "CreateSession", `{"ttl":"soon"}`, []string{"Duration", "soon"}},
		{"bad deregister id", "Deregister", `{"service":"orders","id":"a/b"}`, []string{"id"}},
		{"bad list service", "ListInstances", `{"service":"ORDERS"}`, []string{"service"}},
		{"missing session id", "KeepAlive", `{}`, []string{"session_id", "must be set"}},
		{"check without kind", "Register", withInst(`"checks":[{"interval":"1s"}]`), []string{"checks[0].kind"}},
		{"check interval too short", "Register", withInst(`"checks":[{"kind":"CHECK_KIND_TCP","interval":"0.01s"}]`), []string{"checks[0].interval", "between 100ms and 1h0m0s"}},
		{"check interval too short, the Go way", "Register", withInst(`"checks":[{"kind":"CHECK_KIND_TCP","interval":"10ms"}]`), []string{"checks[0].interval", "between 100ms and 1h0m0s", `(got "10ms")`}},
		{"check timeout above interval", "Register", withInst(`"checks":[{"kind":"CHECK_KIND_TCP","interval":"1s","timeout":"2s"}]`), []string{"checks[0].timeout", "at most the interval"}},
		{"check bad URL", "Register", withInst(`"checks":[{"kind":"CHECK_KIND_HTTP","target":"ftp://x/"}]`), []string{"checks[0].target", "http://"}},
		{"check bad expect", "Register", withInst(`"checks":[{"kind":"CHECK_KIND_HTTP","expect_status":"7xx"}]`), []string{"checks[0].expect_status"}},
		{"check threshold too big", "Register", withInst(`"checks":[{"kind":"CHECK_KIND_TCP","failures_before_critical":1000}]`), []string{"checks[0].failures_before_critical", "between 1 and 100"}},
		{"check names collide", "Register", withInst(`"checks":[{"kind":"CHECK_KIND_TCP"},{"kind":"CHECK_KIND_TCP"}]`), []string{"checks[1].name", "unique"}},
		{"too many checks", "Register", withInst(`"checks":[` + many(9, func(i int) string { return fmt.Sprintf(`{"kind":"CHECK_KIND_TCP","name":"c%d"}`, i) }) + `]`), []string{"checks", "at most 8"}},
		{"check header with newline", "Register", withInst(`"checks":[{"kind":"CHECK_KIND_HTTP","headers":{"X":"a\nb"}}]`), []string{"checks[0].headers", "line breaks"}},
		{"bad status to set", "SetStatus", `{"service":"orders","id":"o-1"}`, []string{"status"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, body := post(t, srv, tc.method, tc.body)
			if code != http.StatusBadRequest {
				t.Errorf("%s(%s) = %d %s, want 400", tc.method, tc.name, code, body)
			}
			var e struct{ Code, Message string }
			_ = json.Unmarshal([]byte(body), &e)
			if e.Code != "invalid_argument" {
				t.Errorf("code = %q, want invalid_argument", e.Code)
			}
			for _, w := range tc.want {
				if !strings.Contains(e.Message, w) {
					t.Errorf("message %q does not mention %q", e.Message, w)
				}
			}
		})
	}
	if _, after := post(t, srv, "ListInstances", `{"service":"orders","all":true}`); after != before {
		t.Errorf("bad input changed the stored state:\nbefore %s\nafter  %s", before, after)
	}
}

// The same validation reaches gRPC clients as InvalidArgument.
func TestBadInputOverGRPC(t *testing.T) {
	srv := startServer(t)
	c := beaconv1connect.NewRegistryServiceClient(h2cClient(), "http://"+srv.Addr(), connect.WithGRPC())
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err := c.Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{Instance: &beaconv1.Instance{Service: "orders", Id: "x", Address: "127.0.0.1", Port: 99999}}))
	if connect.CodeOf(err) != connect.CodeInvalidArgument || !strings.Contains(err.Error(), "port") {
		t.Errorf("Register(port 99999) over gRPC = %v, want InvalidArgument naming port", err)
	}
	st, err := c.Watch(ctx, connect.NewRequest(&beaconv1.WatchRequest{Services: []string{"Bad Name"}}))
	if err == nil {
		for st.Receive() {
		}
		err = st.Err()
		st.Close()
	}
	if connect.CodeOf(err) != connect.CodeInvalidArgument || !strings.Contains(err.Error(), "services[0]") {
		t.Errorf("Watch(bad service) = %v, want InvalidArgument naming services[0]", err)
	}
}

func h2cClient() *http.Client {
	p := new(http.Protocols)
	p.SetUnencryptedHTTP2(true)
	return &http.Client{Transport: &http.Transport{Protocols: p}}
}

func TestNDJSONWatch(t *testing.T) {
	srv := startServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+srv.Addr()+"/v1/watch?service=orders", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	lines := bufio.NewScanner(resp.Body)
	if !lines.Scan() || !strings.Contains(lines.Text(), `"synced":true`) {
		t.Fatalf("first line = %q, want the synced marker", lines.Text())
	}
	if code, body := post(t, srv, "Register", `{"instance":{"service":"orders","id":"o-1","address":"127.0.0.1","port":9001}}`); code != 200 {
		t.Fatalf("Register = %d %s", code, body)
	}
	if !lines.Scan() || !strings.Contains(lines.Text(), `"id":"o-1"`) {
		t.Fatalf("second line = %q, want a snapshot with o-1", lines.Text())
	}
	resp2, _ := http.Get("http://" + srv.Addr() + "/v1/watch?service=NO")
	if resp2.StatusCode != 400 {
		t.Errorf("GET /v1/watch?service=NO = %d, want 400", resp2.StatusCode)
	}
	resp2.Body.Close()
}

func TestMetricsExposeStableNames(t *testing.T) {
	srv := startServer(t)
	post(t, srv, "Register", `{"instance":{"service":"orders","id":"o-1","address":"127.0.0.1","port":9001}}`)
	// Gauges come from the view; a (linearizable) read makes sure it has
	// applied the registration.
	post(t, srv, "ListServices", `{}`)
	resp, err := http.Get("http://" + srv.Addr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, name := range []string{
		"beacon_sessions ", "beacon_instances 1", "beacon_services 1", "beacon_watchers ",
		`beacon_requests_total{code="ok",procedure="/beacon.v1.RegistryService/Register"} 1`,
		"beacon_request_duration_seconds_bucket", "beacon_watch_propagation_seconds_bucket",
		"beacon_watch_pending_snapshots ", `beacon_view_relists_total{reason="start"} 1`, "beacon_view_revision ",
	} {
		if !strings.Contains(string(b), name) {
			t.Errorf("/metrics lacks %q", name)
		}
	}
}

// An operator's OUT_OF_SERVICE and the checks' observations survive the
// owner registering the instance again; SetStatus puts it back.
func TestMaintenanceAndCheckStateSurviveReregistration(t *testing.T) {
	srv := startServer(t)
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// A TCP check on a port nothing listens on: it goes CRITICAL.
	in := registry.Instance{Service: "orders", ID: "o-1", Address: "127.0.0.1", Port: freePort(t),
		Checks: []registry.Check{{Kind: registry.CheckTCP, Interval: 100 * time.Millisecond, FailuresBeforeCritical: 1}}}
	if _, err := c.Register(ctx, in); err != nil {
		t.Fatal(err)
	}
	get := func() *registry.Instance {
		snap, err := c.Instances(ctx, "orders", client.All())
		if err != nil || len(snap.Instances) != 1 {
			t.Fatalf("Instances: %v, %v", snap, err)
		}
		return snap.Instances[0]
	}
	testutil.Eventually(t, 30*time.Second, "the check is CRITICAL", func() bool { return get().Health == registry.HealthCritical })
	if _, err := c.SetStatus(ctx, "orders", "o-1", registry.StatusOutOfService); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Register(ctx, in); err != nil { // the owner again, UP, checks unchanged
		t.Fatal(err)
	}
	got := get()
	if got.Status != registry.StatusOutOfService || got.Health != registry.HealthCritical || got.Checks[0].Status != registry.HealthCritical {
		t.Fatalf("after re-registration: status %v health %v check %v; want OUT_OF_SERVICE, CRITICAL kept", got.Status, got.Health, got.Checks[0].Status)
	}
	if _, err := c.SetStatus(ctx, "orders", "o-1", registry.StatusUp); err != nil {
		t.Fatal(err)
	}
	if got := get(); got.Status != registry.StatusUp {
		t.Fatalf("after SetStatus UP: %v", got.Status)
	}
	if _, err := c.SetStatus(ctx, "orders", "nope", registry.StatusUp); !errors.Is(err, client.ErrNotFound) {
		t.Fatalf("SetStatus of a missing instance: %v, want ErrNotFound", err)
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	_, p, _ := net.SplitHostPort(testutil.FreeAddr(t))
	n, _ := strconv.Atoi(p)
	return n
}

// The embedded server commits registrations through etcd's in-process KV
// (v3client), not its socket: a session that is gone must still come back
// as NotFound — one registration, and only the gone session's entries of
// concurrent registrations, which may share a group commit with a live
// session's — and the live one's are stored.
func TestRegistrationUnderAGoneSessionIsNotFoundInProcess(t *testing.T) {
	srv := startServer(t)
	session := func() string {
		// Long enough that nothing needs to keep it alive while the test
		// runs on a loaded machine.
		code, body := post(t, srv, "CreateSession", `{"ttl":"300s"}`)
		if code != 200 {
			t.Fatalf("CreateSession = %d %s", code, body)
		}
		var resp struct {
			SessionID string `json:"sessionId"`
		}
		if err := json.Unmarshal([]byte(body), &resp); err != nil || resp.SessionID == "" {
			t.Fatalf("CreateSession answered %s (%v)", body, err)
		}
		return resp.SessionID
	}
	live, gone := session(), session()
	if code, body := post(t, srv, "CloseSession", `{"sessionId":"`+gone+`"}`); code != 200 {
		t.Fatalf("CloseSession = %d %s", code, body)
	}
	reg := func(session, id string) string {
		return `{"sessionId":"` + session + `","instance":{"service":"orders","id":"` + id + `","address":"127.0.0.1","port":9001}}`
	}
	if code, body := post(t, srv, "Register", reg(gone, "o-gone")); code != http.StatusNotFound {
		t.Fatalf("Register under a closed session = %d %s, want 404 (NotFound)", code, body)
	}
	var wg sync.WaitGroup
	codes := make([]int, 40)
	errs := make([]error, len(codes))
	for i := range codes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := live
			if i%2 == 1 {
				s = gone
			}
			resp, err := http.Post("http://"+srv.Addr()+"/beacon.v1.RegistryService/Register", "application/json", strings.NewReader(reg(s, fmt.Sprintf("o-%d", i))))
			if err != nil {
				errs[i] = err
				return
			}
			resp.Body.Close()
			codes[i] = resp.StatusCode
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	for i, code := range codes {
		if want := map[bool]int{false: 200, true: http.StatusNotFound}[i%2 == 1]; code != want {
			t.Errorf("registration %d (gone session: %v) = %d, want %d", i, i%2 == 1, code, want)
		}
	}
	var list string
	testutil.Eventually(t, 30*time.Second, "every live registration is listed", func() bool {
		_, list = post(t, srv, "ListInstances", `{"service":"orders","all":true}`)
		return strings.Count(list, `"id":"o-`) >= len(codes)/2
	})
	for i := range codes {
		if stored := strings.Contains(list, fmt.Sprintf(`"o-%d"`, i)); stored != (i%2 == 0) {
			t.Errorf("o-%d stored: %v, want %v (%s)", i, stored, i%2 == 0, list)
		}
	}
}

// A single node keeps only the Raft entries it compacts to, not the 5,000
// etcd keeps for followers it does not have (each entry a group commit of
// many registrations).
func TestSingleNodeKeepsFewRaftEntriesInMemory(t *testing.T) {
	srv := startServer(t)
	if got := server.RaftEntriesKept(srv); got != 100 {
		t.Fatalf("a single node keeps %d Raft entries in memory, want 100", got)
	}
}

// A new watch's first message holds every write etcd acknowledged before
// the watch began, as a List does: a client that registers and then
// watches at once sees its own instance in the first message, every time.
func TestWatchFirstMessageHoldsWritesAcknowledgedBefore(t *testing.T) {
	srv := startServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rc := regClient(srv, "", connect.WithGRPC())
	for i := range 40 {
		svc := fmt.Sprintf("svc-%d", i)
		if _, err := c.Register(ctx, registry.Instance{Service: svc, ID: "i-1", Address: "127.0.0.1", Port: 9000 + i}); err != nil {
			t.Fatal(err)
		}
		st, err := rc.Watch(ctx, connect.NewRequest(&beaconv1.WatchRequest{Services: []string{svc}}))
		if err != nil {
			t.Fatal(err)
		}
		if !st.Receive() {
			t.Fatalf("watch of %s: %v", svc, st.Err())
		}
		var ids []string
		for _, snap := range st.Msg().GetSnapshots() {
			for _, in := range snap.GetInstances() {
				ids = append(ids, snap.GetService()+"/"+in.GetId())
			}
		}
		st.Close()
		if len(ids) != 1 || ids[0] != svc+"/i-1" {
			t.Fatalf("first message of a watch opened after registering %s/i-1 holds %v", svc, ids)
		}
	}
}

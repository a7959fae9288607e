package server_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/google/go-cmp/cmp"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/server/servertest"
)

// sdGroup is one target group of Prometheus's http_sd format.
type sdGroup struct {
	Targets []string          `json:"targets"`
	Labels  map[string]string `json:"labels"`
}

// promSDGet fetches /v1/sd/prometheus?query with a bearer token (none
// when secret is empty).
func promSDGet(t *testing.T, addr, query, secret string) (int, http.Header, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+addr+"/v1/sd/prometheus?"+query, nil)
	if secret != "" {
		req.Header.Set("Authorization", "Bearer "+secret)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, resp.Header, string(body)
}

// promSDGroups fetches and decodes an answer that must be a 200.
func promSDGroups(t *testing.T, addr, query, secret string) []sdGroup {
	t.Helper()
	code, h, body := promSDGet(t, addr, query, secret)
	if code != http.StatusOK || h.Get("Content-Type") != "application/json" {
		t.Fatalf("GET /v1/sd/prometheus?%s = %d %q %s, want 200 application/json", query, code, h.Get("Content-Type"), body)
	}
	var groups []sdGroup
	if err := json.Unmarshal([]byte(body), &groups); err != nil || groups == nil {
		t.Fatalf("GET /v1/sd/prometheus?%s: body %q is not a JSON array of target groups: %v", query, body, err)
	}
	return groups
}

// sdIDs lists the groups' __meta_beacon_service/__meta_beacon_id, in order.
func sdIDs(groups []sdGroup) []string {
	out := []string{}
	for _, g := range groups {
		out = append(out, g.Labels["__meta_beacon_service"]+"/"+g.Labels["__meta_beacon_id"])
	}
	return out
}

// awaitSD waits until the answer to query lists want (service/id): the
// view follows etcd a moment after a write returns.
func awaitSD(t *testing.T, addr, query, secret string, want ...string) {
	t.Helper()
	var last []string
	defer func() {
		if t.Failed() {
			t.Logf("GET /v1/sd/prometheus?%s last listed %v", query, last)
		}
	}()
	testutil.Eventually(t, 30*time.Second, "GET /v1/sd/prometheus?"+query+" = "+strings.Join(want, " "), func() bool {
		last = sdIDs(promSDGroups(t, addr, query, secret))
		return cmp.Equal(append([]string{}, want...), last)
	})
}

// TestPromSD: the http_sd answer's shape, labels, order and filters, an
// empty answer as [], the metrics port from metadata.
func TestPromSD(t *testing.T) {
	srv := startServer(t)
	addr := srv.Addr()

	code, h, body := promSDGet(t, addr, "", "")
	if code != http.StatusOK || h.Get("Content-Type") != "application/json" || body != "[]\n" {
		t.Fatalf("GET /v1/sd/prometheus on an empty registry = %d %q %q, want 200 application/json []", code, h.Get("Content-Type"), body)
	}

	for _, in := range []string{
		// Registered out of order: the answer is by service, then id.
		`{"service":"payments","id":"p-1","address":"10.0.0.5","port":8080,"health":"HEALTH_WARNING","metadata":{"metrics_port":"not-a-port"}}`,
		`{"service":"orders","id":"o-2","address":"127.0.0.1","port":9002,"zone":"z1","version":"1.2.0","weight":50,"tags":["v1","canary"],
		  "metadata":{"metrics_port":"9102","team.name":"dot","team-name":"dash","team_name":"exact","région":"eu"}}`,
		`{"service":"orders","id":"o-1","address":"::1","port":9001,"status":"STATUS_DRAINING"}`,
		`{"namespace":"other","service":"db","id":"d-1","address":"10.0.0.9","port":5432}`,
	} {
		if code, body := post(t, srv, "Register", `{"instance":`+in+`}`); code != http.StatusOK {
			t.Fatalf("Register(%s) = %d %s", in, code, body)
		}
	}
	awaitSD(t, addr, "namespace=other", "", "db/d-1")
	awaitSD(t, addr, "", "", "orders/o-1", "orders/o-2", "payments/p-1")
	labels := func(ns, svc, id, addr, port, zone, version, tags, weight, health, status, routable string, md ...string) map[string]string {
		l := map[string]string{
			"__meta_beacon_namespace": ns, "__meta_beacon_service": svc, "__meta_beacon_id": id,
			"__meta_beacon_address": addr, "__meta_beacon_port": port, "__meta_beacon_zone": zone,
			"__meta_beacon_version": version, "__meta_beacon_tags": tags, "__meta_beacon_weight": weight,
			"__meta_beacon_health": health, "__meta_beacon_status": status, "__meta_beacon_routable": routable,
		}
		for i := 0; i < len(md); i += 2 {
			l["__meta_beacon_metadata_"+md[i]] = md[i+1]
		}
		return l
	}
	all := []sdGroup{
		{[]string{"[::1]:9001"}, labels("default", "orders", "o-1", "::1", "9001", "", "", ",,", "100", "passing", "DRAINING", "false")},
		{[]string{"127.0.0.1:9102"}, labels("default", "orders", "o-2", "127.0.0.1", "9002", "z1", "1.2.0", ",v1,canary,", "50", "passing", "UP", "true",
			"metrics_port", "9102", "team_name", "exact", "r_gion", "eu")},
		{[]string{"10.0.0.5:8080"}, labels("default", "payments", "p-1", "10.0.0.5", "8080", "", "", ",,", "100", "warning", "UP", "true",
			"metrics_port", "not-a-port")},
	}
	if diff := cmp.Diff(all, promSDGroups(t, addr, "", "")); diff != "" {
		t.Errorf("GET /v1/sd/prometheus (-want +got):\n%s", diff)
	}

	for _, tc := range []struct {
		query string
		want  []string
	}{
		{"namespace=default", []string{"orders/o-1", "orders/o-2", "payments/p-1"}},
		{"service=payments&service=orders&service=payments", []string{"orders/o-1", "orders/o-2", "payments/p-1"}},
		{"service=payments", []string{"payments/p-1"}},
		{"service=nosuch", []string{}},
		{"tag=canary", []string{"orders/o-2"}},
		{"tag=canary&tag=v1", []string{"orders/o-2"}},
		{"tag=canary&tag=v2", []string{}},
		{"service=payments&tag=canary", []string{}},
		{"namespace=other", []string{"db/d-1"}},
		{"namespace=nosuch", []string{}},
	} {
		if diff := cmp.Diff(tc.want, sdIDs(promSDGroups(t, addr, tc.query, ""))); diff != "" {
			t.Errorf("GET /v1/sd/prometheus?%s (-want +got):\n%s", tc.query, diff)
		}
	}

	// Deregistered: gone from the next answer.
	if code, body := post(t, srv, "Deregister", `{"service":"payments","id":"p-1"}`); code != http.StatusOK {
		t.Fatalf("Deregister = %d %s", code, body)
	}
	awaitSD(t, addr, "", "", "orders/o-1", "orders/o-2")
}

// TestPromSDBadInput: a bad query is 400 naming the parameter.
func TestPromSDBadInput(t *testing.T) {
	srv := startServer(t)
	for _, tc := range []struct{ query, want string }{
		{"namespace=Bad", "invalid namespace"},
		{"namespace=a&namespace=b", "namespace: must be given at most once"},
		{"service=Orders", "invalid service"},
		{"service=", "invalid service: must not be empty"},
		{"service=orders&service=-x", "invalid service"},
		{"tag=", "invalid tag: must not be empty"},
		{"tag=" + strings.Repeat("t", 129), "invalid tag: must be at most 128 bytes"},
		{"services=orders", `invalid query parameter: must be one of namespace, service, tag (got "services")`},
	} {
		code, _, body := promSDGet(t, srv.Addr(), tc.query, "")
		if code != http.StatusBadRequest || !strings.Contains(body, tc.want) {
			t.Errorf("GET /v1/sd/prometheus?%s = %d %q, want 400 containing %q", tc.query, code, body, tc.want)
		}
	}
}

// TestPromSDMaxTargets: an answer past --max-sd-targets is refused whole,
// naming the flag, and a narrower query passes.
func TestPromSDMaxTargets(t *testing.T) {
	cfg := servertest.Config(t, "")
	cfg.Limits.MaxSDTargets = 2
	srv := servertest.Start(t, cfg)
	for _, in := range []string{
		`{"service":"orders","id":"o-1","address":"10.0.0.1","port":80}`,
		`{"service":"orders","id":"o-2","address":"10.0.0.2","port":80}`,
		`{"service":"payments","id":"p-1","address":"10.0.0.3","port":80}`,
	} {
		if code, body := post(t, srv, "Register", `{"instance":`+in+`}`); code != http.StatusOK {
			t.Fatalf("Register(%s) = %d %s", in, code, body)
		}
	}
	awaitSD(t, srv.Addr(), "service=payments", "", "payments/p-1")
	awaitSD(t, srv.Addr(), "service=orders", "", "orders/o-1", "orders/o-2")
	if code, _, body := promSDGet(t, srv.Addr(), "", ""); code != http.StatusBadRequest || !strings.Contains(body, "more than 2 targets (limit --max-sd-targets)") {
		t.Errorf("GET /v1/sd/prometheus of 3 targets = %d %q, want 400 naming --max-sd-targets", code, body)
	}
}

// TestPromSDACL: with ACLs the bearer token picks what is listed; the
// services it may not read are left out, and the header says so.
func TestPromSDACL(t *testing.T) {
	srv, _, mgmt := aclServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, svc := range []string{"web", "db"} {
		in := &beaconv1.Instance{Service: svc, Id: svc + "-1", Address: "10.0.0.1", Port: 8080}
		if _, err := regClient(srv, mgmt, connect.WithGRPC()).Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{Instance: in})); err != nil {
			t.Fatal(err)
		}
	}
	mustPolicy(t, srv, mgmt, "read-web", "read service default/web")
	web := mustToken(t, srv, mgmt, &beaconv1.AclToken{Policies: []string{"read-web"}})
	awaitSD(t, srv.Addr(), "", mgmt, "db/db-1", "web/web-1")
	for _, tc := range []struct {
		who, secret, query string
		want               []string
		filtered           bool
	}{
		{"management", mgmt, "", []string{"db/db-1", "web/web-1"}, false},
		{"read-web", web, "", []string{"web/web-1"}, true},
		{"read-web", web, "service=db&service=web", []string{"web/web-1"}, true},
		{"read-web", web, "service=db", []string{}, true},
		{"no token", "", "", []string{}, true},
	} {
		code, h, body := promSDGet(t, srv.Addr(), tc.query, tc.secret)
		var groups []sdGroup
		if code != http.StatusOK || json.Unmarshal([]byte(body), &groups) != nil {
			t.Fatalf("GET /v1/sd/prometheus?%s as %s = %d %s", tc.query, tc.who, code, body)
		}
		if diff := cmp.Diff(tc.want, sdIDs(groups)); diff != "" {
			t.Errorf("GET /v1/sd/prometheus?%s as %s (-want +got):\n%s", tc.query, tc.who, diff)
		}
		if got := h.Get("Beacon-Results-Filtered") == "true"; got != tc.filtered {
			t.Errorf("GET /v1/sd/prometheus?%s as %s: Beacon-Results-Filtered %v, want %v", tc.query, tc.who, got, tc.filtered)
		}
	}
	if code, _, body := promSDGet(t, srv.Addr(), "", "bct_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"); code != http.StatusUnauthorized {
		t.Errorf("GET /v1/sd/prometheus with an unknown token = %d %s, want 401", code, body)
	}
}

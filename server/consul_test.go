package server_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	consul "github.com/hashicorp/consul/api"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/server"
	"beacon.dev/beacon/server/servertest"
)

// The Consul-compatible API, driven by the real consul/api client
// (v1.34.5): nobody here wrote the client, so what it accepts is what
// Consul's users will send and expect.

func startConsul(t *testing.T) (*server.Server, *consul.Client) {
	t.Helper()
	cfg := servertest.Config(t, "")
	cfg.Consul.Addr = "127.0.0.1:0"
	srv := servertest.Start(t, cfg)
	return srv, consulClient(t, srv, "")
}

func consulClient(t *testing.T, srv *server.Server, token string) *consul.Client {
	t.Helper()
	cc := consul.DefaultConfig()
	cc.Address = srv.ConsulAddr()
	cc.Token = token
	cc.Transport.DisableKeepAlives = true // no idle connections left behind for goleak
	c, err := consul.NewClient(cc)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func names(entries []*consul.ServiceEntry) []string {
	var out []string
	for _, e := range entries {
		out = append(out, e.Service.ID)
	}
	slices.Sort(out)
	return out
}

func TestConsulAPIRegisterTTLCheckAndBlockingHealth(t *testing.T) {
	srv, c := startConsul(t)
	agent := c.Agent()
	if dc, err := agent.Self(); err != nil || dc["Config"]["Datacenter"] != "dc1" {
		t.Fatalf("Agent().Self() = %v, %v; want Config.Datacenter dc1", dc, err)
	}
	if leader, err := c.Status().Leader(); err != nil || leader != srv.ConsulAddr() {
		t.Fatalf("Status().Leader() = %q, %v", leader, err)
	}
	reg := &consul.AgentServiceRegistration{ID: "web1", Name: "web", Address: "127.0.0.1", Port: 8080,
		Tags: []string{"v1", "blue"}, Meta: map[string]string{"team": "shop"},
		Check: &consul.AgentServiceCheck{TTL: "30s"}}
	if err := agent.ServiceRegister(reg); err != nil {
		t.Fatal(err)
	}
	// A TTL check starts critical, as in Consul: not passing until passed.
	entries, meta, err := c.Health().Service("web", "", true, nil)
	if err != nil || len(entries) != 0 || meta.LastIndex == 0 {
		t.Fatalf("passing before the first pass = %v, index %d, %v; want none, non-zero index", names(entries), meta.LastIndex, err)
	}
	all, _, err := c.Health().Service("web", "", false, nil)
	if err != nil || len(all) != 1 || all[0].Checks.AggregatedStatus() != consul.HealthCritical {
		t.Fatalf("all = %+v, %v; want web1 critical", all, err)
	}
	if err := agent.PassTTL("service:web1", "ok"); err != nil {
		t.Fatal(err)
	}
	var index uint64
	testutil.Eventually(t, 30*time.Second, "web1 passing", func() bool {
		entries, meta, err := c.Health().Service("web", "", true, nil)
		index = meta.LastIndex
		return err == nil && slices.Equal(names(entries), []string{"web1"})
	})
	e, _, _ := c.Health().Service("web", "blue", true, nil)
	if len(e) != 1 || e[0].Service.Port != 8080 || e[0].Service.Meta["team"] != "shop" || e[0].Node.Node == "" || e[0].Service.Address != "127.0.0.1" {
		t.Fatalf("entry = %+v", e)
	}
	if e, _, _ := c.Health().ServiceMultipleTags("web", []string{"blue", "green"}, false, nil); len(e) != 0 {
		t.Fatalf("tags blue AND green = %v, want none", names(e))
	}

	// Another service's change leaves web's index where it is: a query
	// blocked on web would not wake for it (Consul's coarse index would).
	if err := agent.ServiceRegister(&consul.AgentServiceRegistration{ID: "db1", Name: "db", Address: "127.0.0.1", Port: 5432}); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "db listed", func() bool {
		svcs, _, err := c.Catalog().Services(nil)
		return err == nil && svcs["db"] != nil && slices.Equal(svcs["web"], []string{"blue", "v1"})
	})
	if _, meta, _ := c.Health().Service("web", "", true, nil); meta.LastIndex != index {
		t.Fatalf("web's index moved from %d to %d when db changed", index, meta.LastIndex)
	}

	// A blocked query wakes when its service changes.
	type result struct {
		ids   []string
		index uint64
		err   error
	}
	woke := make(chan result, 1)
	go func() {
		entries, meta, err := c.Health().Service("web", "", true, &consul.QueryOptions{WaitIndex: index, WaitTime: 2 * time.Minute})
		woke <- result{names(entries), meta.LastIndex, err}
	}()
	if err := agent.ServiceRegister(&consul.AgentServiceRegistration{ID: "web2", Name: "web", Address: "127.0.0.2", Port: 8080,
		Check: &consul.AgentServiceCheck{TTL: "30s", Status: consul.HealthPassing}}); err != nil {
		t.Fatal(err)
	}
	r := <-woke
	if r.err != nil || r.index <= index || !slices.Contains(r.ids, "web2") {
		t.Fatalf("blocked query woke with %v, index %d (was %d), %v; want web2 and a larger index", r.ids, r.index, index, r.err)
	}

	// Maintenance (beacon: OUT_OF_SERVICE) and a failed check take an
	// instance out of the passing answer.
	if err := agent.EnableServiceMaintenance("web2", "deploy"); err != nil {
		t.Fatal(err)
	}
	if err := agent.FailTTL("service:web1", "down"); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "no passing web", func() bool {
		entries, _, err := c.Health().Service("web", "", true, nil)
		return err == nil && len(entries) == 0
	})
	cat, _, err := c.Catalog().Service("web", "", nil)
	if err != nil || len(cat) != 2 || cat[0].ServicePort != 8080 {
		t.Fatalf("Catalog().Service = %+v, %v", cat, err)
	}
	// The filter subset.
	f, _, err := c.Health().Service("web", "", false, &consul.QueryOptions{Filter: `Service.Address == "127.0.0.2" and "team" not in Service.Meta`})
	if err != nil || !slices.Equal(names(f), []string{"web2"}) {
		t.Fatalf("filter = %v, %v; want web2", names(f), err)
	}
	if _, _, err := c.Health().Service("web", "", false, &consul.QueryOptions{Filter: `Checks.Status == passing`}); err == nil || !strings.Contains(err.Error(), "400") {
		t.Fatalf("unserved filter selector: %v, want 400", err)
	}
	if err := agent.ServiceDeregister("web2"); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "web2 gone", func() bool {
		all, _, err := c.Health().Service("web", "", false, nil)
		return err == nil && slices.Equal(names(all), []string{"web1"})
	})
}

func TestConsulAPIRefusesWhatItCannotMap(t *testing.T) {
	srv, c := startConsul(t)
	for _, reg := range []*consul.AgentServiceRegistration{
		{Name: "web", Port: 80, Kind: consul.ServiceKindConnectProxy, Proxy: &consul.AgentServiceConnectProxyConfig{DestinationServiceName: "x"}},
		{Name: "web", Port: 80, Check: &consul.AgentServiceCheck{Args: []string{"/bin/true"}, Interval: "10s"}},
		{Name: "Web_Upper", Port: 80},
	} {
		if err := c.Agent().ServiceRegister(reg); err == nil || !strings.Contains(err.Error(), "400") {
			t.Errorf("register %+v: %v, want a 400 naming the field", reg, err)
		}
	}
	if _, _, err := c.Health().Service("web", "", false, &consul.QueryOptions{Datacenter: "dc2"}); err == nil || !strings.Contains(err.Error(), "dc2") {
		t.Errorf("dc2: %v, want refused naming it", err)
	}
	resp, err := http.Get("http://" + srv.ConsulAddr() + "/v1/connect/ca/roots")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound || !strings.Contains(string(body), "interop.md") {
		t.Errorf("unserved endpoint = %d %q", resp.StatusCode, body)
	}
}

func TestConsulAPIKV(t *testing.T) {
	_, c := startConsul(t)
	kv := c.KV()
	if p, _, err := kv.Get("app/missing", nil); err != nil || p != nil {
		t.Fatalf("missing key = %+v, %v; want nil (404)", p, err)
	}
	if _, err := kv.Put(&consul.KVPair{Key: "app/db/url", Value: []byte("postgres://a"), Flags: 42}, nil); err != nil {
		t.Fatal(err)
	}
	p, meta, err := kv.Get("app/db/url", nil)
	if err != nil || p == nil || string(p.Value) != "postgres://a" || p.Flags != 42 || p.ModifyIndex == 0 || meta.LastIndex != p.ModifyIndex {
		t.Fatalf("Get = %+v, %+v, %v", p, meta, err)
	}
	// CAS on a stale index fails and changes nothing; on the current one it lands.
	if ok, _, err := kv.CAS(&consul.KVPair{Key: "app/db/url", Value: []byte("stale"), ModifyIndex: p.ModifyIndex - 1}, nil); err != nil || ok {
		t.Fatalf("CAS stale = %v, %v; want false", ok, err)
	}
	if ok, _, err := kv.CAS(&consul.KVPair{Key: "app/db/url", Value: []byte("postgres://b"), ModifyIndex: p.ModifyIndex}, nil); err != nil || !ok {
		t.Fatalf("CAS current = %v, %v; want true", ok, err)
	}
	if ok, _, err := kv.CAS(&consul.KVPair{Key: "app/new", Value: []byte("x")}, nil); err != nil || !ok {
		t.Fatalf("CAS create (index 0) = %v, %v; want true", ok, err)
	}
	if ok, _, err := kv.CAS(&consul.KVPair{Key: "app/new", Value: []byte("y")}, nil); err != nil || ok {
		t.Fatalf("CAS create on an existing key = %v, %v; want false", ok, err)
	}
	kv.Put(&consul.KVPair{Key: "app/db/user", Value: []byte("shop")}, nil)
	list, _, err := kv.List("app/", nil)
	if err != nil || len(list) != 3 || string(list[0].Value) != "postgres://b" {
		t.Fatalf("List = %+v, %v", list, err)
	}
	keys, _, err := kv.Keys("app/", "/", nil)
	if err != nil || !slices.Equal(keys, []string{"app/db/", "app/new"}) {
		t.Fatalf("Keys(app/, /) = %v, %v", keys, err)
	}
	// A blocked Get wakes on its key's change.
	p, meta, _ = kv.Get("app/new", nil)
	woke := make(chan *consul.KVPair, 1)
	go func() {
		p, _, _ := kv.Get("app/new", &consul.QueryOptions{WaitIndex: meta.LastIndex, WaitTime: time.Minute})
		woke <- p
	}()
	kv.Put(&consul.KVPair{Key: "app/new", Value: []byte("z")}, nil)
	if got := <-woke; got == nil || string(got.Value) != "z" {
		t.Fatalf("blocked Get woke with %+v, want z", got)
	}
	if _, err := kv.Delete("app/new", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := kv.DeleteTree("app/db", nil); err != nil {
		t.Fatal(err)
	}
	if list, _, _ := kv.List("app/", nil); len(list) != 0 {
		t.Fatalf("after deletes: %+v", list)
	}
	if _, err := kv.Put(&consul.KVPair{Key: "bad key"}, nil); err == nil {
		t.Fatal("a key with a space was accepted")
	}
}

// api.Lock, as consul/api implements it (a session, acquire, a blocking
// read of the key while another holds it, release), excludes a second
// client until the first unlocks.
func TestConsulAPILockMutualExclusion(t *testing.T) {
	srv, c1 := startConsul(t)
	c2 := consulClient(t, srv, "")
	l1, err := c1.LockKey("jobs/leader")
	if err != nil {
		t.Fatal(err)
	}
	l2, err := c2.LockKey("jobs/leader")
	if err != nil {
		t.Fatal(err)
	}
	lost1, err := l1.Lock(nil)
	if err != nil || lost1 == nil {
		t.Fatalf("first Lock = %v", err)
	}
	p, _, err := c1.KV().Get("jobs/leader", nil)
	if err != nil || p == nil || p.Session == "" || p.Flags != consul.LockFlagValue || p.LockIndex != 1 {
		t.Fatalf("held key = %+v, %v", p, err)
	}
	holder := p.Session
	got2 := make(chan error, 1)
	stop2 := make(chan struct{})
	go func() {
		_, err := l2.Lock(stop2)
		got2 <- err
	}()
	// While the first holds it, the second waits: the key still names the first.
	select {
	case err := <-got2:
		t.Fatalf("second Lock returned while the first held it: %v", err)
	default:
	}
	if p, _, _ := c1.KV().Get("jobs/leader", nil); p.Session != holder {
		t.Fatalf("holder changed to %q while locked", p.Session)
	}
	if err := l1.Unlock(); err != nil {
		t.Fatal(err)
	}
	if err := <-got2; err != nil {
		t.Fatalf("second Lock after Unlock: %v", err)
	}
	p, _, _ = c2.KV().Get("jobs/leader", nil)
	if p.Session == "" || p.Session == holder || p.LockIndex != 2 {
		t.Fatalf("after handoff: %+v, want a new holder and LockIndex 2", p)
	}
	if err := l2.Unlock(); err != nil {
		t.Fatal(err)
	}
	_ = l2.Destroy()
	_ = l1.Destroy()
}

// TestConsulAPIACL: Consul's token forms (X-Consul-Token, ?token=) are
// beacon ACL tokens, and each Consul surface asks for the permission its
// beacon counterpart does: reads are filtered, writes refused with 403.
func TestConsulAPIACL(t *testing.T) {
	cfg := servertest.Config(t, "")
	cfg.ACL = true
	cfg.Consul.Addr = "127.0.0.1:0"
	srv := servertest.Start(t, cfg)
	boot, err := aclClient(srv, "", connect.WithGRPC()).Bootstrap(context.Background(), connect.NewRequest(&beaconv1.BootstrapRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	mgmt := boot.Msg.GetToken().GetSecretId()
	mustPolicy(t, srv, mgmt, "read-web", "read service default/web\nread key default/app/*")
	mustPolicy(t, srv, mgmt, "app-write", "write key default/app/*")
	tokens := map[string]string{
		"no-token":   "",
		"read-only":  mustToken(t, srv, mgmt, &beaconv1.AclToken{Policies: []string{"read-web"}}),
		"id-web":     mustToken(t, srv, mgmt, &beaconv1.AclToken{ServiceIdentities: []*beaconv1.AclServiceIdentity{{Service: "web"}}}),
		"app-write":  mustToken(t, srv, mgmt, &beaconv1.AclToken{Policies: []string{"app-write", "read-web"}}),
		"management": mgmt,
	}
	admin := consulClient(t, srv, mgmt)
	if err := admin.Agent().ServiceRegister(&consul.AgentServiceRegistration{ID: "web1", Name: "web", Address: "127.0.0.1", Port: 80}); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.KV().Put(&consul.KVPair{Key: "app/x", Value: []byte("1")}, nil); err != nil {
		t.Fatal(err)
	}
	type op struct {
		name    string
		allowed []string // tokens allowed (reads: that see the data); the rest are refused or filtered
		call    func(c *consul.Client) (bool, error)
	}
	ops := []op{
		{"health read", []string{"read-only", "id-web", "app-write", "management"}, func(c *consul.Client) (bool, error) {
			e, _, err := c.Health().Service("web", "", false, nil)
			return len(e) == 1, err
		}},
		{"catalog services", []string{"read-only", "id-web", "app-write", "management"}, func(c *consul.Client) (bool, error) {
			s, _, err := c.Catalog().Services(nil)
			return s["web"] != nil, err
		}},
		{"register web", []string{"id-web", "management"}, func(c *consul.Client) (bool, error) {
			err := c.Agent().ServiceRegister(&consul.AgentServiceRegistration{ID: "web9", Name: "web", Address: "127.0.0.9", Port: 80})
			return err == nil, err
		}},
		{"kv get", []string{"read-only", "app-write", "management"}, func(c *consul.Client) (bool, error) {
			p, _, err := c.KV().Get("app/x", nil)
			return p != nil, err
		}},
		{"kv put", []string{"app-write", "management"}, func(c *consul.Client) (bool, error) {
			_, err := c.KV().Put(&consul.KVPair{Key: "app/x", Value: []byte("2")}, nil)
			return err == nil, err
		}},
		{"session create", []string{"id-web", "management"}, func(c *consul.Client) (bool, error) {
			id, _, err := c.Session().Create(&consul.SessionEntry{TTL: "15s"}, nil)
			if err == nil {
				c.Session().Destroy(id, nil)
			}
			return err == nil, err
		}},
	}
	for _, o := range ops {
		for name, secret := range tokens {
			ok, err := o.call(consulClient(t, srv, secret))
			want := slices.Contains(o.allowed, name)
			if ok != want {
				t.Errorf("%s with %s: allowed=%v (err %v), want %v", o.name, name, ok, err, want)
			}
			if !ok && err != nil && !strings.Contains(err.Error(), "403") && !strings.Contains(err.Error(), "Permission denied") {
				t.Errorf("%s with %s: refused with %v, want a 403", o.name, name, err)
			}
		}
	}
	// ?token= works as the header does.
	resp, err := http.Get("http://" + srv.ConsulAddr() + "/v1/health/service/web?token=" + tokens["read-only"])
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), `"web1"`) {
		t.Errorf("?token= read = %d %s", resp.StatusCode, body)
	}
}

// A session that ends releases what it held: the key's ModifyIndex
// moves (a blocked reader wakes), its Session is cleared, the session's
// lock delay holds off other acquirers, and a "delete" session's keys go.
func TestConsulAPISessionEndReleasesLocks(t *testing.T) {
	_, c := startConsul(t)
	s1, _, err := c.Session().Create(&consul.SessionEntry{TTL: "15s", LockDelay: time.Hour / 60}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if ok, _, err := c.KV().Acquire(&consul.KVPair{Key: "jobs/a", Value: []byte("me"), Session: s1}, nil); err != nil || !ok {
		t.Fatalf("Acquire = %v, %v", ok, err)
	}
	p, meta, _ := c.KV().Get("jobs/a", nil)
	if p.Session != s1 {
		t.Fatalf("holder = %q, want %q", p.Session, s1)
	}
	info, _, err := c.Session().Info(s1, nil)
	if err != nil || info == nil || info.TTL != "15s" || info.Behavior != "release" {
		t.Fatalf("Info = %+v, %v", info, err)
	}
	if e, _, err := c.Session().Renew(s1, nil); err != nil || e == nil || e.ID != s1 {
		t.Fatalf("Renew = %+v, %v", e, err)
	}
	woke := make(chan *consul.KVPair, 1)
	go func() {
		p, _, _ := c.KV().Get("jobs/a", &consul.QueryOptions{WaitIndex: meta.LastIndex, WaitTime: time.Minute})
		woke <- p
	}()
	if _, err := c.Session().Destroy(s1, nil); err != nil {
		t.Fatal(err)
	}
	if p := <-woke; p == nil || p.ModifyIndex <= meta.LastIndex {
		t.Fatalf("blocked Get woke with %+v", p)
	}
	testutil.Eventually(t, 30*time.Second, "released", func() bool {
		p, _, err := c.KV().Get("jobs/a", nil)
		return err == nil && p != nil && p.Session == "" && string(p.Value) == "me"
	})
	s2, _, err := c.Session().Create(&consul.SessionEntry{TTL: "15s", Behavior: consul.SessionBehaviorDelete}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if ok, _, err := c.KV().Acquire(&consul.KVPair{Key: "jobs/a", Session: s2}, nil); err != nil || ok {
		t.Fatalf("Acquire within the lost holder's lock delay = %v, %v; want false", ok, err)
	}
	if ok, _, err := c.KV().Acquire(&consul.KVPair{Key: "jobs/b", Value: []byte("x"), Session: s2}, nil); err != nil || !ok {
		t.Fatalf("Acquire jobs/b = %v, %v", ok, err)
	}
	if _, err := c.Session().Destroy(s2, nil); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "a delete session's key deleted", func() bool {
		p, _, err := c.KV().Get("jobs/b", nil)
		return err == nil && p == nil
	})
	if ok, _, err := c.KV().Acquire(&consul.KVPair{Key: "jobs/c", Session: s2}, nil); err == nil || ok {
		t.Fatalf("Acquire with an ended session = %v, %v; want an error", ok, err)
	}
	if e, _, err := c.Session().Renew(s2, nil); err != nil || e != nil {
		t.Fatalf("Renew of an ended session = %+v, %v; want nil (404)", e, err)
	}
}

func TestConsulAPITxn(t *testing.T) {
	_, c := startConsul(t)
	kv := c.KV()
	ok, resp, _, err := kv.Txn(consul.KVTxnOps{
		{Verb: consul.KVSet, Key: "cfg/a", Value: []byte("1"), Flags: 7},
		{Verb: consul.KVCheckNotExists, Key: "cfg/b"},
		{Verb: consul.KVSet, Key: "cfg/c", Value: []byte("3")},
	}, nil)
	if err != nil || !ok || len(resp.Results) != 2 || resp.Results[0].Flags != 7 {
		t.Fatalf("Txn = %v, %+v, %v", ok, resp, err)
	}
	a, _, _ := kv.Get("cfg/a", nil)
	// All or nothing: a stale check-index fails the whole transaction.
	ok, resp, _, err = kv.Txn(consul.KVTxnOps{
		{Verb: consul.KVSet, Key: "cfg/c", Value: []byte("changed")},
		{Verb: consul.KVCheckIndex, Key: "cfg/a", Index: a.ModifyIndex + 1},
	}, nil)
	if err != nil || ok || len(resp.Errors) != 1 || resp.Errors[0].OpIndex != 1 {
		t.Fatalf("stale Txn = %v, %+v, %v; want a failure at op 1", ok, resp, err)
	}
	if p, _, _ := kv.Get("cfg/c", nil); string(p.Value) != "3" {
		t.Fatalf("a failed transaction wrote cfg/c = %q", p.Value)
	}
	ok, resp, _, err = kv.Txn(consul.KVTxnOps{
		{Verb: consul.KVCAS, Key: "cfg/a", Value: []byte("2"), Index: a.ModifyIndex},
		{Verb: consul.KVDelete, Key: "cfg/c"},
		{Verb: consul.KVGet, Key: "cfg/a"},
	}, nil)
	if err != nil || !ok || len(resp.Results) != 2 || string(resp.Results[1].Value) != "2" {
		t.Fatalf("cas+delete+get Txn = %v, %+v, %v", ok, resp, err)
	}
	if p, _, _ := kv.Get("cfg/c", nil); p != nil {
		t.Fatalf("cfg/c still there: %+v", p)
	}
}

// With --tls-cert the Consul API is served over TLS with the API's
// certificate (consul/api with CONSUL_HTTP_SSL / a CA file connects), and
// cleartext is refused; beyond loopback it needs TLS and ACLs.
func TestConsulAPIOverTLS(t *testing.T) {
	dir := t.TempDir()
	ca := testutil.NewCA(t, "consul-ca")
	cfg := servertest.Config(t, "")
	cfg.TLSCertFile, cfg.TLSKeyFile = ca.Issue(t, dir, "server", testutil.CertSpec{Names: []string{"127.0.0.1"}})
	cfg.Consul.Addr = "127.0.0.1:0"
	srv := servertest.Start(t, cfg)
	cc := consul.DefaultConfig()
	cc.Address = srv.ConsulAddr()
	cc.Scheme = "https"
	cc.TLSConfig.CAFile = ca.WriteCert(t, dir+"/ca.pem")
	c, err := consul.NewClient(cc)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Agent().Self(); err != nil {
		t.Fatalf("over TLS: %v", err)
	}
	if _, err := consulClient(t, srv, "").Agent().Self(); err == nil {
		t.Fatal("cleartext request to a TLS Consul listener answered")
	}

	open := servertest.Config(t, "")
	open.Consul.Addr = "0.0.0.0:0"
	if err := open.Validate(); err == nil || !strings.Contains(err.Error(), "--consul-addr") {
		t.Fatalf("Validate with --consul-addr 0.0.0.0 in the clear = %v, want refused naming the flag", err)
	}
}

// What the review of the first cut found, each pinned down.
func TestConsulAPIEdgeCases(t *testing.T) {
	srv, c := startConsul(t)
	ctx := context.Background()

	// An explicit CheckID of Consul's default form is found by its id.
	if err := c.Agent().ServiceRegister(&consul.AgentServiceRegistration{ID: "web1", Name: "web", Address: "127.0.0.1", Port: 80,
		Check: &consul.AgentServiceCheck{CheckID: "service:web1", TTL: "30s"}}); err != nil {
		t.Fatal(err)
	}
	if err := c.Agent().PassTTL("service:web1", ""); err != nil {
		t.Fatalf("PassTTL on an explicit service:ID CheckID: %v", err)
	}
	testutil.Eventually(t, 30*time.Second, "web1 passing", func() bool {
		e, _, err := c.Health().Service("web", "", true, nil)
		return err == nil && len(e) == 1 && e[0].Checks[1].CheckID == "service:web1"
	})
	// An HTTP check starts critical, as Consul's do.
	if err := c.Agent().ServiceRegister(&consul.AgentServiceRegistration{ID: "api1", Name: "api", Address: "127.0.0.1", Port: 1,
		Check: &consul.AgentServiceCheck{HTTP: "http://127.0.0.1:1/health", Interval: "1h"}}); err != nil {
		t.Fatal(err)
	}
	if e, _, err := c.Health().Service("api", "", false, nil); err != nil || len(e) != 1 || e[0].Checks.AggregatedStatus() != consul.HealthCritical {
		t.Fatalf("a new HTTP check = %+v, %v; want critical", e, err)
	}

	// DeleteCAS compares in the delete's own transaction.
	kv := c.KV()
	kv.Put(&consul.KVPair{Key: "d/x", Value: []byte("1")}, nil)
	p, _, _ := kv.Get("d/x", nil)
	kv.Put(&consul.KVPair{Key: "d/x", Value: []byte("2")}, nil)
	if ok, _, err := kv.DeleteCAS(&consul.KVPair{Key: "d/x", ModifyIndex: p.ModifyIndex}, nil); err != nil || ok {
		t.Fatalf("DeleteCAS on a stale index = %v, %v; want false", ok, err)
	}
	p, _, _ = kv.Get("d/x", nil)
	if ok, _, err := kv.DeleteCAS(p, nil); err != nil || !ok {
		t.Fatalf("DeleteCAS on the current index = %v, %v; want true", ok, err)
	}

	// A key deleted and made again through beacon's own API carries
	// nothing of its Consul past: no holder, no flags.
	sid, _, err := c.Session().Create(&consul.SessionEntry{TTL: "15s"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Session().Destroy(sid, nil)
	if ok, _, err := kv.Acquire(&consul.KVPair{Key: "d/lock", Session: sid, Flags: 9}, nil); err != nil || !ok {
		t.Fatalf("Acquire = %v, %v", ok, err)
	}
	native := kvClient(srv)
	if _, err := native.Delete(ctx, connect.NewRequest(&beaconv1.KVDeleteRequest{Key: "d/lock"})); err != nil {
		t.Fatal(err)
	}
	if _, err := native.Put(ctx, connect.NewRequest(&beaconv1.KVPutRequest{Key: "d/lock", Value: []byte("new")})); err != nil {
		t.Fatal(err)
	}
	if p, _, err := kv.Get("d/lock", nil); err != nil || p == nil || p.Session != "" || p.Flags != 0 || p.LockIndex != 0 {
		t.Fatalf("recreated key = %+v, %v; want no session, flags or lock index", p, err)
	}
	sid2, _, _ := c.Session().Create(&consul.SessionEntry{TTL: "15s"}, nil)
	defer c.Session().Destroy(sid2, nil)
	if ok, _, err := kv.Acquire(&consul.KVPair{Key: "d/lock", Session: sid2}, nil); err != nil || !ok {
		t.Fatalf("Acquire of the recreated key = %v, %v; want true", ok, err)
	}

	// A transaction naming more keys than one etcd transaction holds is
	// refused by name; a get of a missing key fails the transaction.
	var big consul.KVTxnOps
	for i := range 26 {
		big = append(big, &consul.KVTxnOp{Verb: consul.KVSet, Key: fmt.Sprintf("t/k%02d", i), Value: []byte("v")})
	}
	if _, _, _, err := kv.Txn(big, nil); err == nil || !strings.Contains(err.Error(), "at most 25") {
		t.Fatalf("26-key Txn: %v, want refused naming the limit", err)
	}
	if ok, _, _, err := kv.Txn(big[:25], nil); err != nil || !ok {
		t.Fatalf("25-key Txn = %v, %v", ok, err)
	}
	ok, resp, _, err := kv.Txn(consul.KVTxnOps{{Verb: consul.KVSet, Key: "t/new", Value: []byte("v")}, {Verb: consul.KVGet, Key: "t/absent"}}, nil)
	if err != nil || ok || len(resp.Errors) != 1 || resp.Errors[0].OpIndex != 1 {
		t.Fatalf("Txn with a get of a missing key = %v, %+v, %v", ok, resp, err)
	}
	if p, _, _ := kv.Get("t/new", nil); p != nil {
		t.Fatal("a failed transaction wrote t/new")
	}
	ok, resp, _, err = kv.Txn(consul.KVTxnOps{{Verb: consul.KVCheckIndex, Key: "t/absent", Index: 0}}, nil)
	if err != nil || ok || len(resp.Errors) != 1 {
		t.Fatalf("check-index on a missing key = %v, %+v, %v; want a failure", ok, resp, err)
	}
	if ok, _, err := kv.DeleteCAS(&consul.KVPair{Key: "t/absent", ModifyIndex: 5}, nil); err != nil || !ok {
		t.Fatalf("DeleteCAS of a missing key = %v, %v; want true, as Consul", ok, err)
	}

	// A "delete" session's lock delay outlives the key it deleted.
	sd, _, err := c.Session().Create(&consul.SessionEntry{TTL: "15s", Behavior: consul.SessionBehaviorDelete, LockDelay: time.Minute}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if ok, _, err := kv.Acquire(&consul.KVPair{Key: "d/job", Value: []byte("x"), Session: sd}, nil); err != nil || !ok {
		t.Fatalf("Acquire d/job = %v, %v", ok, err)
	}
	c.Session().Destroy(sd, nil)
	testutil.Eventually(t, 30*time.Second, "d/job deleted with its session", func() bool {
		p, _, err := kv.Get("d/job", nil)
		return err == nil && p == nil
	})
	if ok, _, err := kv.Acquire(&consul.KVPair{Key: "d/job", Value: []byte("y"), Session: sid2}, nil); err != nil || ok {
		t.Fatalf("Acquire within a deleted key's lock delay = %v, %v; want false", ok, err)
	}

	// Parameters beacon cannot honour are refused, not ignored.
	if _, _, err := c.Health().Service("web", "", false, &consul.QueryOptions{NodeMeta: map[string]string{"rack": "a"}}); err == nil || !strings.Contains(err.Error(), "node-meta") {
		t.Fatalf("node-meta: %v, want refused naming it", err)
	}
}

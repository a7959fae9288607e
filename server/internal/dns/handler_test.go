package dns_test

import (
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	mdns "github.com/miekg/dns"

	"beacon.dev/beacon/internal/chisq"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/internal/dns"
)

// registrySource is a Source over fixed snapshots.
type registrySource map[registry.ServiceKey]*registry.Snapshot

func (r registrySource) Snapshot(sk registry.ServiceKey) (*registry.Snapshot, bool) {
	return r[sk], true
}

// source builds snapshots from instances (namespace "default" unless set).
func source(ins ...*registry.Instance) registrySource {
	r := registrySource{}
	for _, in := range ins {
		if in.Namespace == "" {
			in.Namespace = registry.DefaultNamespace
		}
		in.ApplyDefaults()
		sk := registry.ServiceKey{Namespace: in.Namespace, Service: in.Service}
		if r[sk] == nil {
			r[sk] = &registry.Snapshot{Namespace: in.Namespace, Service: in.Service}
		}
		r[sk].Instances = append(r[sk].Instances, in)
	}
	return r
}

func inst(svc, id, addr string, mods ...func(*registry.Instance)) *registry.Instance {
	in := &registry.Instance{Service: svc, ID: id, Address: addr, Port: 8080}
	for _, m := range mods {
		m(in)
	}
	return in
}

func tags(t ...string) func(*registry.Instance) { return func(in *registry.Instance) { in.Tags = t } }
func zone(z string) func(*registry.Instance)    { return func(in *registry.Instance) { in.Zone = z } }
func weight(w int) func(*registry.Instance)     { return func(in *registry.Instance) { in.Weight = w } }
func port(p int) func(*registry.Instance)       { return func(in *registry.Instance) { in.Port = p } }
func status(s registry.Status) func(*registry.Instance) {
	return func(in *registry.Instance) { in.Status = s }
}
func meta(k, v string) func(*registry.Instance) {
	return func(in *registry.Instance) { in.Metadata = map[string]string{k: v} }
}
func namespace(ns string) func(*registry.Instance) {
	return func(in *registry.Instance) { in.Namespace = ns }
}

func handler(t *testing.T, cfg dns.Config, src dns.Source) *dns.Handler {
	t.Helper()
	if cfg.Now == nil {
		cfg.Now = func() time.Time { return time.Unix(1700000000, 0) }
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.New(rand.NewPCG(1, 2)).Float64
	}
	h, err := dns.NewHandler(cfg, src)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

var querier = netip.MustParseAddr("127.0.0.1")

func ask(t *testing.T, h *dns.Handler, qname string, qtype uint16) *mdns.Msg {
	t.Helper()
	req := new(mdns.Msg)
	req.SetQuestion(qname, qtype)
	resp, size := h.Answer(req, querier, false)
	resp.Truncate(size)
	return resp
}

// rrs renders a section as sorted "TYPE data ttl" strings.
func rrs(section []mdns.RR) []string {
	var out []string
	for _, rr := range section {
		hdr := rr.Header()
		data := strings.TrimPrefix(rr.String(), hdr.String())
		out = append(out, fmt.Sprintf("%s %s %s %d", hdr.Name, mdns.TypeToString[hdr.Rrtype], data, hdr.Ttl))
	}
	slices.Sort(out)
	return out
}

func wantRcode(t *testing.T, resp *mdns.Msg, rcode int, what string) {
	t.Helper()
	if resp.Rcode != rcode {
		t.Fatalf("%s: rcode = %s, want %s\n%v", what, mdns.RcodeToString[resp.Rcode], mdns.RcodeToString[rcode], resp)
	}
}

// wantNegative checks a negative answer: rcode, no answer, the SOA in the
// authority section with the negative TTL as its TTL and minimum.
func wantNegative(t *testing.T, resp *mdns.Msg, rcode int, negTTL uint32, what string) {
	t.Helper()
	wantRcode(t, resp, rcode, what)
	if len(resp.Answer) != 0 || len(resp.Ns) != 1 {
		t.Fatalf("%s: answer %v, authority %v; want none and the SOA", what, resp.Answer, resp.Ns)
	}
	soa, ok := resp.Ns[0].(*mdns.SOA)
	if !ok || soa.Hdr.Ttl != negTTL || soa.Minttl != negTTL || soa.Hdr.Name != "consul." || soa.Ns != "ns.consul." || soa.Mbox != "hostmaster.consul." {
		t.Fatalf("%s: authority %v, want the SOA of consul. with TTL and minimum %d", what, resp.Ns[0], negTTL)
	}
	if !resp.Authoritative {
		t.Fatalf("%s: AA not set", what)
	}
}

func TestAnswers(t *testing.T) {
	src := source(
		inst("web", "w1", "10.0.0.1", tags("v1")),
		inst("web", "w2", "10.0.0.2", tags("v2", "Canary"), port(9090)),
		inst("web", "w3", "10.0.0.3", tags("v2"), status(registry.StatusDraining)),
		inst("db", "d1", "2001:db8::1"),
		inst("cache", "c1", "cache-1.example.com", port(6379)),
		inst("down", "x1", "10.0.9.1", status(registry.StatusOutOfService)),
		inst("web", "p1", "10.1.0.1", namespace("prod")),
	)
	h := handler(t, dns.Config{}, src)

	resp := ask(t, h, "web.service.consul.", mdns.TypeA)
	wantRcode(t, resp, mdns.RcodeSuccess, "A web")
	if got, want := rrs(resp.Answer), []string{"web.service.consul. A 10.0.0.1 5", "web.service.consul. A 10.0.0.2 5"}; !slices.Equal(got, want) {
		t.Errorf("A web = %v, want %v (w3 drains)", got, want)
	}
	if !resp.Authoritative || resp.Truncated || resp.RecursionAvailable {
		t.Errorf("A web: AA %v TC %v RA %v, want AA only", resp.Authoritative, resp.Truncated, resp.RecursionAvailable)
	}

	// The name exists, but has no IPv6 address: NODATA.
	wantNegative(t, ask(t, h, "web.service.consul.", mdns.TypeAAAA), mdns.RcodeSuccess, 5, "AAAA web")
	wantNegative(t, ask(t, h, "web.service.consul.", mdns.TypeTXT), mdns.RcodeSuccess, 5, "TXT web")
	// Never registered: NXDOMAIN.
	wantNegative(t, ask(t, h, "nope.service.consul.", mdns.TypeA), mdns.RcodeNameError, 5, "A nope")
	// Registered, nothing routable: NODATA, not NXDOMAIN (which would
	// tell resolvers the service is gone).
	wantNegative(t, ask(t, h, "down.service.consul.", mdns.TypeA), mdns.RcodeSuccess, 5, "A down")
	wantNegative(t, ask(t, h, "down.service.consul.", mdns.TypeSRV), mdns.RcodeSuccess, 5, "SRV down")

	resp = ask(t, h, "db.service.consul.", mdns.TypeAAAA)
	if got, want := rrs(resp.Answer), []string{"db.service.consul. AAAA 2001:db8::1 5"}; !slices.Equal(got, want) {
		t.Errorf("AAAA db = %v, want %v", got, want)
	}

	// SRV, the target's address in the additional section.
	for _, qname := range []string{"_web._tcp.service.consul.", "web.service.consul."} {
		resp = ask(t, h, qname, mdns.TypeSRV)
		wantRcode(t, resp, mdns.RcodeSuccess, "SRV "+qname)
		if got, want := rrs(resp.Answer), []string{
			qname + " SRV 1 100 8080 0a000001.addr.consul. 5",
			qname + " SRV 1 100 9090 0a000002.addr.consul. 5",
		}; !slices.Equal(got, want) {
			t.Errorf("SRV %s = %v, want %v", qname, got, want)
		}
		if got, want := rrs(resp.Extra), []string{"0a000001.addr.consul. A 10.0.0.1 5", "0a000002.addr.consul. A 10.0.0.2 5"}; !slices.Equal(got, want) {
			t.Errorf("SRV %s additional = %v, want %v", qname, got, want)
		}
	}
	// The target resolves too.
	resp = ask(t, h, "0a000002.addr.consul.", mdns.TypeA)
	if got, want := rrs(resp.Answer), []string{"0a000002.addr.consul. A 10.0.0.2 5"}; !slices.Equal(got, want) {
		t.Errorf("A of the target = %v, want %v", got, want)
	}
	wantNegative(t, ask(t, h, "0a000002.addr.consul.", mdns.TypeAAAA), mdns.RcodeSuccess, 5, "AAAA of an IPv4 target")
	resp = ask(t, h, "_db._tcp.service.consul.", mdns.TypeSRV)
	if got, want := rrs(resp.Extra), []string{"20010db8000000000000000000000001.addr.consul. AAAA 2001:db8::1 5"}; !slices.Equal(got, want) {
		t.Errorf("SRV db additional = %v, want %v", got, want)
	}
	// A host name is its own target; it has no A records here.
	resp = ask(t, h, "cache.service.consul.", mdns.TypeSRV)
	if got, want := rrs(resp.Answer), []string{"cache.service.consul. SRV 1 100 6379 cache-1.example.com. 5"}; !slices.Equal(got, want) || len(resp.Extra) != 0 {
		t.Errorf("SRV cache = %v + %v, want %v and no additional", got, resp.Extra, want)
	}
	wantNegative(t, ask(t, h, "cache.service.consul.", mdns.TypeA), mdns.RcodeSuccess, 5, "A cache")

	// Tags, both forms, case-insensitively.
	for _, qname := range []string{"v2.web.service.consul.", "_web._v2.service.consul.", "canary.web.service.consul.", "V2.WEB.service.consul."} {
		resp = ask(t, h, qname, mdns.TypeA)
		if got := rrs(resp.Answer); len(got) != 1 || !strings.HasSuffix(got[0], "A 10.0.0.2 5") {
			t.Errorf("A %s = %v, want w2 alone", qname, got)
		}
	}
	wantNegative(t, ask(t, h, "v3.web.service.consul.", mdns.TypeA), mdns.RcodeNameError, 5, "A of an unknown tag")

	// Namespaces.
	resp = ask(t, h, "web.service.prod.consul.", mdns.TypeA)
	if got, want := rrs(resp.Answer), []string{"web.service.prod.consul. A 10.1.0.1 5"}; !slices.Equal(got, want) {
		t.Errorf("A web in prod = %v, want %v", got, want)
	}
	resp = ask(t, h, "web.service.default.consul.", mdns.TypeA)
	if len(resp.Answer) != 2 {
		t.Errorf("A web in default, named = %v, want 2 answers", resp.Answer)
	}
	wantNegative(t, ask(t, h, "db.service.prod.consul.", mdns.TypeAAAA), mdns.RcodeNameError, 5, "AAAA db in prod")

	// Empty non-terminals and the apex.
	for _, qname := range []string{"service.consul.", "_tcp.service.consul.", "prod.consul.", "service.prod.consul.", "addr.consul."} {
		wantNegative(t, ask(t, h, qname, mdns.TypeA), mdns.RcodeSuccess, 5, "A "+qname)
	}
	resp = ask(t, h, "consul.", mdns.TypeSOA)
	if len(resp.Answer) != 1 || resp.Answer[0].(*mdns.SOA).Serial != 1700000000 {
		t.Errorf("SOA consul. = %v, want the SOA (serial the clock's)", resp.Answer)
	}
	wantNegative(t, ask(t, h, "consul.", mdns.TypeA), mdns.RcodeSuccess, 5, "A consul.")

	// Not ours.
	wantRcode(t, ask(t, h, "example.com.", mdns.TypeA), mdns.RcodeRefused, "A example.com.")
	wantRcode(t, ask(t, h, "consul.", mdns.TypeAXFR), mdns.RcodeRefused, "AXFR consul.")
}

func TestTTLs(t *testing.T) {
	src := source(inst("web", "w1", "10.0.0.1"), inst("db", "d1", "10.0.0.2"), inst("db", "p1", "10.0.0.3", namespace("prod")))
	h := handler(t, dns.Config{
		TTL: 30 * time.Second, NegativeTTL: 7 * time.Second,
		ServiceTTL: map[registry.ServiceKey]time.Duration{
			{Service: "db"}:                    time.Minute,
			{Namespace: "prod", Service: "db"}: 0,
		},
	}, src)
	for _, tt := range []struct {
		qname string
		ttl   uint32
	}{{"web.service.consul.", 30}, {"db.service.consul.", 60}, {"db.service.prod.consul.", 0}} {
		resp := ask(t, h, tt.qname, mdns.TypeA)
		if len(resp.Answer) != 1 || resp.Answer[0].Header().Ttl != tt.ttl {
			t.Errorf("A %s = %v, want TTL %d", tt.qname, resp.Answer, tt.ttl)
		}
	}
	wantNegative(t, ask(t, h, "nope.service.consul.", mdns.TypeA), mdns.RcodeNameError, 7, "NXDOMAIN")
}

func TestPriorityAndWeight(t *testing.T) {
	src := source(
		inst("web", "a", "10.0.0.1", weight(300)),
		inst("web", "b", "10.0.0.2", meta("tier", "1")),
		inst("web", "c", "10.0.0.3", meta("tier", "x")), // malformed: a primary
	)
	h := handler(t, dns.Config{}, src)
	resp := ask(t, h, "web.service.consul.", mdns.TypeSRV)
	got := map[string][2]uint16{}
	for _, rr := range resp.Answer {
		srv := rr.(*mdns.SRV)
		got[srv.Target] = [2]uint16{srv.Priority, srv.Weight}
	}
	want := map[string][2]uint16{
		"0a000001.addr.consul.": {1, 300},
		"0a000002.addr.consul.": {2, 100},
		"0a000003.addr.consul.": {1, 100},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("SRV priority and weight = %v, want %v", got, want)
	}
	// Backups come last in every answer.
	for range 20 {
		resp := ask(t, h, "web.service.consul.", mdns.TypeA)
		if last := resp.Answer[2].(*mdns.A).A.String(); last != "10.0.0.2" {
			t.Fatalf("A web = %v, want the backup 10.0.0.2 last", resp.Answer)
		}
	}
}

// The first address of an A answer is each instance's with the
// probability of its share of the weight.
func TestWeightedOrder(t *testing.T) {
	weights := []int{100, 200, 700}
	var ins []*registry.Instance
	for i, w := range weights {
		ins = append(ins, inst("web", fmt.Sprint(i), fmt.Sprintf("10.0.0.%d", i+1), weight(w)))
	}
	h := handler(t, dns.Config{}, source(ins...))
	counts := make([]int, len(weights))
	for range 3000 {
		resp := ask(t, h, "web.service.consul.", mdns.TypeA)
		counts[resp.Answer[0].(*mdns.A).A.To4()[3]-1]++
	}
	probs := []float64{0.1, 0.2, 0.7}
	if err := chisq.Fit(counts, probs); err != nil {
		t.Errorf("first answers %v for weights %v: %v", counts, weights, err)
	}
}

func TestZoneFirst(t *testing.T) {
	var ins []*registry.Instance
	for i := range 6 {
		z := "a"
		if i%2 == 1 {
			z = "b"
		}
		ins = append(ins, inst("web", fmt.Sprint(i), fmt.Sprintf("10.0.0.%d", i+1), zone(z)))
	}
	h := handler(t, dns.Config{Zones: []dns.Zone{
		{Prefix: netip.MustParsePrefix("127.0.0.0/8"), Name: "b"},
		{Prefix: netip.MustParsePrefix("192.0.2.0/24"), Name: "a"},
		{Prefix: netip.MustParsePrefix("192.0.2.128/25"), Name: "b"},
	}}, source(ins...))
	zoneOf := func(a string) string { // 10.0.0.1, .3, .5 are in a
		if (a[len(a)-1]-'0')%2 == 1 {
			return "a"
		}
		return "b"
	}
	order := func(resp *mdns.Msg) string {
		s := ""
		for _, rr := range resp.Answer {
			s += zoneOf(rr.(*mdns.A).A.String())
		}
		return s
	}
	// By the querier's address.
	for range 10 {
		if got := order(ask(t, h, "web.service.consul.", mdns.TypeA)); got != "bbbaaa" {
			t.Fatalf("zones of the answers to 127.0.0.1 = %s, want bbbaaa", got)
		}
	}
	// By EDNS Client Subnet, whose scope the answer echoes; the longest
	// prefix wins.
	for _, tt := range []struct {
		subnet string
		want   string
		scope  uint8
	}{{"192.0.2.7", "aaabbb", 24}, {"192.0.2.200", "bbbaaa", 25}, {"198.51.100.1", "bbbaaa", 0}} {
		req := new(mdns.Msg)
		req.SetQuestion("web.service.consul.", mdns.TypeA)
		req.SetEdns0(1232, false)
		req.IsEdns0().Option = append(req.IsEdns0().Option, &mdns.EDNS0_SUBNET{
			Code: mdns.EDNS0SUBNET, Family: 1, SourceNetmask: 32, Address: netip.MustParseAddr(tt.subnet).AsSlice(),
		})
		resp, _ := h.Answer(req, querier, false)
		if got := order(resp); got != tt.want {
			t.Errorf("zones of the answers to client subnet %s = %s, want %s", tt.subnet, got, tt.want)
		}
		opt := resp.IsEdns0()
		if opt == nil || len(opt.Option) != 1 || opt.Option[0].(*mdns.EDNS0_SUBNET).SourceScope != tt.scope {
			t.Errorf("client subnet %s: answer's OPT %v, want the subnet echoed with scope %d", tt.subnet, opt, tt.scope)
		}
	}
}

func TestProtectionThreshold(t *testing.T) {
	src := source(
		inst("web", "w1", "10.0.0.1"),
		inst("web", "w2", "10.0.0.2", func(in *registry.Instance) { in.Health = registry.HealthCritical }),
		inst("web", "w3", "10.0.0.3", func(in *registry.Instance) { in.Health = registry.HealthCritical }),
	)
	h := handler(t, dns.Config{}, src)
	if resp := ask(t, h, "web.service.consul.", mdns.TypeA); len(resp.Answer) != 1 {
		t.Fatalf("without a threshold: %v, want w1 alone", resp.Answer)
	}
	src[registry.ServiceKey{Namespace: "default", Service: "web"}].ProtectionThreshold = 0.5
	if resp := ask(t, h, "web.service.consul.", mdns.TypeA); len(resp.Answer) != 3 {
		t.Fatalf("under the threshold: %v, want all three", resp.Answer)
	}
}

func TestAllowed(t *testing.T) {
	src := source(inst("web", "w1", "10.0.0.1"), inst("secret", "s1", "10.0.0.2"))
	h := handler(t, dns.Config{Allowed: func(ns, svc string) bool { return svc == "web" }}, src)
	wantRcode(t, ask(t, h, "web.service.consul.", mdns.TypeA), mdns.RcodeSuccess, "A web")
	// As if it did not exist: the same answer as a name never registered.
	wantNegative(t, ask(t, h, "secret.service.consul.", mdns.TypeA), mdns.RcodeNameError, 5, "A secret")
	wantNegative(t, ask(t, h, "_secret._tcp.service.consul.", mdns.TypeSRV), mdns.RcodeNameError, 5, "SRV secret")

	h = handler(t, dns.Config{AllowFrom: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}}, src)
	wantRcode(t, ask(t, h, "web.service.consul.", mdns.TypeA), mdns.RcodeRefused, "A web from outside --dns-allow-cidr")
}

func TestNotReady(t *testing.T) {
	h := handler(t, dns.Config{}, dns.SourceFunc(func(registry.ServiceKey) (*registry.Snapshot, bool) { return nil, false }))
	resp := ask(t, h, "web.service.consul.", mdns.TypeA)
	wantRcode(t, resp, mdns.RcodeServerFailure, "A web before the registry is loaded")
}

func TestEDNS(t *testing.T) {
	var ins []*registry.Instance
	for i := range 40 {
		ins = append(ins, inst("web", fmt.Sprint(i), fmt.Sprintf("10.0.%d.%d", i/200, i%200+1)))
	}
	h := handler(t, dns.Config{}, source(ins...))
	query := func(bufsize uint16, version uint8) *mdns.Msg {
		req := new(mdns.Msg)
		req.SetQuestion("web.service.consul.", mdns.TypeSRV)
		if bufsize > 0 {
			req.SetEdns0(bufsize, false)
			req.IsEdns0().SetVersion(version)
		}
		resp, size := h.Answer(req, querier, false)
		resp.Truncate(size)
		b, err := resp.Pack()
		if err != nil {
			t.Fatal(err)
		}
		if len(b) > size {
			t.Fatalf("answer of %d bytes for %d allowed", len(b), size)
		}
		return resp
	}
	if resp := query(0, 0); !resp.Truncated || len(resp.Answer) >= 40 {
		t.Errorf("SRV of 40 without EDNS0: TC %v with %d answers, want TC and fewer", resp.Truncated, len(resp.Answer))
	}
	if resp := query(4096, 0); !resp.Truncated || resp.IsEdns0().UDPSize() != dns.DefaultMaxUDPSize {
		t.Errorf("SRV of 40 with a 4096-byte buffer: TC %v, OPT %v; want TC (capped at %d) and our size", resp.Truncated, resp.IsEdns0(), dns.DefaultMaxUDPSize)
	}
	h = handler(t, dns.Config{MaxUDPSize: 4096}, source(ins...))
	if resp := query(4096, 0); resp.Truncated || len(resp.Answer) != 40 || len(resp.Extra) != 41 {
		t.Errorf("SRV of 40 with a 4096-byte buffer allowed: TC %v, %d answers, %d additional; want all 40 and their addresses and the OPT", resp.Truncated, len(resp.Answer), len(resp.Extra))
	}
	resp := query(4096, 1)
	if resp.Rcode != mdns.RcodeBadVers || resp.IsEdns0() == nil {
		t.Errorf("EDNS version 1: rcode %s, OPT %v; want BADVERS with an OPT", mdns.RcodeToString[resp.Rcode], resp.IsEdns0())
	}
}

func TestNewHandlerRefusesBadConfig(t *testing.T) {
	for _, cfg := range []dns.Config{
		{Domain: "."},
		{Domain: "bad domain"},
		{Domain: "a..b"},
		{TTL: -time.Second},
		{NegativeTTL: 48 * time.Hour},
		{MaxUDPSize: 100},
		{MaxUDPSize: 65535},
		{ServiceTTL: map[registry.ServiceKey]time.Duration{{Service: "web"}: -1}},
	} {
		if _, err := dns.NewHandler(cfg, registrySource{}); err == nil {
			t.Errorf("NewHandler(%+v) = nil error", cfg)
		}
	}
	h, err := dns.NewHandler(dns.Config{Domain: "Beacon.Example"}, registrySource{})
	if err != nil || h.Domain() != "beacon.example." {
		t.Errorf("NewHandler(Beacon.Example) domain %q, %v; want beacon.example.", h.Domain(), err)
	}
}

func mustPrefix(s string) netip.Prefix { return netip.MustParsePrefix(s) }

// BenchmarkServeDNS: one SRV query of a service of three instances,
// answered and packed (no sockets).
func BenchmarkServeDNS(b *testing.B) {
	src := source(inst("web", "a", "10.0.0.1"), inst("web", "b", "10.0.0.2"), inst("web", "c", "10.0.0.3"))
	h, err := dns.NewHandler(dns.Config{Rand: rand.Float64}, src)
	if err != nil {
		b.Fatal(err)
	}
	req := new(mdns.Msg)
	req.SetQuestion("_web._tcp.service.consul.", mdns.TypeSRV)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		w := &discard{from: &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 5353}}
		for pb.Next() {
			h.ServeDNS(w, req, false)
		}
	})
}

type discard struct {
	mdns.ResponseWriter
	from net.Addr
}

func (d *discard) RemoteAddr() net.Addr        { return d.from }
func (d *discard) Write(b []byte) (int, error) { return len(b), nil }

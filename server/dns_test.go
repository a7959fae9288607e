package server_test

import (
	"context"
	"fmt"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	mdns "github.com/miekg/dns"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server"
	"beacon.dev/beacon/server/servertest"
)

// dnsServer starts a server with the DNS interface on a free loopback
// port and a client of its API.
func dnsServer(t *testing.T, edit func(*server.Config)) (*server.Server, *client.Client) {
	t.Helper()
	cfg := servertest.Config(t, "")
	cfg.DNS.Addr = "127.0.0.1:0"
	if edit != nil {
		edit(cfg)
	}
	srv := servertest.Start(t, cfg)
	if srv.DNSAddr() == "" {
		t.Fatal("DNSAddr() is empty with --dns-addr set")
	}
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return srv, c
}

func dnsQuery(t *testing.T, network, addr, name string, qtype uint16, edns uint16) *mdns.Msg {
	t.Helper()
	req := new(mdns.Msg)
	req.SetQuestion(name, qtype)
	if edns > 0 {
		req.SetEdns0(edns, false)
	}
	c := &mdns.Client{Net: network, Timeout: 30 * time.Second, UDPSize: 65535}
	resp, _, err := c.Exchange(req, addr)
	if err != nil {
		t.Fatalf("%s %s %s: %v", network, name, mdns.TypeToString[qtype], err)
	}
	return resp
}

// addresses of A and AAAA records in a section, sorted.
func addresses(section []mdns.RR) []string {
	var out []string
	for _, rr := range section {
		switch r := rr.(type) {
		case *mdns.A:
			out = append(out, r.A.String())
		case *mdns.AAAA:
			out = append(out, r.AAAA.String())
		}
	}
	slices.Sort(out)
	return out
}

func register(t *testing.T, c *client.Client, ins ...registry.Instance) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, in := range ins {
		if _, err := c.Register(ctx, in); err != nil {
			t.Fatalf("Register(%s/%s): %v", in.Service, in.ID, err)
		}
	}
}

func isNegative(resp *mdns.Msg, rcode int) bool {
	if resp.Rcode != rcode || len(resp.Answer) != 0 || len(resp.Ns) != 1 || !resp.Authoritative {
		return false
	}
	_, ok := resp.Ns[0].(*mdns.SOA)
	return ok
}

// TestDNS: the names, answers and negative answers of the DNS interface
// against a real server, over real UDP and TCP.
func TestDNS(t *testing.T) {
	srv, c := dnsServer(t, nil)
	addr := srv.DNSAddr()
	register(t, c,
		registry.Instance{Service: "web", ID: "w1", Address: "10.0.0.1", Port: 8080, Tags: []string{"v1"}},
		registry.Instance{Service: "web", ID: "w2", Address: "10.0.0.2", Port: 8081, Tags: []string{"v2"}, Weight: 300, Metadata: map[string]string{"tier": "1"}},
		registry.Instance{Namespace: "prod", Service: "web", ID: "p1", Address: "10.1.0.1", Port: 9000},
	)
	// Each registration is its own write: wait until the view holds all
	// three, prod's included, before asserting on any.
	testutil.Eventually(t, 30*time.Second, "web's two addresses, and prod's one, over DNS", func() bool {
		return len(dnsQuery(t, "udp", addr, "web.service.consul.", mdns.TypeA, 0).Answer) == 2 &&
			len(dnsQuery(t, "tcp", addr, "web.service.prod.consul.", mdns.TypeA, 0).Answer) == 1
	})

	resp := dnsQuery(t, "udp", addr, "web.service.consul.", mdns.TypeA, 0)
	if got, want := addresses(resp.Answer), []string{"10.0.0.1", "10.0.0.2"}; !slices.Equal(got, want) || !resp.Authoritative || resp.Answer[0].Header().Ttl != 5 {
		t.Errorf("A web = %v (AA %v), want %v, authoritative, TTL 5", resp.Answer, resp.Authoritative, want)
	}
	if resp := dnsQuery(t, "udp", addr, "web.service.consul.", mdns.TypeAAAA, 0); !isNegative(resp, mdns.RcodeSuccess) {
		t.Errorf("AAAA web = %v, want NODATA with the SOA", resp)
	}
	if resp := dnsQuery(t, "udp", addr, "nope.service.consul.", mdns.TypeA, 0); !isNegative(resp, mdns.RcodeNameError) {
		t.Errorf("A nope = %v, want NXDOMAIN with the SOA", resp)
	}

	resp = dnsQuery(t, "udp", addr, "_web._tcp.service.consul.", mdns.TypeSRV, 0)
	var srvs []string
	for _, rr := range resp.Answer {
		s := rr.(*mdns.SRV)
		srvs = append(srvs, fmt.Sprintf("%d %d %d %s", s.Priority, s.Weight, s.Port, s.Target))
	}
	slices.Sort(srvs)
	if want := []string{"1 100 8080 0a000001.addr.consul.", "2 300 8081 0a000002.addr.consul."}; !slices.Equal(srvs, want) {
		t.Errorf("SRV _web._tcp = %v, want %v", srvs, want)
	}
	if got, want := addresses(resp.Extra), []string{"10.0.0.1", "10.0.0.2"}; !slices.Equal(got, want) {
		t.Errorf("SRV _web._tcp additional = %v, want %v", resp.Extra, want)
	}
	if got := addresses(dnsQuery(t, "udp", addr, "0a000002.addr.consul.", mdns.TypeA, 0).Answer); !slices.Equal(got, []string{"10.0.0.2"}) {
		t.Errorf("A of an SRV target = %v, want 10.0.0.2", got)
	}

	for _, name := range []string{"v2.web.service.consul.", "_web._v2.service.consul."} {
		if got := addresses(dnsQuery(t, "udp", addr, name, mdns.TypeA, 0).Answer); !slices.Equal(got, []string{"10.0.0.2"}) {
			t.Errorf("A %s = %v, want 10.0.0.2 alone", name, got)
		}
	}
	if got := addresses(dnsQuery(t, "tcp", addr, "web.service.prod.consul.", mdns.TypeA, 0).Answer); !slices.Equal(got, []string{"10.1.0.1"}) {
		t.Errorf("A web in prod = %v, want 10.1.0.1", got)
	}

	// A draining instance leaves the answers; the name stays (NODATA
	// when nothing is left, never NXDOMAIN).
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := c.SetStatus(ctx, "web", "w1", registry.StatusDraining); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "the draining w1 out of the answers", func() bool {
		return slices.Equal(addresses(dnsQuery(t, "udp", addr, "web.service.consul.", mdns.TypeA, 0).Answer), []string{"10.0.0.2"})
	})
	if _, err := c.SetStatus(ctx, "web", "w2", registry.StatusDraining); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "web NODATA with both draining", func() bool {
		return isNegative(dnsQuery(t, "udp", addr, "web.service.consul.", mdns.TypeA, 0), mdns.RcodeSuccess)
	})
}

// TestDNSTruncation: forty instances do not fit 512 bytes; the UDP
// answer says so (TC) and TCP carries them all; an EDNS0 buffer is
// honoured up to --dns-max-udp-size.
func TestDNSTruncation(t *testing.T) {
	srv, c := dnsServer(t, nil)
	addr := srv.DNSAddr()
	var ins []registry.Instance
	for i := range 40 {
		ins = append(ins, registry.Instance{Service: "big", ID: fmt.Sprint("b", i), Address: fmt.Sprintf("10.2.0.%d", i+1), Port: 7000 + i})
	}
	register(t, c, ins...)
	testutil.Eventually(t, 30*time.Second, "forty instances over TCP", func() bool {
		return len(dnsQuery(t, "tcp", addr, "big.service.consul.", mdns.TypeA, 0).Answer) == 40
	})
	for _, qtype := range []uint16{mdns.TypeA, mdns.TypeSRV} {
		udp := dnsQuery(t, "udp", addr, "big.service.consul.", qtype, 0)
		if !udp.Truncated || len(udp.Answer) >= 40 {
			t.Errorf("%s over UDP: TC %v with %d answers, want TC", mdns.TypeToString[qtype], udp.Truncated, len(udp.Answer))
		}
		tcp := dnsQuery(t, "tcp", addr, "big.service.consul.", qtype, 0)
		if tcp.Truncated || len(tcp.Answer) != 40 {
			t.Errorf("%s over TCP: TC %v with %d answers, want all 40", mdns.TypeToString[qtype], tcp.Truncated, len(tcp.Answer))
		}
	}
	// 40 A records fit 1232 bytes: a query advertising 4096 gets them all
	// over UDP; 40 SRV records and their addresses do not: TC.
	if resp := dnsQuery(t, "udp", addr, "big.service.consul.", mdns.TypeA, 4096); resp.Truncated || len(resp.Answer) != 40 {
		t.Errorf("A over UDP with EDNS0 4096: TC %v with %d answers, want all 40", resp.Truncated, len(resp.Answer))
	}
	if resp := dnsQuery(t, "udp", addr, "big.service.consul.", mdns.TypeSRV, 4096); !resp.Truncated || resp.IsEdns0() == nil || resp.IsEdns0().UDPSize() != 1232 {
		t.Errorf("SRV over UDP with EDNS0 4096: TC %v, OPT %v; want TC and our 1232", resp.Truncated, resp.IsEdns0())
	}
	// Counted: three truncated UDP answers, and the TCP ones.
	if v, _ := testutil.Metric(t, srv.Addr(), "beacon_dns_truncated_total"); v != 3 {
		t.Errorf("beacon_dns_truncated_total = %v, want 3", v)
	}
	if v, _ := testutil.Metric(t, srv.Addr(), `beacon_dns_queries_total{rcode="NOERROR",transport="tcp"}`); v < 3 {
		t.Errorf(`beacon_dns_queries_total{rcode="NOERROR",transport="tcp"} = %v, want at least 3`, v)
	}
}

// TestDNSConfigValidate: a DNS listener beyond loopback needs ACLs,
// --dns-allow-cidr or --insecure; bad flags are named.
func TestDNSConfigValidate(t *testing.T) {
	for _, tt := range []struct {
		edit func(*server.DNSConfig)
		want string
	}{
		{func(c *server.DNSConfig) { c.Addr = "0.0.0.0:8600" }, "--dns-addr 0.0.0.0:8600 is reachable beyond this machine"},
		{func(c *server.DNSConfig) { c.Addr = "127.0.0.1" }, "--dns-addr"},
		{func(c *server.DNSConfig) { c.Domain = "bad domain" }, "--dns-domain"},
		{func(c *server.DNSConfig) { c.TTL = time.Millisecond }, "--dns-ttl"},
		{func(c *server.DNSConfig) { c.NegativeTTL = 48 * time.Hour }, "--dns-negative-ttl"},
		{func(c *server.DNSConfig) { c.ServiceTTL = []string{"web"} }, "--dns-service-ttl"},
		{func(c *server.DNSConfig) { c.ServiceTTL = []string{"Web=5s"} }, "--dns-service-ttl"},
		{func(c *server.DNSConfig) { c.ServiceTTL = []string{"web=5s", "web=6s"} }, "given twice"},
		{func(c *server.DNSConfig) { c.ZoneCIDRs = []string{"a=10.0.0.0"} }, "--dns-zone-cidr"},
		{func(c *server.DNSConfig) { c.AllowCIDRs = []string{"nope"} }, "--dns-allow-cidr"},
		{func(c *server.DNSConfig) { c.MaxUDPSize = 100 }, "--dns-max-udp-size"},
		{func(c *server.DNSConfig) { c.MaxTCPConns = -1 }, "--dns-max-tcp-conns"},
		{func(c *server.DNSConfig) { c.MaxQueryBytes = 1 }, "--dns-max-query-bytes"},
	} {
		cfg := servertest.Config(t, "")
		cfg.DNS.Addr = "127.0.0.1:0"
		tt.edit(&cfg.DNS)
		if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Validate(%+v) = %v, want an error naming %q", cfg.DNS, err, tt.want)
		}
	}
	for _, edit := range []func(*server.Config){
		func(c *server.Config) { c.DNS.AllowCIDRs = []string{"10.0.0.0/8"} },
		func(c *server.Config) { c.ACL = true },
		func(c *server.Config) { c.Insecure = true },
	} {
		cfg := servertest.Config(t, "")
		cfg.DNS.Addr = "0.0.0.0:8600"
		edit(cfg)
		if err := cfg.Validate(); err != nil {
			t.Errorf("DNS beyond loopback with ACLs, allowed CIDRs or --insecure: %v", err)
		}
	}
}

// TestDNSAddrInUse: a DNS address another socket holds fails Start at
// once, naming the flag.
func TestDNSAddrInUse(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	cfg := servertest.Config(t, "")
	cfg.DNS.Addr = pc.LocalAddr().String()
	if srv, err := servertest.StartErr(cfg); err == nil || !strings.Contains(err.Error(), "--dns-addr") {
		if srv != nil {
			srv.Close()
		}
		t.Fatalf("Start with --dns-addr in use = %v, want an error naming --dns-addr", err)
	}
}

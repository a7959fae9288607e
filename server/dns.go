package server

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	mdns "github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"

	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/internal/acl"
	"beacon.dev/beacon/server/internal/dns"
)

// The DNS interface (docs/interop.md, "DNS"): A, AAAA and SRV records of
// the registry's available instances under a domain (Consul's "consul."
// by default), served over UDP and TCP from the in-memory view.
// server/internal/dns is the protocol; this file its configuration, its
// source (the view), its ACL (the anonymous token's policy) and its
// metrics.

// DNSConfig configures the DNS interface. Zero fields take their defaults.
type DNSConfig struct {
	// Addr is its address, for UDP and TCP (Consul's port is 8600);
	// empty: off.
	Addr string
	// Domain is the zone served (default "consul.", for Consul's clients
	// unchanged).
	Domain string
	// TTL of positive answers (default 5s) and NegativeTTL of NXDOMAIN
	// and NODATA (the SOA's minimum; default 5s), both 1s to 24h.
	TTL, NegativeTTL time.Duration
	// ServiceTTL overrides TTL for some services: "SERVICE=DURATION" (in
	// every namespace) or "NAMESPACE/SERVICE=DURATION", 0s to 24h.
	ServiceTTL []string
	// ZoneCIDRs place queriers in zones, "ZONE=CIDR": answers list the
	// instances of the querier's zone first. The querier is the EDNS
	// Client Subnet of the query when a CIDR covers it, else the address
	// the query came from.
	ZoneCIDRs []string
	// AllowCIDRs, when set, are the only sources answered; others get
	// REFUSED.
	AllowCIDRs []string
	// MaxUDPSize caps a UDP answer whatever the query's EDNS0 buffer
	// (default 1232, DNS Flag Day 2020's size that avoids IP
	// fragmentation; 512 to 4096). Larger answers set TC and go over TCP.
	MaxUDPSize int
	// MaxTCPConns bounds the open TCP connections (default 256),
	// MaxInFlight the UDP queries being answered at once (default 1024),
	// MaxQueryBytes one query (default 512).
	MaxTCPConns, MaxInFlight, MaxQueryBytes int
	// ReadTimeout bounds reading the first query of a TCP connection
	// (default 2s), IdleTimeout the wait for the next (default 8s), and
	// WriteTimeout each write of an answer (default 2s).
	ReadTimeout, IdleTimeout, WriteTimeout time.Duration
}

// DefaultDNSAddr is the address docs/interop.md suggests: Consul's DNS
// port, on loopback. The interface is off unless --dns-addr is given.
const DefaultDNSAddr = "127.0.0.1:8600"

func (c *DNSConfig) bindFlags(fs *pflag.FlagSet) {
	fs.StringVar(&c.Addr, "dns-addr", c.Addr, "serve DNS here over UDP and TCP (e.g. "+DefaultDNSAddr+"; default: off)")
	fs.StringVar(&c.Domain, "dns-domain", c.Domain, "the DNS zone served (default consul., as Consul's clients expect)")
	fs.DurationVar(&c.TTL, "dns-ttl", c.TTL, "TTL of DNS answers, 1s to 24h (default 5s)")
	fs.DurationVar(&c.NegativeTTL, "dns-negative-ttl", c.NegativeTTL, "how long resolvers may cache NXDOMAIN and NODATA (the SOA minimum), 1s to 24h (default 5s)")
	fs.StringSliceVar(&c.ServiceTTL, "dns-service-ttl", c.ServiceTTL, "TTL of one service's DNS answers, SERVICE=DURATION or NAMESPACE/SERVICE=DURATION (repeatable)")
	fs.StringSliceVar(&c.ZoneCIDRs, "dns-zone-cidr", c.ZoneCIDRs, "queriers (resolvers, or EDNS client subnets) in this CIDR are in this zone and get its instances first, ZONE=CIDR (repeatable)")
	fs.StringSliceVar(&c.AllowCIDRs, "dns-allow-cidr", c.AllowCIDRs, "answer DNS queries only from these CIDRs, REFUSED to others (repeatable; default: all)")
	fs.IntVar(&c.MaxUDPSize, "dns-max-udp-size", c.MaxUDPSize, "largest UDP answer whatever the query's EDNS0 buffer, 512 to 4096; larger answers set TC and go over TCP (default 1232)")
	fs.IntVar(&c.MaxTCPConns, "dns-max-tcp-conns", c.MaxTCPConns, "open DNS TCP connections at most (default 256)")
	fs.IntVar(&c.MaxInFlight, "dns-max-inflight", c.MaxInFlight, "UDP queries being answered at once at most; more are dropped (default 1024)")
	fs.IntVar(&c.MaxQueryBytes, "dns-max-query-bytes", c.MaxQueryBytes, "longest DNS query; longer ones are dropped (default 512)")
	fs.DurationVar(&c.ReadTimeout, "dns-read-timeout", c.ReadTimeout, "time to read the first query of a DNS TCP connection (default 2s)")
	fs.DurationVar(&c.IdleTimeout, "dns-idle-timeout", c.IdleTimeout, "how long an idle DNS TCP connection stays open (default 8s)")
	fs.DurationVar(&c.WriteTimeout, "dns-write-timeout", c.WriteTimeout, "time to write one DNS answer over TCP before the connection is closed (default 2s)")
}

// validate checks the DNS flags; acl and insecure are the server's.
func (c *DNSConfig) validate(aclOn, insecure bool) error {
	if c.Addr == "" {
		return nil
	}
	_, _, err := c.parse()
	if err != nil {
		return err
	}
	if !insecure && !aclOn && len(c.AllowCIDRs) == 0 && !loopback(c.Addr) {
		return fmt.Errorf("server: --dns-addr %s is reachable beyond this machine and would answer anyone about every service: turn on --acl (DNS then answers what the anonymous token may read), or limit its queriers with --dns-allow-cidr, or give --insecure (docs/security.md)", c.Addr)
	}
	return nil
}

// parse turns the flags into the DNS package's configuration.
func (c *DNSConfig) parse() (dns.Config, dns.Limits, error) {
	var cfg dns.Config
	_, port, err := net.SplitHostPort(c.Addr)
	if err == nil && port == "" {
		err = errors.New("missing port")
	}
	if err != nil {
		return cfg, dns.Limits{}, fmt.Errorf("server: invalid --dns-addr %q: %w", c.Addr, err)
	}
	cfg.Domain = c.Domain
	if cfg.Domain == "" {
		cfg.Domain = dns.DefaultDomain
	}
	if cfg.Domain, err = dns.NormalizeDomain(cfg.Domain); err != nil {
		return cfg, dns.Limits{}, fmt.Errorf("server: invalid --dns-domain: %w", err)
	}
	for flag, d := range map[string]time.Duration{"--dns-ttl": c.TTL, "--dns-negative-ttl": c.NegativeTTL} {
		if d != 0 && (d < time.Second || d > dns.MaxTTL) {
			return cfg, dns.Limits{}, fmt.Errorf("server: invalid %s %v: must be between 1s and %v (0: the default, %v)", flag, d, dns.MaxTTL, dns.DefaultTTL)
		}
	}
	cfg.TTL, cfg.NegativeTTL = c.TTL, c.NegativeTTL
	for _, e := range c.ServiceTTL {
		name, text, ok := strings.Cut(e, "=")
		d, err := time.ParseDuration(text)
		if !ok || err != nil || d < 0 || d > dns.MaxTTL || d%time.Second != 0 {
			return cfg, dns.Limits{}, fmt.Errorf("server: invalid --dns-service-ttl %q: must be SERVICE=DURATION or NAMESPACE/SERVICE=DURATION, whole seconds from 0s to %v", e, dns.MaxTTL)
		}
		var sk registry.ServiceKey
		if ns, svc, hasNS := strings.Cut(name, "/"); hasNS {
			sk = registry.ServiceKey{Namespace: ns, Service: svc}
			if err := registry.ValidateName("namespace", ns); err != nil {
				return cfg, dns.Limits{}, fmt.Errorf("server: invalid --dns-service-ttl %q: %w", e, err)
			}
		} else {
			sk = registry.ServiceKey{Service: name}
		}
		if err := registry.ValidateName("service", sk.Service); err != nil {
			return cfg, dns.Limits{}, fmt.Errorf("server: invalid --dns-service-ttl %q: %w", e, err)
		}
		if cfg.ServiceTTL == nil {
			cfg.ServiceTTL = map[registry.ServiceKey]time.Duration{}
		}
		if _, dup := cfg.ServiceTTL[sk]; dup {
			return cfg, dns.Limits{}, fmt.Errorf("server: invalid --dns-service-ttl %q: %s is given twice", e, name)
		}
		cfg.ServiceTTL[sk] = d
	}
	for _, e := range c.ZoneCIDRs {
		zone, cidr, ok := strings.Cut(e, "=")
		p, err := netip.ParsePrefix(cidr)
		if !ok || err != nil {
			return cfg, dns.Limits{}, fmt.Errorf("server: invalid --dns-zone-cidr %q: must be ZONE=CIDR (e.g. us-east-1a=10.1.0.0/16)", e)
		}
		if err := registry.ValidateName("zone", zone); err != nil {
			return cfg, dns.Limits{}, fmt.Errorf("server: invalid --dns-zone-cidr %q: %w", e, err)
		}
		cfg.Zones = append(cfg.Zones, dns.Zone{Prefix: p.Masked(), Name: zone})
	}
	for _, e := range c.AllowCIDRs {
		p, err := netip.ParsePrefix(e)
		if err != nil {
			return cfg, dns.Limits{}, fmt.Errorf("server: invalid --dns-allow-cidr %q: must be a CIDR (e.g. 10.0.0.0/8)", e)
		}
		cfg.AllowFrom = append(cfg.AllowFrom, p.Masked())
	}
	if c.MaxUDPSize != 0 && (c.MaxUDPSize < mdns.MinMsgSize || c.MaxUDPSize > dns.MaxUDPSizeLimit) {
		return cfg, dns.Limits{}, fmt.Errorf("server: invalid --dns-max-udp-size %d: must be between %d and %d (0: the default, %d)", c.MaxUDPSize, mdns.MinMsgSize, dns.MaxUDPSizeLimit, dns.DefaultMaxUDPSize)
	}
	cfg.MaxUDPSize = c.MaxUDPSize
	lim := dns.Limits{
		MaxTCPConns: c.MaxTCPConns, MaxInFlight: c.MaxInFlight, MaxQueryBytes: c.MaxQueryBytes,
		ReadTimeout: c.ReadTimeout, IdleTimeout: c.IdleTimeout, WriteTimeout: c.WriteTimeout,
	}
	if err := lim.Validate(); err != nil {
		return cfg, lim, fmt.Errorf("server: invalid %w", err)
	}
	return cfg, lim, nil
}

// startDNS binds the DNS interface and serves it until Close (runCtx
// ends). It answers SERVFAIL until the server is ready: an NXDOMAIN
// before the registry is loaded would be cached as a service's absence.
func (s *Server) startDNS() error {
	c := s.cfg.DNS
	if c.Addr == "" {
		return nil
	}
	cfg, lim, err := c.parse() // Validate parsed it: no error
	if err != nil {
		return err
	}
	m := s.dnsMetrics()
	refusedLog := &logLimiter{every: time.Minute}
	cfg.Hooks = dns.Hooks{
		Answered:  m.answered,
		Malformed: m.malformed.Inc,
		Limited: func(l dns.Limit) {
			s.metrics.limitHits.WithLabelValues(string(l)).Inc()
			if refusedLog.allow() {
				s.log.Warn("refusing DNS queries or connections at a limit (counted in beacon_limit_refusals_total)", "limit", "--"+string(l))
			}
		},
	}
	if s.cfg.ACL {
		// DNS carries no token: it answers what a call without one may
		// read (docs/security.md, "DNS").
		cfg.Allowed = func(ns, svc string) bool {
			if !s.isReady() {
				return false
			}
			id, err := s.acl.Identify("")
			return err == nil && id.Authz.Service(ns, svc) >= acl.Read
		}
	}
	h, err := dns.NewHandler(cfg, dnsSource{s})
	if err != nil {
		return fmt.Errorf("server: %w", err)
	}
	srv, err := dns.Listen(c.Addr, h, lim)
	if err != nil {
		return fmt.Errorf("server: --dns-addr: %w", err)
	}
	s.dns = srv
	if s.cfg.Insecure && !s.cfg.ACL && len(c.AllowCIDRs) == 0 && !loopback(c.Addr) {
		s.log.Warn("serving DNS without ACLs or --dns-allow-cidr beyond this machine (--insecure): anyone who reaches it can list every service's instances", "dns_addr", c.Addr)
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		select {
		case err := <-srv.Err():
			s.fail(err)
		case <-s.runCtx.Done():
		}
		srv.Close()
	}()
	return nil
}

// DNSAddr returns the address the DNS interface listens on, over UDP and
// TCP ("" when off).
func (s *Server) DNSAddr() string {
	if s.dns == nil {
		return ""
	}
	return s.dns.Addr()
}

// dnsSource answers from the view once the server is ready; the view's
// snapshots are immutable and shared, never copied.
type dnsSource struct{ s *Server }

func (d dnsSource) Snapshot(sk registry.ServiceKey) (*registry.Snapshot, bool) {
	if !d.s.isReady() {
		return nil, false
	}
	return d.s.view.Snapshot(sk), true
}

// dnsMetricsT counts DNS answers by transport and rcode, truncations and
// malformed queries; limit hits go to beacon_limit_refusals_total.
type dnsMetricsT struct {
	queries   *prometheus.CounterVec
	byCode    [2][mdns.RcodeBadVers + 1]prometheus.Counter // [tcp][rcode], made up front: no lookup per query
	truncated prometheus.Counter
	malformed prometheus.Counter
}

func (s *Server) dnsMetrics() *dnsMetricsT {
	m := &dnsMetricsT{
		queries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "beacon_dns_queries_total", Help: "DNS queries answered, by transport (udp, tcp) and rcode (NOERROR includes NODATA).",
		}, []string{"transport", "rcode"}),
		truncated: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "beacon_dns_truncated_total", Help: "DNS answers that did not fit the UDP size and went out with TC set (the querier retries over TCP).",
		}),
		malformed: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "beacon_dns_malformed_total", Help: "DNS messages that could not be parsed or were not queries (answered FORMERR or NOTIMP, or dropped).",
		}),
	}
	for tcp, transport := range []string{"udp", "tcp"} {
		for rcode := range m.byCode[tcp] {
			if name, ok := mdns.RcodeToString[rcode]; ok && (rcode <= mdns.RcodeRefused || rcode == mdns.RcodeBadVers) {
				m.byCode[tcp][rcode] = m.queries.WithLabelValues(transport, name)
			}
		}
	}
	s.metrics.reg.MustRegister(m.queries, m.truncated, m.malformed)
	return m
}

func (m *dnsMetricsT) answered(tcp bool, rcode int, truncated bool) {
	t := 0
	if tcp {
		t = 1
	}
	if rcode >= 0 && rcode < len(m.byCode[t]) && m.byCode[t][rcode] != nil {
		m.byCode[t][rcode].Inc()
	} else {
		m.queries.WithLabelValues([]string{"udp", "tcp"}[t], "OTHER").Inc()
	}
	if truncated {
		m.truncated.Inc()
	}
}

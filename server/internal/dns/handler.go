package dns

import (
	"cmp"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	mdns "github.com/miekg/dns"

	"beacon.dev/beacon/endpoint"
	"beacon.dev/beacon/registry"
)

// Source is the registry a Handler answers from.
type Source interface {
	// Snapshot returns a service's current snapshot (nil, or one without
	// instances, when there is no such service). It must not block, and
	// the caller does not modify it. ready is false until the registry
	// is loaded: the query gets SERVFAIL rather than a wrong NXDOMAIN.
	Snapshot(sk registry.ServiceKey) (snap *registry.Snapshot, ready bool)
}

// SourceFunc adapts a function to Source.
type SourceFunc func(sk registry.ServiceKey) (*registry.Snapshot, bool)

// Snapshot calls f.
func (f SourceFunc) Snapshot(sk registry.ServiceKey) (*registry.Snapshot, bool) { return f(sk) }

// Zone maps the queriers in Prefix (resolvers, or the clients behind them
// as EDNS Client Subnet says) to a zone.
type Zone struct {
	Prefix netip.Prefix
	Name   string
}

// Hooks let the caller count what happens. Every hook may be nil, is
// called on the query's goroutine and must not block.
type Hooks struct {
	// Answered: an answer went out, with its rcode (RcodeNameError for
	// NXDOMAIN; a NODATA answer is RcodeSuccess), whether it was
	// truncated (TC set), and over which transport.
	Answered func(tcp bool, rcode int, truncated bool)
	// Limited: a query or connection was refused at a limit.
	Limited func(Limit)
	// Malformed: a message that could not be parsed or that no server
	// accepts (more than one question, an update...) got FORMERR or
	// NOTIMP, or nothing when even its header was unreadable.
	Malformed func()
}

// Config is what a Handler answers. The zero value of a field takes its
// default (Defaults).
type Config struct {
	// Domain is the zone, fully qualified ("consul.").
	Domain string
	// TTL of positive answers, and ServiceTTL by service: a ServiceKey
	// with an empty Namespace applies to that service in every namespace
	// that has no entry of its own.
	TTL        time.Duration
	ServiceTTL map[registry.ServiceKey]time.Duration
	// NegativeTTL is how long resolvers may cache NXDOMAIN and NODATA:
	// the SOA's minimum field and its TTL (RFC 2308).
	NegativeTTL time.Duration
	// Zones place queriers in zones; the longest matching prefix wins.
	Zones []Zone
	// AllowFrom, when not empty, is who may query: anyone else gets
	// REFUSED.
	AllowFrom []netip.Prefix
	// MaxUDPSize caps the size of a UDP answer, whatever the query's EDNS0
	// buffer says (a query without EDNS0 gets 512 bytes).
	MaxUDPSize int
	// Allowed reports whether a service may be answered (the ACLs'
	// anonymous policy); a service it refuses answers as if it did not
	// exist. nil: every service. It is asked only once the Source is
	// ready.
	Allowed func(ns, svc string) bool
	Hooks   Hooks
	// Now and Rand, for tests: the SOA serial's clock and the answers'
	// shuffle (uniform in [0, 1)); both must be safe for concurrent use.
	Now  func() time.Time
	Rand func() float64
}

// Defaults of Config and Limits.
const (
	DefaultDomain        = "consul."
	DefaultTTL           = 5 * time.Second
	DefaultNegativeTTL   = 5 * time.Second
	DefaultMaxUDPSize    = 1232 // DNS Flag Day 2020: no IP fragmentation
	MaxUDPSizeLimit      = 4096
	MaxTTL               = 24 * time.Hour
	minUDPSize           = mdns.MinMsgSize // 512
	maxMsgSize           = mdns.MaxMsgSize // 65535, the TCP answer's bound
	soaRefresh, soaRetry = 3600, 600
	soaExpire            = 86400
)

// NormalizeDomain returns domain lowercased and fully qualified, or an
// error saying what is wrong with it.
func NormalizeDomain(domain string) (string, error) {
	d := strings.ToLower(domain)
	if !strings.HasSuffix(d, ".") {
		d += "."
	}
	if d == "." {
		return "", fmt.Errorf("dns: domain %q: must not be the root", domain)
	}
	if _, ok := mdns.IsDomainName(d); !ok || strings.ContainsAny(d, `\ `) {
		return "", fmt.Errorf("dns: domain %q: must be a domain name (labels of letters, digits and '-')", domain)
	}
	for _, l := range mdns.SplitDomainName(d) {
		if l == "" || len(l) > 63 {
			return "", fmt.Errorf("dns: domain %q: labels must have 1 to 63 characters", domain)
		}
	}
	return d, nil
}

// Handler answers queries. Make one with NewHandler; it is safe for
// concurrent use.
type Handler struct {
	cfg    Config
	src    Source
	domain string
	ttl    uint32
	negTTL uint32
	mname  string // the SOA's primary server: ns.DOMAIN
	rname  string // and its mailbox: hostmaster.DOMAIN
}

// NewHandler returns a Handler answering cfg's zone from src.
func NewHandler(cfg Config, src Source) (*Handler, error) {
	if cfg.Domain == "" {
		cfg.Domain = DefaultDomain
	}
	d, err := NormalizeDomain(cfg.Domain)
	if err != nil {
		return nil, err
	}
	cfg.Domain = d
	if cfg.TTL == 0 {
		cfg.TTL = DefaultTTL
	}
	if cfg.NegativeTTL == 0 {
		cfg.NegativeTTL = DefaultNegativeTTL
	}
	for name, ttl := range map[string]time.Duration{"ttl": cfg.TTL, "negative ttl": cfg.NegativeTTL} {
		if ttl < time.Second || ttl > MaxTTL {
			return nil, fmt.Errorf("dns: %s %v: must be between 1s and %v", name, ttl, MaxTTL)
		}
	}
	for sk, ttl := range cfg.ServiceTTL {
		if ttl < 0 || ttl > MaxTTL {
			return nil, fmt.Errorf("dns: ttl of %s %v: must be between 0s and %v", sk.Service, ttl, MaxTTL)
		}
	}
	if cfg.MaxUDPSize == 0 {
		cfg.MaxUDPSize = DefaultMaxUDPSize
	}
	if cfg.MaxUDPSize < minUDPSize || cfg.MaxUDPSize > MaxUDPSizeLimit {
		return nil, fmt.Errorf("dns: max UDP size %d: must be between %d and %d", cfg.MaxUDPSize, minUDPSize, MaxUDPSizeLimit)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Float64
	}
	return &Handler{
		cfg: cfg, src: src, domain: d,
		ttl: seconds(cfg.TTL), negTTL: seconds(cfg.NegativeTTL),
		mname: "ns." + d, rname: "hostmaster." + d,
	}, nil
}

func seconds(d time.Duration) uint32 { return uint32(d / time.Second) }

// Domain returns the zone's name, fully qualified and lowercased.
func (h *Handler) Domain() string { return h.domain }

// Answer builds the response to req from a querier at from, and the size
// it must fit (Truncate to it before packing): 512 bytes over UDP, or what
// the query's EDNS0 buffer says up to MaxUDPSize; 65535 over TCP.
func (h *Handler) Answer(req *mdns.Msg, from netip.Addr, tcp bool) (resp *mdns.Msg, size int) {
	resp = new(mdns.Msg)
	resp.SetReply(req)
	size = minUDPSize
	if tcp {
		size = maxMsgSize
	}
	var ropt *mdns.OPT // the answer's OPT record: last in the additional section
	done := func() (*mdns.Msg, int) {
		if ropt != nil {
			resp.Extra = append(resp.Extra, ropt)
		}
		return resp, size
	}
	if len(req.Question) != 1 || req.Response {
		resp.Rcode = mdns.RcodeFormatError
		return done()
	}
	opt, ok := queryOpt(req)
	if !ok {
		resp.Rcode = mdns.RcodeFormatError
		return done()
	}
	var ecs *mdns.EDNS0_SUBNET
	if opt != nil {
		if !tcp {
			size = min(max(int(opt.UDPSize()), minUDPSize), h.cfg.MaxUDPSize)
		}
		ropt = &mdns.OPT{Hdr: mdns.RR_Header{Name: ".", Rrtype: mdns.TypeOPT}}
		ropt.SetUDPSize(uint16(h.cfg.MaxUDPSize))
		if opt.Version() != 0 {
			resp.Rcode = mdns.RcodeBadVers // RFC 6891 6.1.3
			return done()
		}
		ecs = clientSubnet(opt)
	}
	if !allowed(h.cfg.AllowFrom, from) {
		resp.Rcode = mdns.RcodeRefused
		return done()
	}
	if req.Opcode != mdns.OpcodeQuery {
		resp.Rcode = mdns.RcodeNotImplemented
		return done()
	}
	q := req.Question[0]
	if q.Qclass != mdns.ClassINET {
		resp.Rcode = mdns.RcodeRefused
		return done()
	}
	n, inZone := parseName(strings.ToLower(q.Name), h.domain)
	if !inZone || q.Qtype == mdns.TypeAXFR || q.Qtype == mdns.TypeIXFR {
		resp.Rcode = mdns.RcodeRefused // not ours; zone transfers are not served
		return done()
	}
	resp.Authoritative = true

	zone, scope := h.querierZone(from, ecs)
	if ecs != nil {
		// RFC 7871 7.2.1: echo the option, with the prefix length the
		// answer depended on (0: it did not).
		echo := *ecs
		echo.SourceScope = scope
		ropt.Option = append(ropt.Option, &echo)
	}

	switch n.kind {
	case nameAbsent:
		h.negative(resp, mdns.RcodeNameError)
	case nameApex:
		if q.Qtype == mdns.TypeSOA || q.Qtype == mdns.TypeANY {
			resp.Answer = append(resp.Answer, h.soa())
		} else {
			h.negative(resp, mdns.RcodeSuccess)
		}
	case nameEmpty:
		h.negative(resp, mdns.RcodeSuccess)
	case nameAddr:
		if rr := addrRecord(q.Name, n.addr, h.ttl, q.Qtype); rr != nil {
			resp.Answer = append(resp.Answer, rr)
		} else {
			h.negative(resp, mdns.RcodeSuccess)
		}
	default:
		h.service(resp, q, n, zone)
	}
	return done()
}

// queryOpt returns the query's OPT record; ok is false when it has more
// than one (RFC 6891 6.1.1: FORMERR).
func queryOpt(req *mdns.Msg) (opt *mdns.OPT, ok bool) {
	for _, rr := range req.Extra {
		if o, isOpt := rr.(*mdns.OPT); isOpt {
			if opt != nil {
				return nil, false
			}
			opt = o
		}
	}
	return opt, true
}

func clientSubnet(opt *mdns.OPT) *mdns.EDNS0_SUBNET {
	for _, o := range opt.Option {
		if e, ok := o.(*mdns.EDNS0_SUBNET); ok {
			return e
		}
	}
	return nil
}

func allowed(allow []netip.Prefix, from netip.Addr) bool {
	if len(allow) == 0 {
		return true
	}
	for _, p := range allow {
		if p.Contains(from) {
			return true
		}
	}
	return false
}

// querierZone places the querier: the client subnet of EDNS Client Subnet
// when the query has one that a zone covers, else the querier's own
// address. scope is the prefix length the answer depends on, for the
// echoed client subnet.
func (h *Handler) querierZone(from netip.Addr, ecs *mdns.EDNS0_SUBNET) (zone string, scope uint8) {
	if len(h.cfg.Zones) == 0 {
		return "", 0
	}
	if ecs != nil {
		if a, ok := netip.AddrFromSlice(ecs.Address); ok {
			if z, bits := matchZone(h.cfg.Zones, a.Unmap()); z != "" {
				return z, uint8(bits)
			}
		}
	}
	z, _ := matchZone(h.cfg.Zones, from)
	return z, 0
}

func matchZone(zones []Zone, a netip.Addr) (string, int) {
	best, bits := "", -1
	for _, z := range zones {
		if z.Prefix.Bits() > bits && z.Prefix.Contains(a) {
			best, bits = z.Name, z.Prefix.Bits()
		}
	}
	return best, bits
}

// soa is the zone's SOA record: its minimum and its TTL are the negative
// TTL (RFC 2308 5: a negative answer is cached for the smaller of both).
// The serial is the clock's seconds: nothing transfers the zone.
func (h *Handler) soa() *mdns.SOA {
	return &mdns.SOA{
		Hdr: mdns.RR_Header{Name: h.domain, Rrtype: mdns.TypeSOA, Class: mdns.ClassINET, Ttl: h.negTTL},
		Ns:  h.mname, Mbox: h.rname, Serial: uint32(h.cfg.Now().Unix()),
		Refresh: soaRefresh, Retry: soaRetry, Expire: soaExpire, Minttl: h.negTTL,
	}
}

// negative makes resp NXDOMAIN (RcodeNameError) or NODATA (RcodeSuccess,
// no answer) with the SOA in the authority section.
func (h *Handler) negative(resp *mdns.Msg, rcode int) *mdns.Msg {
	resp.Rcode = rcode
	resp.Answer = nil
	resp.Ns = append(resp.Ns, h.soa())
	return resp
}

func addrRecord(owner string, a netip.Addr, ttl uint32, qtype uint16) mdns.RR {
	hdr := mdns.RR_Header{Name: owner, Class: mdns.ClassINET, Ttl: ttl}
	switch {
	case a.Is4() && (qtype == mdns.TypeA || qtype == mdns.TypeANY):
		hdr.Rrtype = mdns.TypeA
		b := a.As4()
		return &mdns.A{Hdr: hdr, A: net.IP(b[:])}
	case !a.Is4() && (qtype == mdns.TypeAAAA || qtype == mdns.TypeANY):
		hdr.Rrtype = mdns.TypeAAAA
		b := a.As16()
		return &mdns.AAAA{Hdr: hdr, AAAA: net.IP(b[:])}
	}
	return nil
}

// candidate is an available instance in an answer, with its sort key.
type candidate struct {
	in    *registry.Instance
	addr  netip.Addr // invalid: the instance's address is a host name
	tier  int
	local bool    // in the querier's zone
	key   float64 // weighted random: smaller first
}

// service answers a service name.
func (h *Handler) service(resp *mdns.Msg, q mdns.Question, n name, zone string) *mdns.Msg {
	snap, ready := h.src.Snapshot(n.sk)
	if !ready {
		resp.Rcode = mdns.RcodeServerFailure
		resp.Authoritative = false
		return resp
	}
	if h.cfg.Allowed != nil && !h.cfg.Allowed(n.sk.Namespace, n.sk.Service) {
		return h.negative(resp, mdns.RcodeNameError) // as if absent
	}
	if snap == nil || !hasTagged(snap.Instances, n.tag) {
		return h.negative(resp, mdns.RcodeNameError)
	}
	var want func(c *candidate) bool
	switch q.Qtype {
	case mdns.TypeA:
		want = func(c *candidate) bool { return c.addr.Is4() }
	case mdns.TypeAAAA:
		want = func(c *candidate) bool { return c.addr.Is6() }
	case mdns.TypeANY:
		want = func(c *candidate) bool { return c.addr.IsValid() }
	case mdns.TypeSRV:
		want = func(*candidate) bool { return true }
	default:
		return h.negative(resp, mdns.RcodeSuccess)
	}
	avail, _ := snap.Available() // the protection threshold applies
	cands := make([]candidate, 0, len(avail))
	for _, in := range avail {
		if n.tag != "" && !hasTag(in, n.tag) {
			continue
		}
		c := candidate{in: in, tier: endpoint.TierOf(in), local: zone != "" && in.Zone == zone}
		if a, err := netip.ParseAddr(in.Address); err == nil {
			c.addr = a.Unmap()
		}
		if !want(&c) {
			continue
		}
		w := in.Weight
		if w < 1 {
			w = registry.DefaultWeight
		}
		c.key = -math.Log(1-h.cfg.Rand()) / float64(w)
		cands = append(cands, c)
	}
	if len(cands) == 0 {
		return h.negative(resp, mdns.RcodeSuccess) // the name exists; nothing of this type now
	}
	// Primaries before backups, the querier's zone first, then a weighted
	// random order: the first address is each instance's with the
	// probability of its share of the weight (the minimum of exponential
	// variables of rates w, Efraimidis-Spirakis).
	slices.SortFunc(cands, func(a, b candidate) int {
		if c := cmp.Compare(a.tier, b.tier); c != 0 {
			return c
		}
		if a.local != b.local {
			if a.local {
				return -1
			}
			return 1
		}
		return cmp.Compare(a.key, b.key)
	})
	ttl := h.serviceTTL(n.sk)
	if q.Qtype != mdns.TypeSRV {
		resp.Answer = make([]mdns.RR, 0, len(cands))
		for i := range cands {
			resp.Answer = append(resp.Answer, addrRecord(q.Name, cands[i].addr, ttl, q.Qtype))
		}
		return resp
	}
	resp.Answer = make([]mdns.RR, 0, len(cands))
	resp.Extra = slices.Grow(resp.Extra, len(cands))
	var glued map[netip.Addr]bool
	for i := range cands {
		c := &cands[i]
		srv := &mdns.SRV{
			Hdr:      mdns.RR_Header{Name: q.Name, Rrtype: mdns.TypeSRV, Class: mdns.ClassINET, Ttl: ttl},
			Priority: uint16(min(c.tier+1, math.MaxUint16)), // Consul's 1 for primaries
			Weight:   uint16(min(c.in.Weight, math.MaxUint16)),
			Port:     uint16(c.in.Port),
		}
		if srv.Weight == 0 {
			srv.Weight = registry.DefaultWeight
		}
		if !c.addr.IsValid() {
			srv.Target = mdns.Fqdn(strings.ToLower(c.in.Address))
			resp.Answer = append(resp.Answer, srv)
			continue
		}
		srv.Target = addrLabel(c.addr) + "." + labelAddr + "." + h.domain
		resp.Answer = append(resp.Answer, srv)
		if len(cands) > 1 {
			if glued == nil {
				glued = make(map[netip.Addr]bool, len(cands))
			}
			if glued[c.addr] {
				continue
			}
			glued[c.addr] = true
		}
		resp.Extra = append(resp.Extra, addrRecord(srv.Target, c.addr, ttl, mdns.TypeANY))
	}
	return resp
}

func (h *Handler) serviceTTL(sk registry.ServiceKey) uint32 {
	if len(h.cfg.ServiceTTL) != 0 {
		if d, ok := h.cfg.ServiceTTL[sk]; ok {
			return seconds(d)
		}
		if d, ok := h.cfg.ServiceTTL[registry.ServiceKey{Service: sk.Service}]; ok {
			return seconds(d)
		}
	}
	return h.ttl
}

// hasTagged reports whether any instance, available or not, carries tag
// ("": any instance): whether the name exists.
func hasTagged(ins []*registry.Instance, tag string) bool {
	if tag == "" {
		return len(ins) > 0
	}
	for _, in := range ins {
		if hasTag(in, tag) {
			return true
		}
	}
	return false
}

// hasTag: names are case-insensitive, so tags are matched so too.
func hasTag(in *registry.Instance, tag string) bool {
	for _, t := range in.Tags {
		if strings.EqualFold(t, tag) {
			return true
		}
	}
	return false
}

// bufs hold packed UDP answers (MaxUDPSizeLimit at most); a TCP answer
// longer than one is packed into a buffer of its own.
var bufs = sync.Pool{New: func() any { b := make([]byte, MaxUDPSizeLimit); return &b }}

// ServeDNS answers req on w: the answer truncated to what the transport
// and the query's EDNS0 buffer allow, with TC set when it had to be.
func (h *Handler) ServeDNS(w mdns.ResponseWriter, req *mdns.Msg, tcp bool) {
	resp, size := h.Answer(req, remoteAddr(w), tcp)
	resp.Truncate(size)
	bp := bufs.Get().(*[]byte)
	defer bufs.Put(bp)
	out, err := resp.PackBuffer((*bp)[:cap(*bp)])
	if err != nil {
		// Nothing this package builds fails to pack; should it, the
		// querier learns it at once rather than by a timeout.
		fail := new(mdns.Msg)
		fail.SetRcode(req, mdns.RcodeServerFailure)
		if out, err = fail.PackBuffer((*bp)[:cap(*bp)]); err != nil {
			return
		}
		resp = fail
	}
	if _, err := w.Write(out); err != nil {
		return // the querier went away, or did not read in time
	}
	if h.cfg.Hooks.Answered != nil {
		h.cfg.Hooks.Answered(tcp, resp.Rcode, resp.Truncated)
	}
}

func (h *Handler) limited(l Limit) {
	if h.cfg.Hooks.Limited != nil {
		h.cfg.Hooks.Limited(l)
	}
}

func (h *Handler) malformed() {
	if h.cfg.Hooks.Malformed != nil {
		h.cfg.Hooks.Malformed()
	}
}

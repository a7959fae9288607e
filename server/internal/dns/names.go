package dns

import (
	"encoding/hex"
	"net/netip"
	"strings"

	"beacon.dev/beacon/registry"
)

// The names of the zone, under its domain (docs/interop.md, "DNS"):
//
//	DOMAIN                                    the apex: SOA
//	[TAG.]SERVICE.service[.NAMESPACE].DOMAIN  A, AAAA, SRV
//	_SERVICE._TAG.service[.NAMESPACE].DOMAIN  the same (RFC 2782; _tcp: no tag)
//	HEX.addr.DOMAIN                           an SRV target: A (8 hex digits) or AAAA (32)
//
// Empty non-terminals answer NODATA, never NXDOMAIN: a resolver that
// minimises query names (RFC 9156) asks service.DOMAIN before
// web.service.DOMAIN and would stop at an NXDOMAIN (RFC 8020).

// nameKind is what a question's name is.
type nameKind int8

const (
	nameAbsent  nameKind = iota // in the zone, and no such name: NXDOMAIN
	nameApex                    // the domain itself
	nameEmpty                   // an empty non-terminal: exists, holds no records
	nameService                 // a service (with a tag filter when tag is set)
	nameAddr                    // an SRV target: HEX.addr.DOMAIN
)

// name is a parsed question name.
type name struct {
	kind nameKind
	sk   registry.ServiceKey
	tag  string     // nameService: only instances with this tag ("": all)
	addr netip.Addr // nameAddr
}

// Labels of the zone's structure.
const (
	labelService = "service"
	labelAddr    = "addr"
)

// parseName reads a lowercased, fully qualified question name; inZone is
// false for names outside domain (the server answers REFUSED: it is
// authoritative for its domain and resolves nothing else).
func parseName(qname, domain string) (n name, inZone bool) {
	if qname == domain {
		return name{kind: nameApex}, true
	}
	if len(qname) <= len(domain) || !strings.HasSuffix(qname, domain) || qname[len(qname)-len(domain)-1] != '.' {
		return name{}, false
	}
	rest := qname[:len(qname)-len(domain)-1]
	if strings.IndexByte(rest, '\\') >= 0 {
		// An escaped character: no name of ours has one (and an escaped
		// dot before the domain could even make this name another zone's,
		// but then it is still not a name anyone registered).
		return name{}, true
	}
	// Up to five labels: TAG.SERVICE.service.NAMESPACE; more is absent.
	var labels [5]string
	k := 0
	for rest != "" {
		if k == len(labels) {
			return name{}, true
		}
		i := strings.LastIndexByte(rest, '.')
		labels[k] = rest[i+1:] // i == -1: the whole rest
		if labels[k] == "" {
			return name{}, true
		}
		k++
		if i < 0 {
			break
		}
		rest = rest[:i]
	}
	// labels[0] is the label next to the domain.
	ls := labels[:k]
	switch ls[0] {
	case labelAddr:
		switch len(ls) {
		case 1:
			return name{kind: nameEmpty}, true
		case 2:
			if a, ok := parseAddrLabel(ls[1]); ok {
				return name{kind: nameAddr, addr: a}, true
			}
		}
		return name{}, true
	case labelService:
		return parseService(registry.DefaultNamespace, ls[1:]), true
	}
	// NAMESPACE.DOMAIN, then service.NAMESPACE.DOMAIN: empty non-terminals
	// for any well-formed namespace name, whether or not it has services
	// (the answer tells nothing about the registry).
	ns := ls[0]
	if registry.ValidateName("namespace", ns) != nil {
		return name{}, true
	}
	if len(ls) == 1 {
		return name{kind: nameEmpty}, true
	}
	if ls[1] != labelService {
		return name{}, true
	}
	return parseService(ns, ls[2:]), true
}

// parseService reads the labels left of "service", nearest first.
func parseService(ns string, ls []string) name {
	switch len(ls) {
	case 0: // service.[NAMESPACE.]DOMAIN
		return name{kind: nameEmpty}
	case 1: // SERVICE, or the _TAG of RFC 2782's _SERVICE._TAG
		if strings.HasPrefix(ls[0], "_") {
			return name{kind: nameEmpty}
		}
		return serviceName(ns, ls[0], "")
	case 2:
		near, far := ls[0], ls[1]
		if strings.HasPrefix(near, "_") && strings.HasPrefix(far, "_") { // _SERVICE._TAG
			tag := near[1:]
			if tag == "" {
				return name{}
			}
			if tag == "tcp" {
				tag = "" // RFC 2782's protocol, not a tag
			}
			return serviceName(ns, far[1:], tag)
		}
		if !strings.HasPrefix(near, "_") && !strings.HasPrefix(far, "_") { // TAG.SERVICE
			return serviceName(ns, near, far)
		}
	}
	return name{}
}

func serviceName(ns, svc, tag string) name {
	if registry.ValidateName("service", svc) != nil {
		return name{}
	}
	return name{kind: nameService, sk: registry.ServiceKey{Namespace: ns, Service: svc}, tag: tag}
}

// addrLabel is an address's label in HEX.addr.DOMAIN (Consul's form): 8
// hex digits for IPv4, 32 for IPv6.
func addrLabel(a netip.Addr) string {
	if a.Is4() {
		b := a.As4()
		return hex.EncodeToString(b[:])
	}
	b := a.As16()
	return hex.EncodeToString(b[:])
}

func parseAddrLabel(s string) (netip.Addr, bool) {
	var b [16]byte
	switch len(s) {
	case 8:
		if _, err := hex.Decode(b[:4], []byte(s)); err != nil {
			return netip.Addr{}, false
		}
		return netip.AddrFrom4([4]byte(b[:4])), true
	case 32:
		if _, err := hex.Decode(b[:], []byte(s)); err != nil {
			return netip.Addr{}, false
		}
		return netip.AddrFrom16(b), true
	}
	return netip.Addr{}, false
}

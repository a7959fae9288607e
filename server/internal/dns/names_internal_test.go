package dns

import (
	"net/netip"
	"testing"

	"beacon.dev/beacon/registry"
)

func TestParseName(t *testing.T) {
	svc := func(ns, s, tag string) name {
		return name{kind: nameService, sk: registry.ServiceKey{Namespace: ns, Service: s}, tag: tag}
	}
	tests := []struct {
		qname  string
		want   name
		inZone bool
	}{
		{"consul.", name{kind: nameApex}, true},
		{"web.service.consul.", svc("default", "web", ""), true},
		{"v2.web.service.consul.", svc("default", "web", "v2"), true},
		{"_web._tcp.service.consul.", svc("default", "web", ""), true},
		{"_web._v2.service.consul.", svc("default", "web", "v2"), true},
		{"web.service.prod.consul.", svc("prod", "web", ""), true},
		{"v2.web.service.prod.consul.", svc("prod", "web", "v2"), true},
		{"_web._tcp.service.prod.consul.", svc("prod", "web", ""), true},
		// Empty non-terminals: NODATA, so that resolvers minimising query
		// names go on.
		{"service.consul.", name{kind: nameEmpty}, true},
		{"_tcp.service.consul.", name{kind: nameEmpty}, true},
		{"prod.consul.", name{kind: nameEmpty}, true},
		{"service.prod.consul.", name{kind: nameEmpty}, true},
		{"addr.consul.", name{kind: nameEmpty}, true},
		{"c000020a.addr.consul.", name{kind: nameAddr, addr: netip.MustParseAddr("192.0.2.10")}, true},
		{"20010db8000000000000000000000001.addr.consul.", name{kind: nameAddr, addr: netip.MustParseAddr("2001:db8::1")}, true},
		// Absent.
		{"c000020.addr.consul.", name{}, true},
		{"zz00020a.addr.consul.", name{}, true},
		{"x.c000020a.addr.consul.", name{}, true},
		{"a.b.web.service.consul.", name{}, true},
		{"_web.v2.service.consul.", name{}, true},
		{"web._v2.service.consul.", name{}, true},
		{"_web._.service.consul.", name{}, true},
		{"Web_.service.consul.", name{}, true},
		{"web.other.prod.consul.", name{}, true},
		{"Prod_.consul.", name{}, true},
		{`we\.b.service.consul.`, name{}, true},
		{"a.b.c.d.e.f.consul.", name{}, true},
		// Not in the zone.
		{"example.com.", name{}, false},
		{"notconsul.", name{}, false},
		{".", name{}, false},
	}
	for _, tt := range tests {
		got, inZone := parseName(tt.qname, "consul.")
		if got != tt.want || inZone != tt.inZone {
			t.Errorf("parseName(%q) = %+v, %v; want %+v, %v", tt.qname, got, inZone, tt.want, tt.inZone)
		}
	}
}

func TestAddrLabelRoundTrip(t *testing.T) {
	for _, s := range []string{"192.0.2.10", "0.0.0.0", "2001:db8::1", "::1"} {
		a := netip.MustParseAddr(s)
		got, ok := parseAddrLabel(addrLabel(a))
		if !ok || got != a {
			t.Errorf("parseAddrLabel(addrLabel(%s)) = %v, %v", a, got, ok)
		}
	}
}

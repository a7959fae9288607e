package dns_test

import (
	"net"
	"testing"

	mdns "github.com/miekg/dns"

	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/internal/dns"
)

// recorder is a ResponseWriter that keeps what is written.
type recorder struct {
	mdns.ResponseWriter // nil: only the methods below are called
	from                net.Addr
	out                 [][]byte
}

func (r *recorder) RemoteAddr() net.Addr { return r.from }
func (r *recorder) Write(b []byte) (int, error) {
	r.out = append(r.out, append([]byte(nil), b...))
	return len(b), nil
}

// FuzzDNSQuery feeds any message the server's parser accepts to the
// handler: it must answer once, with a message that parses, has the
// query's id and fits the transport (512 bytes, the EDNS0 buffer up to
// the cap, or 65535 over TCP).
func FuzzDNSQuery(f *testing.F) {
	for _, q := range []struct {
		name  string
		qtype uint16
		edns  uint16
	}{
		{"web.service.consul.", mdns.TypeA, 0},
		{"_web._tcp.service.consul.", mdns.TypeSRV, 4096},
		{"v2.web.service.prod.consul.", mdns.TypeAAAA, 1232},
		{"0a000001.addr.consul.", mdns.TypeA, 0},
		{"consul.", mdns.TypeSOA, 512},
		{"nope.service.consul.", mdns.TypeANY, 0},
		{"example.com.", mdns.TypeA, 0},
	} {
		m := new(mdns.Msg)
		m.SetQuestion(q.name, q.qtype)
		if q.edns > 0 {
			m.SetEdns0(q.edns, true)
			m.IsEdns0().Option = append(m.IsEdns0().Option, &mdns.EDNS0_SUBNET{Code: mdns.EDNS0SUBNET, Family: 1, SourceNetmask: 24, Address: net.IPv4(10, 0, 0, 0)})
		}
		b, err := m.Pack()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, false)
		f.Add(b, true)
	}
	var ins []*registry.Instance
	for i := range 60 {
		addr := "10.0.0." + string(rune('0'+i%10))
		if i%7 == 0 {
			addr = "2001:db8::" + string(rune('a'+i%6))
		}
		if i%11 == 0 {
			addr = "host-" + string(rune('a'+i%26)) + ".example.com"
		}
		in := inst("web", string(rune('a'+i%26))+string(rune('a'+i/26)), addr, tags("v2"), zone("z"+string(rune('0'+i%3))))
		if i%5 == 0 {
			in.Status = registry.StatusDraining
		}
		ins = append(ins, in)
	}
	src := source(ins...)
	h, err := dns.NewHandler(dns.Config{Zones: []dns.Zone{{Prefix: mustPrefix("10.0.0.0/8"), Name: "z1"}}}, src)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, query []byte, tcp bool) {
		req := new(mdns.Msg)
		if req.Unpack(query) != nil {
			return // the server answers FORMERR before the handler
		}
		w := &recorder{from: &net.UDPAddr{IP: net.IPv4(10, 1, 2, 3), Port: 53}}
		h.ServeDNS(w, req, tcp)
		if len(w.out) != 1 {
			t.Fatalf("%d answers written, want 1", len(w.out))
		}
		limit := 512
		if opt := req.IsEdns0(); opt != nil {
			limit = max(limit, min(int(opt.UDPSize()), dns.DefaultMaxUDPSize))
		}
		if tcp {
			limit = 65535
		}
		if n := len(w.out[0]); n > limit {
			t.Fatalf("answer of %d bytes, over the %d allowed", n, limit)
		}
		resp := new(mdns.Msg)
		if err := resp.Unpack(w.out[0]); err != nil {
			t.Fatalf("answer does not parse: %v", err)
		}
		if resp.Id != req.Id || !resp.Response {
			t.Fatalf("answer id %d response %v, want %d true", resp.Id, resp.Response, req.Id)
		}
	})
}

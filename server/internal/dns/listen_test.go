package dns_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"

	mdns "github.com/miekg/dns"

	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/internal/dns"
)

// counts records the hooks' calls.
type counts struct {
	mu        sync.Mutex
	rcodes    map[int]int
	truncated int
	limits    map[dns.Limit]int
	malformed int
	limitHit  chan dns.Limit
}

func newCounts() *counts {
	return &counts{rcodes: map[int]int{}, limits: map[dns.Limit]int{}, limitHit: make(chan dns.Limit, 100)}
}

func (c *counts) hooks() dns.Hooks {
	return dns.Hooks{
		Answered: func(tcp bool, rcode int, truncated bool) {
			c.mu.Lock()
			defer c.mu.Unlock()
			c.rcodes[rcode]++
			if truncated {
				c.truncated++
			}
		},
		Limited: func(l dns.Limit) {
			c.mu.Lock()
			c.limits[l]++
			c.mu.Unlock()
			c.limitHit <- l
		},
		Malformed: func() {
			c.mu.Lock()
			defer c.mu.Unlock()
			c.malformed++
		},
	}
}

func (c *counts) get(f func(*counts) int) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return f(c)
}

// listen serves src on 127.0.0.1:0 until the test ends.
func listen(t *testing.T, cfg dns.Config, src dns.Source, lim dns.Limits) *dns.Server {
	t.Helper()
	if cfg.Rand == nil {
		cfg.Rand = rand.Float64 // safe for concurrent use
	}
	h := handler(t, cfg, src)
	s, err := dns.Listen("127.0.0.1:0", h, lim)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func exchange(t *testing.T, network, addr string, req *mdns.Msg) *mdns.Msg {
	t.Helper()
	c := &mdns.Client{Net: network, Timeout: 30 * time.Second, UDPSize: 65535}
	resp, _, err := c.Exchange(req, addr)
	if err != nil {
		t.Fatalf("%s exchange %v: %v", network, req.Question, err)
	}
	return resp
}

func forty() registrySource {
	var ins []*registry.Instance
	for i := range 40 {
		ins = append(ins, inst("web", fmt.Sprint(i), fmt.Sprintf("10.0.0.%d", i+1)))
	}
	return source(ins...)
}

// Forty instances do not fit 512 bytes: TC over UDP, and every one over
// TCP; an EDNS0 buffer large enough gets them all over UDP.
func TestTruncationAndTCP(t *testing.T) {
	c := newCounts()
	s := listen(t, dns.Config{Hooks: c.hooks(), MaxUDPSize: 4096}, forty(), dns.Limits{})
	for _, qtype := range []uint16{mdns.TypeA, mdns.TypeSRV} {
		req := new(mdns.Msg)
		req.SetQuestion("web.service.consul.", qtype)
		udp := exchange(t, "udp", s.Addr(), req)
		if !udp.Truncated || len(udp.Answer) >= 40 {
			t.Errorf("%s over UDP: TC %v, %d answers; want TC", mdns.TypeToString[qtype], udp.Truncated, len(udp.Answer))
		}
		tcp := exchange(t, "tcp", s.Addr(), req)
		if tcp.Truncated || len(tcp.Answer) != 40 {
			t.Errorf("%s over TCP: TC %v, %d answers; want all 40", mdns.TypeToString[qtype], tcp.Truncated, len(tcp.Answer))
		}
		if qtype == mdns.TypeSRV && len(tcp.Extra) != 40 {
			t.Errorf("SRV over TCP: %d additional records, want 40 addresses", len(tcp.Extra))
		}
		req.SetEdns0(4096, false)
		edns := exchange(t, "udp", s.Addr(), req)
		if edns.Truncated || len(edns.Answer) != 40 || edns.IsEdns0() == nil || edns.IsEdns0().UDPSize() != 4096 {
			t.Errorf("%s over UDP with a 4096-byte EDNS0 buffer: TC %v, %d answers, OPT %v; want all 40", mdns.TypeToString[qtype], edns.Truncated, len(edns.Answer), edns.IsEdns0())
		}
	}
	// The count follows the answer's write: a client may read it first.
	testutil.Eventually(t, 30*time.Second, "both truncated answers counted", func() bool {
		return c.get(func(c *counts) int { return c.truncated }) == 2
	})
}

// udpConn sends raw datagrams and reads answers.
type udpConn struct {
	t *testing.T
	net.Conn
}

func dialUDP(t *testing.T, addr string) *udpConn {
	c, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &udpConn{t, c}
}

func (c *udpConn) send(b []byte) {
	if _, err := c.Write(b); err != nil {
		c.t.Fatal(err)
	}
}

func (c *udpConn) read() *mdns.Msg {
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	buf := make([]byte, 65535)
	n, err := c.Read(buf)
	if err != nil {
		c.t.Fatal(err)
	}
	m := new(mdns.Msg)
	if err := m.Unpack(buf[:n]); err != nil {
		c.t.Fatal(err)
	}
	return m
}

func packed(t *testing.T, m *mdns.Msg) []byte {
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Malformed and oversized queries are answered FORMERR or dropped; the
// server goes on answering. (A dropped query is shown by the next query's
// answer arriving first.)
func TestMalformedAndOversizedQueries(t *testing.T) {
	c := newCounts()
	s := listen(t, dns.Config{Hooks: c.hooks()}, forty(), dns.Limits{})
	u := dialUDP(t, s.Addr())
	good := new(mdns.Msg)
	good.SetQuestion("web.service.consul.", mdns.TypeA)
	good.Id = 4242
	expectGood := func(what string) {
		t.Helper()
		if m := u.read(); m.Id != 4242 || m.Rcode != mdns.RcodeSuccess {
			t.Fatalf("after %s: answer %d %s, want the good query's", what, m.Id, mdns.RcodeToString[m.Rcode])
		}
	}

	// Shorter than a header: dropped.
	u.send([]byte{1, 2, 3})
	u.send(packed(t, good))
	expectGood("a 3-byte datagram")

	// A header that promises a question the body does not hold: FORMERR.
	bad := packed(t, good)
	binary.BigEndian.PutUint16(bad, 77)
	u.send(bad[:14])
	if m := u.read(); m.Id != 77 || m.Rcode != mdns.RcodeFormatError {
		t.Fatalf("truncated question: answer %d %s, want 77 FORMERR", m.Id, mdns.RcodeToString[m.Rcode])
	}

	// Two questions: FORMERR.
	two := new(mdns.Msg)
	two.SetQuestion("web.service.consul.", mdns.TypeA)
	two.Question = append(two.Question, two.Question[0])
	two.Id = 78
	u.send(packed(t, two))
	if m := u.read(); m.Id != 78 || m.Rcode != mdns.RcodeFormatError {
		t.Fatalf("two questions: answer %d %s, want 78 FORMERR", m.Id, mdns.RcodeToString[m.Rcode])
	}

	// An update: NOTIMP.
	upd := new(mdns.Msg)
	upd.SetUpdate("consul.")
	upd.Id = 79
	u.send(packed(t, upd))
	if m := u.read(); m.Id != 79 || m.Rcode != mdns.RcodeNotImplemented {
		t.Fatalf("update: answer %d %s, want 79 NOTIMP", m.Id, mdns.RcodeToString[m.Rcode])
	}

	// Longer than --dns-max-query-bytes (512): dropped, counted.
	big := new(mdns.Msg)
	big.SetQuestion("web.service.consul.", mdns.TypeA)
	big.SetEdns0(4096, false)
	big.IsEdns0().Option = append(big.IsEdns0().Option, &mdns.EDNS0_LOCAL{Code: 65001, Data: make([]byte, 600)})
	u.send(packed(t, big))
	u.send(packed(t, good))
	expectGood("a 650-byte query")
	if got := <-c.limitHit; got != dns.LimitQueryBytes {
		t.Fatalf("limit hit %s, want %s", got, dns.LimitQueryBytes)
	}

	// Over TCP the same ends the connection.
	conn, err := net.Dial("tcp", s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	b := packed(t, big)
	conn.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(b))), b...))
	conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	if n, err := conn.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("TCP read after an oversized query = %d, %v; want EOF", n, err)
	}
	if got := <-c.limitHit; got != dns.LimitQueryBytes {
		t.Fatalf("limit hit %s, want %s", got, dns.LimitQueryBytes)
	}
	if got := c.get(func(c *counts) int { return c.malformed }); got != 4 {
		t.Errorf("malformed counted %d times, want 4 (short, truncated question, two questions, the update)", got)
	}
}

func TestTCPConnLimit(t *testing.T) {
	c := newCounts()
	s := listen(t, dns.Config{Hooks: c.hooks()}, forty(), dns.Limits{MaxTCPConns: 2})
	req := new(mdns.Msg)
	req.SetQuestion("web.service.consul.", mdns.TypeA)
	var conns []*mdns.Conn
	for range 2 {
		co, err := mdns.Dial("tcp", s.Addr())
		if err != nil {
			t.Fatal(err)
		}
		defer co.Close()
		co.SetDeadline(time.Now().Add(30 * time.Second))
		if err := co.WriteMsg(req); err != nil {
			t.Fatal(err)
		}
		if _, err := co.ReadMsg(); err != nil {
			t.Fatal(err)
		}
		conns = append(conns, co)
	}
	// The third is closed at once.
	third, err := net.Dial("tcp", s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer third.Close()
	third.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := third.Read(make([]byte, 1)); err == nil {
		t.Fatal("a third connection over --dns-max-tcp-conns 2 was served")
	}
	if got := <-c.limitHit; got != dns.LimitTCPConns {
		t.Fatalf("limit hit %s, want %s", got, dns.LimitTCPConns)
	}
	// UDP is not held up by it, and a closed connection frees its place.
	if resp := exchange(t, "udp", s.Addr(), req); resp.Rcode != mdns.RcodeSuccess {
		t.Fatalf("UDP beside full TCP: %v", resp)
	}
	conns[0].Close()
	testutil.Eventually(t, 30*time.Second, "a TCP query after a connection closed", func() bool {
		c := &mdns.Client{Net: "tcp", Timeout: 5 * time.Second}
		_, _, err := c.Exchange(req, s.Addr())
		return err == nil
	})
}

// blockingSource holds every lookup until released.
type blockingSource struct {
	registrySource
	entered chan struct{}
	release chan struct{}
}

func (b *blockingSource) Snapshot(sk registry.ServiceKey) (*registry.Snapshot, bool) {
	b.entered <- struct{}{}
	<-b.release
	return b.registrySource.Snapshot(sk)
}

func TestInFlightLimit(t *testing.T) {
	c := newCounts()
	src := &blockingSource{registrySource: forty(), entered: make(chan struct{}, 10), release: make(chan struct{})}
	s := listen(t, dns.Config{Hooks: c.hooks()}, src, dns.Limits{MaxInFlight: 1})
	u := dialUDP(t, s.Addr())
	first := new(mdns.Msg)
	first.SetQuestion("web.service.consul.", mdns.TypeA)
	first.Id = 1
	u.send(packed(t, first))
	<-src.entered // the first query is being answered
	second := first.Copy()
	second.Id = 2
	u.send(packed(t, second))
	if got := <-c.limitHit; got != dns.LimitInFlight {
		t.Fatalf("limit hit %s, want %s", got, dns.LimitInFlight)
	}
	close(src.release)
	if m := u.read(); m.Id != 1 || len(m.Answer) == 0 {
		t.Fatalf("answer %d with %d records, want the first query's", m.Id, len(m.Answer))
	}
}

func TestListenRefusesBadLimits(t *testing.T) {
	h := handler(t, dns.Config{}, registrySource{})
	for _, lim := range []dns.Limits{{MaxTCPConns: -1}, {MaxQueryBytes: 10}, {IdleTimeout: -time.Second}, {WriteTimeout: time.Hour}} {
		if s, err := dns.Listen("127.0.0.1:0", h, lim); err == nil {
			s.Close()
			t.Errorf("Listen(%+v) = nil error", lim)
		}
	}
	if _, err := dns.Listen("127.0.0.1", h, dns.Limits{}); err == nil {
		t.Error("Listen(no port) = nil error")
	}
}

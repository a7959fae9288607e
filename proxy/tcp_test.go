package proxy_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/proxy"
	"beacon.dev/beacon/registry"
)

// echoBackend is a TCP server on 127.0.0.1 that writes back what it reads
// and, on the client's half-close, half-closes in turn.
type echoBackend struct {
	id       string
	ln       net.Listener
	accepted atomic.Int64
	wg       sync.WaitGroup

	mu    sync.Mutex
	conns map[net.Conn]struct{} // guarded by mu
}

// echoBackend starts an echo server, registers it as id of service, and
// stops it (every goroutine) when the test ends.
func (e *env) echoBackend(service, id string) *echoBackend {
	e.t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		e.t.Fatal(err)
	}
	b := &echoBackend{id: id, ln: ln, conns: map[net.Conn]struct{}{}}
	b.wg.Add(1)
	go func() { defer b.wg.Done(); b.serve() }() // ends with stop
	e.t.Cleanup(b.stop)
	host, port, _ := net.SplitHostPort(ln.Addr().String())
	pn, _ := strconv.Atoi(port)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := e.sess.Register(ctx, registry.Instance{Service: service, ID: id, Address: host, Port: pn}); err != nil {
		e.t.Fatal(err)
	}
	return b
}

func (b *echoBackend) serve() {
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		b.accepted.Add(1)
		b.mu.Lock()
		b.conns[c] = struct{}{}
		b.mu.Unlock()
		b.wg.Add(1)
		go func() { // ends with its connection; stop closes those
			defer b.wg.Done()
			defer func() {
				b.mu.Lock()
				delete(b.conns, c)
				b.mu.Unlock()
				c.Close()
			}()
			if _, err := io.Copy(c, c); err == nil {
				_ = c.(*net.TCPConn).CloseWrite()
			}
		}()
	}
}

// closeListener stops accepting; open connections keep echoing.
func (b *echoBackend) closeListener() { b.ln.Close() }

// stop closes the listener and every connection and waits for them.
func (b *echoBackend) stop() {
	b.ln.Close()
	b.mu.Lock()
	for c := range b.conns {
		c.Close()
	}
	b.mu.Unlock()
	b.wg.Wait()
}

// tcpConfig is a proxy config with one TCP route to service on addr.
func tcpConfig(addr, service, extra string) string {
	return fmt.Sprintf("tcp: [{name: t, addr: %q, service: %s%s}]\n", addr, service, extra)
}

// dialTCP opens a connection to the proxy, closed when the test ends.
func dialTCP(t testing.TB, addr string) (*net.TCPConn, error) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn), nil
}

// roundTrip writes msg and reads it back.
func roundTrip(c net.Conn, msg string) error {
	if _, err := io.WriteString(c, msg); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return fmt.Errorf("echo = %q, want %q", buf, msg)
	}
	return nil
}

// waitTCPServing waits until a connection through addr echoes.
func waitTCPServing(t *testing.T, addr string) {
	t.Helper()
	testutil.Eventually(t, 20*time.Second, "tcp proxy "+addr+" echoing", func() bool {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return false
		}
		defer c.Close()
		return roundTrip(c, "ping") == nil
	})
}

// oneConn opens a connection, echoes once and closes it.
func oneConn(t *testing.T, addr string, i int) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial %d: %v", i, err)
	}
	defer c.Close()
	if err := roundTrip(c, fmt.Sprintf("conn %d", i)); err != nil {
		t.Fatalf("connection %d: %v", i, err)
	}
}

// waitNoNewConns waits until 20 connections in a row miss b: the
// balancer applies a new set after the cache has it (1 chance in 3000 of
// passing early if b still got a third of them).
func waitNoNewConns(t *testing.T, addr string, b *echoBackend) {
	t.Helper()
	streak := 0
	testutil.Eventually(t, 20*time.Second, b.id+" getting no new connections", func() bool {
		before := b.accepted.Load()
		oneConn(t, addr, streak)
		if b.accepted.Load() != before {
			streak = 0
			return false
		}
		streak++
		return streak >= 20
	})
}

func TestTCPEchoBothWaysWithHalfClose(t *testing.T) {
	e := newEnv(t)
	e.echoBackend("echo", "e1")
	addr := testutil.FreeAddr(t)
	e.startProxy(tcpConfig(addr, "echo", ""))
	waitTCPServing(t, addr)

	c, err := dialTCP(t, addr)
	if err != nil {
		t.Fatal(err)
	}
	// 4 MiB of random bytes, written while the answer is read, more than
	// the socket buffers hold: both directions must flow at once.
	want := make([]byte, 4<<20)
	rand.Read(want)
	werr := make(chan error, 1)
	go func() { // ends when the write is done; waited for below
		_, err := c.Write(want)
		if err == nil {
			err = c.CloseWrite() // half-close: the read side stays open
		}
		werr <- err
	}()
	got, rerr := io.ReadAll(c) // ends at the backend's half-close, relayed
	if err := <-werr; err != nil {
		t.Fatalf("write then CloseWrite: %v", err)
	}
	if rerr != nil {
		t.Fatalf("ReadAll = %v", rerr)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("echo: got %d bytes, want the %d sent back intact", len(got), len(want))
	}
}

func TestTCPSpreadsAndDrains(t *testing.T) {
	e := newEnv(t)
	bs := []*echoBackend{e.echoBackend("echo", "e1"), e.echoBackend("echo", "e2"), e.echoBackend("echo", "e3"), e.echoBackend("echo", "e4")}
	addr := testutil.FreeAddr(t)
	e.startProxy(tcpConfig(addr, "echo", ""))
	waitTCPServing(t, addr)

	// Connections held open at once: least connections must give every
	// backend some.
	held := make([]*net.TCPConn, 30)
	for i := range held {
		c, err := dialTCP(t, addr)
		if err != nil {
			t.Fatal(err)
		}
		if err := roundTrip(c, fmt.Sprintf("held %d", i)); err != nil {
			t.Fatalf("held connection %d: %v", i, err)
		}
		held[i] = c
	}
	for _, b := range bs {
		if n := b.accepted.Load(); n == 0 {
			t.Errorf("backend %s accepted %d of %d held connections, want some", b.id, n, len(held))
		}
	}

	// e1 drains: marked DRAINING and, once every watcher applied that,
	// it must get no new connection while its open ones keep working.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	in, err := e.c.SetStatus(ctx, "echo", "e1", registry.StatusDraining)
	if err != nil {
		t.Fatal(err)
	}
	if res, err := e.c.AwaitWatchers(ctx, "echo", in.Revision, 10*time.Second); err != nil || !res.Complete() {
		t.Fatalf("AwaitWatchers = %+v, %v; want complete", res, err)
	}
	waitNoNewConns(t, addr, bs[0])
	before := []int64{bs[0].accepted.Load(), bs[1].accepted.Load(), bs[2].accepted.Load(), bs[3].accepted.Load()}
	for i := range 30 {
		oneConn(t, addr, i)
	}
	if n := bs[0].accepted.Load() - before[0]; n != 0 {
		t.Errorf("draining backend e1 accepted %d new connections, want 0", n)
	}
	if n := bs[1].accepted.Load() - before[1] + bs[2].accepted.Load() - before[2] + bs[3].accepted.Load() - before[3]; n != 30 {
		t.Errorf("after e1 drained, e2, e3 and e4 accepted %d of 30 connections, want all", n)
	}
	for i, c := range held { // open connections, e1's among them, still echo
		if err := roundTrip(c, fmt.Sprintf("still %d", i)); err != nil {
			t.Errorf("held connection %d after the drain: %v", i, err)
		}
	}

	// e2 is deregistered, then its listener closes: once every watcher
	// has the change, only e3 and e4 get connections, and every one is
	// served. (One of three routable instances: a deregistration of half
	// would be held back by the discovery cache's mass-loss guard, which
	// cannot tell it from a lost session.)
	rev, err := e.c.Deregister(ctx, "echo", "e2")
	if err != nil || !rev {
		t.Fatalf("Deregister(e2) = %v, %v; want found", rev, err)
	}
	snap, err := e.c.Instances(ctx, "echo")
	if err != nil {
		t.Fatal(err)
	}
	if res, err := e.c.AwaitWatchers(ctx, "echo", snap.Revision, 10*time.Second); err != nil || !res.Complete() {
		t.Fatalf("AwaitWatchers = %+v, %v; want complete", res, err)
	}
	waitNoNewConns(t, addr, bs[1])
	bs[1].closeListener()
	before34 := bs[2].accepted.Load() + bs[3].accepted.Load()
	for i := range 30 {
		oneConn(t, addr, i)
	}
	if n := bs[2].accepted.Load() + bs[3].accepted.Load() - before34; n != 30 {
		t.Errorf("with e1 draining and e2 gone, e3 and e4 accepted %d of 30 connections, want all", n)
	}
}

// A backend that stops listening before beacon drops it (a crash, a
// shutdown in the wrong order) refuses the proxy's dials: tcp.go promises
// that a failed dial is retried on another instance, so clients must not
// see it.
func TestTCPRetriesRefusedDial(t *testing.T) {
	e := newEnv(t)
	bs := []*echoBackend{e.echoBackend("echo", "e1"), e.echoBackend("echo", "e2")}
	addr := testutil.FreeAddr(t)
	e.startProxy(tcpConfig(addr, "echo", ""))
	waitTCPServing(t, addr)
	bs[0].closeListener() // still registered
	for i := range 30 {
		oneConn(t, addr, i)
	}
}

func TestTCPMaxConnections(t *testing.T) {
	e := newEnv(t)
	e.echoBackend("echo", "e1")
	addr := testutil.FreeAddr(t)
	p, _, _ := e.startProxy(tcpConfig(addr, "echo", ", maxConnections: 2"))
	waitTCPServing(t, addr)
	// The probes' connections must be counted out before two are held.
	waitOpen(t, p, "t", 0)

	var held []*net.TCPConn
	for i := range 2 {
		c, err := dialTCP(t, addr)
		if err != nil {
			t.Fatal(err)
		}
		if err := roundTrip(c, "hold"); err != nil {
			t.Fatalf("connection %d of 2: %v", i, err)
		}
		held = append(held, c)
	}
	// The third is accepted by the kernel and closed by the proxy at once.
	c, err := dialTCP(t, addr)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.WriteString(c, "over")
	if n, err := c.Read(make([]byte, 8)); err == nil { // EOF or a reset
		t.Fatalf("third connection over maxConnections 2 read %d bytes, want it closed", n)
	}
	// Closing one frees its slot.
	held[0].Close()
	testutil.Eventually(t, 20*time.Second, "a slot freed by a close", func() bool {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return false
		}
		defer c.Close()
		return roundTrip(c, "again") == nil
	})
	if err := roundTrip(held[1], "still"); err != nil {
		t.Errorf("held connection under the limit: %v", err)
	}
}

// A connection quiet both ways for tcp[i].idleTimeout is closed by the
// proxy (nginx's proxy_timeout); the listener keeps serving.
func TestTCPIdleTimeoutClosesQuietConnections(t *testing.T) {
	e := newEnv(t)
	e.echoBackend("echo", "e1")
	addr := testutil.FreeAddr(t)
	e.startProxy(tcpConfig(addr, "echo", ", idleTimeout: 2s"))
	waitTCPServing(t, addr)
	c, err := dialTCP(t, addr)
	if err != nil {
		t.Fatal(err)
	}
	if err := roundTrip(c, "hello"); err != nil {
		t.Fatal(err)
	}
	// Nothing more is sent: the proxy closes it (EOF), long before this
	// read's own deadline.
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	if n, err := c.Read(make([]byte, 8)); err != io.EOF {
		t.Fatalf("reading a quiet connection = %d, %v; want EOF from the proxy's idle timeout", n, err)
	}
	waitTCPServing(t, addr)
}

// waitOpen waits until the proxy counts n open connections on listener.
func waitOpen(t *testing.T, p *proxy.Proxy, listener string, n float64) {
	t.Helper()
	testutil.Eventually(t, 30*time.Second, fmt.Sprintf("%v connections open on %s", n, listener), func() bool {
		mfs, err := p.Gatherer().Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() != "beacon_proxy_connections" {
				continue
			}
			for _, m := range mf.GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == "listener" && l.GetValue() == listener {
						return m.GetGauge().GetValue() == n
					}
				}
			}
		}
		return n == 0
	})
}

// A client that sends and stops reading blocks the proxy's writes to it:
// the idle timeout (write deadlines too) closes it and frees its slot.
func TestTCPIdleTimeoutFreesAClientThatStopsReading(t *testing.T) {
	e := newEnv(t)
	e.echoBackend("echo", "e1")
	addr := testutil.FreeAddr(t)
	p, _, _ := e.startProxy(tcpConfig(addr, "echo", ", maxConnections: 1, idleTimeout: 2s"))
	waitTCPServing(t, addr)
	waitOpen(t, p, "t", 0)
	c, err := dialTCP(t, addr)
	if err != nil {
		t.Fatal(err)
	}
	// Echoed back and never read: every buffer on the way fills, then
	// the proxy's write to this client blocks; writes go on until the
	// proxy closes the connection (however large the socket buffers).
	werr := make(chan error, 1)
	go func() { // ends when the proxy closes the connection
		chunk := make([]byte, 1<<20)
		for {
			if _, err := c.Write(chunk); err != nil {
				werr <- err
				return
			}
		}
	}()
	select {
	case <-werr: // the proxy closed it
	case <-time.After(60 * time.Second): // liveness, not latency
		t.Fatal("the stuck connection was never closed")
	}
	waitOpen(t, p, "t", 0)
	waitTCPServing(t, addr) // its one slot is free again
}

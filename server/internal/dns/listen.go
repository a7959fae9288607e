package dns

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	mdns "github.com/miekg/dns"
)

// Limit names a listener limit by its flag (without the dashes).
type Limit string

// The listeners' limits, by flag.
const (
	LimitTCPConns   Limit = "dns-max-tcp-conns"
	LimitInFlight   Limit = "dns-max-inflight"
	LimitQueryBytes Limit = "dns-max-query-bytes"
)

// Limits bound what queriers can make a Server hold. Zero fields take the
// defaults (DefaultLimits).
type Limits struct {
	// MaxTCPConns bounds the open TCP connections; one more is closed as
	// soon as it is accepted.
	MaxTCPConns int
	// MaxInFlight bounds the UDP queries being answered at once; one more
	// is dropped, as a full socket buffer would drop it (the querier
	// retries).
	MaxInFlight int
	// MaxQueryBytes bounds one query message; a longer one is dropped
	// (UDP) or ends its connection (TCP).
	MaxQueryBytes int
	// ReadTimeout bounds reading a query from a new TCP connection,
	// IdleTimeout the wait for the next query on it (RFC 7766), and
	// WriteTimeout each write of an answer, so that a querier that does
	// not read cannot hold a connection.
	ReadTimeout, IdleTimeout, WriteTimeout time.Duration
}

// DefaultLimits are the limits of a Server.
var DefaultLimits = Limits{
	MaxTCPConns:   256,
	MaxInFlight:   1024,
	MaxQueryBytes: 512,
	ReadTimeout:   2 * time.Second,
	IdleTimeout:   8 * time.Second,
	WriteTimeout:  2 * time.Second,
}

// WithDefaults returns l with its zero fields set to DefaultLimits'.
func (l Limits) WithDefaults() Limits {
	d := DefaultLimits
	set := func(v *int, def int) {
		if *v == 0 {
			*v = def
		}
	}
	setD := func(v *time.Duration, def time.Duration) {
		if *v == 0 {
			*v = def
		}
	}
	set(&l.MaxTCPConns, d.MaxTCPConns)
	set(&l.MaxInFlight, d.MaxInFlight)
	set(&l.MaxQueryBytes, d.MaxQueryBytes)
	setD(&l.ReadTimeout, d.ReadTimeout)
	setD(&l.IdleTimeout, d.IdleTimeout)
	setD(&l.WriteTimeout, d.WriteTimeout)
	return l
}

// Validate names the first limit out of range.
func (l Limits) Validate() error {
	switch {
	case l.MaxTCPConns < 0 || l.MaxTCPConns > 1<<20:
		return fmt.Errorf("dns: --%s %d: must be between 1 and %d (0: the default, %d)", LimitTCPConns, l.MaxTCPConns, 1<<20, DefaultLimits.MaxTCPConns)
	case l.MaxInFlight < 0 || l.MaxInFlight > 1<<20:
		return fmt.Errorf("dns: --%s %d: must be between 1 and %d (0: the default, %d)", LimitInFlight, l.MaxInFlight, 1<<20, DefaultLimits.MaxInFlight)
	case l.MaxQueryBytes < 0 || l.MaxQueryBytes > 0 && l.MaxQueryBytes < 64 || l.MaxQueryBytes > maxMsgSize:
		return fmt.Errorf("dns: --%s %d: must be between 64 and %d (0: the default, %d)", LimitQueryBytes, l.MaxQueryBytes, maxMsgSize, DefaultLimits.MaxQueryBytes)
	case l.ReadTimeout < 0 || l.IdleTimeout < 0 || l.WriteTimeout < 0 || l.ReadTimeout > time.Minute || l.IdleTimeout > time.Hour || l.WriteTimeout > time.Minute:
		return fmt.Errorf("dns: --dns-read-timeout %v, --dns-idle-timeout %v, --dns-write-timeout %v: must not be negative; read and write at most 1m, idle at most 1h (0: the defaults)", l.ReadTimeout, l.IdleTimeout, l.WriteTimeout)
	}
	return nil
}

// Server serves a Handler on one address over UDP and TCP. Listen starts
// it; Close stops it and waits for every goroutine it started.
type Server struct {
	h     *Handler
	lim   Limits
	udp   *mdns.Server
	tcp   *mdns.Server
	pc    *net.UDPConn
	ln    *limitListener
	errc  chan error
	inUDP atomic.Int64 // UDP queries being answered

	started   sync.WaitGroup // each mdns.Server started or gave up
	exited    sync.WaitGroup // each mdns.Server returned
	closeOnce sync.Once
}

// Listen binds addr for UDP and for TCP (the same port: with port 0, the
// kernel's choice for UDP, then TCP on it) and serves h until Close.
func Listen(addr string, h *Handler, lim Limits) (*Server, error) {
	lim = lim.WithDefaults()
	if err := lim.Validate(); err != nil {
		return nil, err
	}
	pc, ln, err := bind(addr)
	if err != nil {
		return nil, err
	}
	s := &Server{h: h, lim: lim, pc: pc, errc: make(chan error, 2)}
	s.ln = &limitListener{Listener: ln, max: int64(lim.MaxTCPConns), writeTimeout: lim.WriteTimeout, limited: func() { h.limited(LimitTCPConns) }}
	accept := func(dh mdns.Header) mdns.MsgAcceptAction {
		a := mdns.DefaultMsgAcceptFunc(dh)
		if a == mdns.MsgReject || a == mdns.MsgRejectNotImplemented {
			h.malformed()
		}
		return a
	}
	invalid := func([]byte, error) { h.malformed() }
	decorate := func(r mdns.Reader) mdns.Reader {
		return sizeReader{Reader: r, max: lim.MaxQueryBytes, limited: func() { h.limited(LimitQueryBytes) }}
	}
	s.udp = &mdns.Server{
		PacketConn: pc, Handler: mdns.HandlerFunc(s.serveUDP),
		UDPSize:       lim.MaxQueryBytes + 1, // a longer datagram shows as one byte too long
		ReadTimeout:   lim.ReadTimeout,
		MsgAcceptFunc: accept, MsgInvalidFunc: invalid, DecorateReader: decorate,
	}
	s.tcp = &mdns.Server{
		Listener: s.ln, Handler: mdns.HandlerFunc(s.serveTCP),
		ReadTimeout: lim.ReadTimeout, IdleTimeout: func() time.Duration { return lim.IdleTimeout },
		MsgAcceptFunc: accept, MsgInvalidFunc: invalid, DecorateReader: decorate,
	}
	for _, srv := range []*mdns.Server{s.udp, s.tcp} {
		s.started.Add(1)
		s.exited.Add(1)
		var once sync.Once
		srv.NotifyStartedFunc = func() { once.Do(s.started.Done) }
		go func() {
			defer s.exited.Done()
			err := srv.ActivateAndServe()
			once.Do(s.started.Done) // it may fail before it starts
			if err != nil {
				s.errc <- fmt.Errorf("dns: serving %s: %w", addr, err)
			}
		}()
	}
	return s, nil
}

// bind listens on addr over UDP and TCP on the same port.
func bind(addr string) (*net.UDPConn, net.Listener, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, nil, fmt.Errorf("dns: invalid address %q: %w", addr, err)
	}
	var lastErr error
	for range 20 { // port 0: another process may hold the kernel's UDP choice over TCP
		pc, err := net.ListenPacket("udp", addr)
		if err != nil {
			return nil, nil, fmt.Errorf("dns: listening on %s (UDP): %w", addr, err)
		}
		udp := pc.(*net.UDPConn)
		tcpAddr := net.JoinHostPort(host, fmt.Sprint(udp.LocalAddr().(*net.UDPAddr).Port))
		ln, err := net.Listen("tcp", tcpAddr)
		if err == nil {
			return udp, ln, nil
		}
		udp.Close()
		lastErr = fmt.Errorf("dns: listening on %s (TCP): %w", tcpAddr, err)
		if port != "0" {
			break
		}
	}
	return nil, nil, lastErr
}

// Addr returns the address the server listens on (UDP and TCP).
func (s *Server) Addr() string { return s.pc.LocalAddr().String() }

// Err receives an error if a listener fails; it never blocks the server.
func (s *Server) Err() <-chan error { return s.errc }

// Close stops both listeners and waits for the queries being answered.
// Reads end at once; an answer being written waits at most WriteTimeout.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.started.Wait() // ShutdownContext refuses a server not yet started
		for _, srv := range []*mdns.Server{s.udp, s.tcp} {
			srv.Shutdown() // "not started" when it failed: nothing to stop
		}
		s.exited.Wait()
		s.pc.Close()
		s.ln.Close()
	})
	return nil
}

func (s *Server) serveUDP(w mdns.ResponseWriter, req *mdns.Msg) {
	if s.inUDP.Add(1) > int64(s.lim.MaxInFlight) {
		s.inUDP.Add(-1)
		s.h.limited(LimitInFlight)
		return
	}
	defer s.inUDP.Add(-1)
	s.h.ServeDNS(w, req, false)
}

func (s *Server) serveTCP(w mdns.ResponseWriter, req *mdns.Msg) { s.h.ServeDNS(w, req, true) }

// sizeReader drops queries longer than max: over UDP it reads on (the
// querier times out, as if the datagram was lost); over TCP the error ends
// the connection.
type sizeReader struct {
	mdns.Reader
	max     int
	limited func()
}

var errQueryTooLong = errors.New("dns: query longer than --dns-max-query-bytes")

func (r sizeReader) ReadTCP(conn net.Conn, timeout time.Duration) ([]byte, error) {
	m, err := r.Reader.ReadTCP(conn, timeout)
	if err == nil && len(m) > r.max {
		r.limited()
		return nil, errQueryTooLong
	}
	return m, err
}

func (r sizeReader) ReadUDP(conn *net.UDPConn, timeout time.Duration) ([]byte, *mdns.SessionUDP, error) {
	for {
		m, s, err := r.Reader.ReadUDP(conn, timeout)
		if err != nil || len(m) <= r.max {
			return m, s, err
		}
		r.limited()
	}
}

// limitListener closes connections beyond max as soon as they are
// accepted, and bounds every write of the connections it keeps.
type limitListener struct {
	net.Listener
	max          int64
	open         atomic.Int64
	writeTimeout time.Duration
	limited      func()
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if l.open.Add(1) > l.max {
			l.open.Add(-1)
			c.Close()
			l.limited()
			continue
		}
		return &limitedConn{Conn: c, l: l}, nil
	}
}

type limitedConn struct {
	net.Conn
	l    *limitListener
	once sync.Once
}

func (c *limitedConn) Write(b []byte) (int, error) {
	c.Conn.SetWriteDeadline(time.Now().Add(c.l.writeTimeout))
	return c.Conn.Write(b)
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.l.open.Add(-1) })
	return err
}

// remoteAddr is the querier's address.
func remoteAddr(w mdns.ResponseWriter) netip.Addr {
	switch a := w.RemoteAddr().(type) {
	case *net.UDPAddr:
		return a.AddrPort().Addr().Unmap()
	case *net.TCPAddr:
		return a.AddrPort().Addr().Unmap()
	}
	return netip.Addr{}
}

package server

import (
	"context"
	"crypto/tls"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// connLimiter is a listener that refuses connections past the server's
// limits: a new connection over MaxConns, or over MaxConnsPerIP from its
// address, is closed at once and counted, so the server keeps the file
// descriptors it needs whatever its clients do.
type connLimiter struct {
	net.Listener
	max, perIP int
	newWrites  func() *rate.Limiter // an address's write budget
	refused    func(reason string)  // counts and logs; never blocks

	mu      sync.Mutex
	open    int                 // guarded by mu
	byIP    map[string]*ipState // guarded by mu
	idle    int                 // addresses with no connection left, kept until their budget refills; guarded by mu
	swept   time.Time           // guarded by mu
	sweepAt int                 // idle entries that trigger a sweep; guarded by mu
}

// ipState is what one client address holds: its connections and, shared
// by them, its budget of writes (so that opening more connections does
// not buy more writes). It outlives the address's last connection until
// its budget has refilled: otherwise a client that opens a connection per
// write would get a fresh burst every time.
type ipState struct {
	conns  int // guarded by connLimiter.mu
	writes *rate.Limiter
}

func newConnLimiter(ln net.Listener, max, perIP int, newWrites func() *rate.Limiter, refused func(reason string)) *connLimiter {
	return &connLimiter{Listener: ln, max: max, perIP: perIP, newWrites: newWrites, refused: refused, byIP: make(map[string]*ipState), sweepAt: 1024}
}

func (l *connLimiter) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		ip := c.RemoteAddr().String()
		if h, _, err := net.SplitHostPort(ip); err == nil {
			ip = h
		}
		l.mu.Lock()
		l.sweepLocked()
		reason := ""
		st := l.byIP[ip]
		switch {
		case l.open >= l.max:
			reason = "max-conns"
		case st != nil && st.conns >= l.perIP:
			reason = "max-conns-per-ip"
		default:
			if st == nil {
				st = &ipState{writes: l.newWrites()}
				l.byIP[ip] = st
			} else if st.conns == 0 {
				l.idle--
			}
			l.open++
			st.conns++
		}
		l.mu.Unlock()
		if reason != "" {
			c.Close()
			l.refused(reason)
			continue
		}
		return &limitedConn{Conn: c, l: l, ip: ip, writes: st.writes}, nil
	}
}

// Open returns the connections open now.
func (l *connLimiter) Open() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.open
}

func (l *connLimiter) release(ip string) {
	l.mu.Lock()
	l.open--
	if st := l.byIP[ip]; st != nil {
		if st.conns--; st.conns <= 0 {
			if refilled(st.writes) {
				delete(l.byIP, ip)
			} else {
				l.idle++
			}
		}
	}
	l.mu.Unlock()
}

// sweepLocked forgets the addresses with no connection whose budget has
// refilled: at most once a second, or when their number doubles, so that
// the map stays bounded by the addresses seen within one refill time.
func (l *connLimiter) sweepLocked() {
	now := time.Now()
	if l.idle == 0 || (l.idle < l.sweepAt && now.Sub(l.swept) < time.Second) {
		return
	}
	l.swept = now
	for ip, st := range l.byIP {
		if st.conns == 0 && refilled(st.writes) {
			delete(l.byIP, ip)
			l.idle--
		}
	}
	l.sweepAt = max(1024, 2*l.idle)
}

// Addresses returns the client addresses the limiter holds state for.
func (l *connLimiter) Addresses() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.byIP)
}

func refilled(lim *rate.Limiter) bool {
	return lim.Tokens() >= float64(lim.Burst())
}

type limitedConn struct {
	net.Conn
	l      *connLimiter
	ip     string
	writes *rate.Limiter // its address's
	closed atomic.Bool
}

func (c *limitedConn) Close() error {
	if c.closed.CompareAndSwap(false, true) {
		c.l.release(c.ip)
	}
	return c.Conn.Close()
}

// clientConn is what the server tracks per client connection: the watch
// streams and waits it holds, its budget of writes and its address's.
type clientConn struct {
	addr     string
	watchers atomic.Int32
	awaits   atomic.Int32
	writes   *rate.Limiter
	ipWrites *rate.Limiter
}

type clientConnKey struct{}

// connContext attaches a clientConn to every request of a connection.
func (s *Server) connContext(ctx context.Context, c net.Conn) context.Context {
	lim := s.cfg.Limits
	cc := &clientConn{
		addr:     c.RemoteAddr().String(),
		writes:   rate.NewLimiter(rate.Limit(lim.WriteRate), lim.WriteBurst),
		ipWrites: rate.NewLimiter(rate.Inf, 0),
	}
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	if lc, ok := c.(*limitedConn); ok {
		cc.ipWrites = lc.writes
	}
	return context.WithValue(ctx, clientConnKey{}, cc)
}

// connOf returns the request's connection state; calls made without the
// server's HTTP stack (tests calling the handlers) get a fresh one.
func connOf(ctx context.Context) *clientConn {
	if cc, ok := ctx.Value(clientConnKey{}).(*clientConn); ok {
		return cc
	}
	return &clientConn{writes: rate.NewLimiter(rate.Inf, 0), ipWrites: rate.NewLimiter(rate.Inf, 0)}
}

// slot is a counted place under a limit: take reports whether it got one;
// release gives it back.
func take(n *atomic.Int32, limit int) bool {
	if n.Add(1) > int32(limit) {
		n.Add(-1)
		return false
	}
	return true
}

// logLimiter lets a warning through at most once per interval, so that a
// flood of refusals is counted in metrics without flooding the log.
type logLimiter struct {
	every time.Duration
	last  atomic.Int64
}

func (l *logLimiter) allow() bool {
	now := time.Now().UnixNano()
	last := l.last.Load()
	return now-last >= int64(l.every) && l.last.CompareAndSwap(last, now)
}

// limitListener puts another listener of the server (Consul API, console)
// behind the API's connection limits, counted on their own.
func (s *Server) limitListener(ln net.Listener) *connLimiter {
	lim := s.cfg.Limits
	return newConnLimiter(ln, lim.effectiveMaxConns(), lim.MaxConnsPerIP, s.conns.newWrites, func(limit string) {
		s.metrics.limitHits.WithLabelValues(limit).Inc()
	})
}

// tlsListener serves ln with the API's certificate and client CAs when
// the API has TLS.
func (s *Server) tlsListener(ln net.Listener) net.Listener {
	if s.tlsConfig != nil {
		return tls.NewListener(ln, s.tlsConfig)
	}
	return ln
}

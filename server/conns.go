package server

import (
	"context"
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
	refused    func(reason string) // counts and logs; never blocks

	mu   sync.Mutex
	open int            // guarded by mu
	byIP map[string]int // guarded by mu
}

func newConnLimiter(ln net.Listener, max, perIP int, refused func(reason string)) *connLimiter {
	return &connLimiter{Listener: ln, max: max, perIP: perIP, refused: refused, byIP: make(map[string]int)}
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
		reason := ""
		switch {
		case l.open >= l.max:
			reason = "max-conns"
		case l.byIP[ip] >= l.perIP:
			reason = "max-conns-per-ip"
		default:
			l.open++
			l.byIP[ip]++
		}
		l.mu.Unlock()
		if reason != "" {
			c.Close()
			l.refused(reason)
			continue
		}
		return &limitedConn{Conn: c, l: l, ip: ip}, nil
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
	if l.byIP[ip]--; l.byIP[ip] <= 0 {
		delete(l.byIP, ip)
	}
	l.mu.Unlock()
}

type limitedConn struct {
	net.Conn
	l      *connLimiter
	ip     string
	closed atomic.Bool
}

func (c *limitedConn) Close() error {
	if c.closed.CompareAndSwap(false, true) {
		c.l.release(c.ip)
	}
	return c.Conn.Close()
}

// clientConn is what the server tracks per client connection: the watch
// streams and waits it holds and its budget of writes.
type clientConn struct {
	addr     string
	watchers atomic.Int32
	awaits   atomic.Int32
	writes   *rate.Limiter
}

type clientConnKey struct{}

// connContext attaches a clientConn to every request of a connection.
func (s *Server) connContext(ctx context.Context, c net.Conn) context.Context {
	lim := s.cfg.Limits
	return context.WithValue(ctx, clientConnKey{}, &clientConn{
		addr:   c.RemoteAddr().String(),
		writes: rate.NewLimiter(rate.Limit(lim.WriteRate), lim.WriteBurst),
	})
}

// connOf returns the request's connection state; calls made without the
// server's HTTP stack (tests calling the handlers) get a fresh one.
func connOf(ctx context.Context) *clientConn {
	if cc, ok := ctx.Value(clientConnKey{}).(*clientConn); ok {
		return cc
	}
	return &clientConn{writes: rate.NewLimiter(rate.Inf, 0)}
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

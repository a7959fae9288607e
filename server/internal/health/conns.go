package health

import (
	"container/list"
	"context"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultMaxConns bounds the probe connections, open or being dialed, on
// one server.
const DefaultMaxConns = 1024

// connLimitError refuses a dial because the probe connections are at the
// limit: the server's problem, not the target's, so the probe gets no
// verdict.
type connLimitError struct{ max int64 }

func (e *connLimitError) Error() string {
	return fmt.Sprintf("health: probe connections at the limit (--check-max-conns %d)", e.max)
}

// idler is a prober that may keep a connection open between its probes
// (HTTP keep-alive, a gRPC channel) and can let it go when asked.
type idler interface {
	// closeIdle closes the connections the prober keeps between probes;
	// it never interrupts a probe and may be called from any goroutine.
	closeIdle()
}

// connLimiter caps the connections of all the probes of a Checker (open
// and being dialed: each holds a file descriptor) and bounds every dial by
// the check's timeout. Probes that keep a connection between runs say so
// (idle) and, when the cap is reached, the longest idle give theirs up
// before a dial is refused. Safe for concurrent use.
type connLimiter struct {
	max int64
	n   atomic.Int64 // open or dialing

	mu    sync.Mutex
	idle  list.List               // guarded by mu; of idler, longest idle first
	elems map[idler]*list.Element // guarded by mu
}

func newConnLimiter(max int) *connLimiter {
	return &connLimiter{max: int64(max), elems: make(map[idler]*list.Element)}
}

// inUse is the number of probe connections open or being dialed.
func (l *connLimiter) inUse() int64 { return l.n.Load() }

func (l *connLimiter) acquire() bool {
	for {
		n := l.n.Load()
		if n >= l.max {
			return false
		}
		if l.n.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

func (l *connLimiter) release() { l.n.Add(-1) }

// evictIdle makes room by closing the connections of the longest idle
// probers, a few at most, and reports whether it took a slot. It spares
// self, the prober dialing (a gRPC channel dials in its own goroutines).
func (l *connLimiter) evictIdle(self idler) bool {
	for range 8 {
		l.mu.Lock()
		e := l.idle.Front()
		if e == nil {
			l.mu.Unlock()
			return false
		}
		p := l.idle.Remove(e).(idler)
		delete(l.elems, p)
		l.mu.Unlock()
		if p == self {
			continue // back on the list after its next probe
		}
		p.closeIdle() // outside mu: it closes sockets
		if l.acquire() {
			return true
		}
	}
	return false
}

// markIdle records that p may hold a connection until its next probe.
func (l *connLimiter) markIdle(p idler) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e, ok := l.elems[p]; ok {
		l.idle.MoveToBack(e)
		return
	}
	l.elems[p] = l.idle.PushBack(p)
}

// markBusy takes p off the idle list while it probes (or for good when it
// closes).
func (l *connLimiter) markBusy(p idler) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if e, ok := l.elems[p]; ok {
		l.idle.Remove(e)
		delete(l.elems, p)
	}
}

// dial connects for self (nil for a prober that keeps no connection)
// within timeout (and ctx), or fails at once with a *connLimitError when
// the probe connections are at the limit. The connection gives its slot
// back when closed.
func (l *connLimiter) dial(ctx context.Context, self idler, timeout time.Duration, network, addr string) (net.Conn, error) {
	if !l.acquire() && !l.evictIdle(self) {
		return nil, &connLimitError{max: l.max}
	}
	// Dialer.Timeout bounds the dial even where the caller's context does
	// not: net/http dials on after the request is cancelled (to pool the
	// connection), and a SYN to a dropping host is retried for minutes.
	d := net.Dialer{Timeout: timeout, ControlContext: refuseAddrs}
	conn, err := d.DialContext(ctx, network, addr)
	if err != nil {
		l.release()
		return nil, err
	}
	return &limitedConn{Conn: conn, l: l}, nil
}

// limitedConn gives its slot back on the first Close.
type limitedConn struct {
	net.Conn
	once sync.Once
	l    *connLimiter
}

func (c *limitedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.l.release)
	return err
}

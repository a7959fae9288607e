package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"syscall"
	"time"
)

// upstreams pools the fast path's connections to instances, by address:
// the last one put back is the next one taken (the warmest), at most
// maxIdlePerHost idle per instance, each closed after idleTimeout unused.
type upstreams struct {
	maxIdle     int
	idleTimeout time.Duration

	mu     sync.Mutex
	idle   map[string][]*upConn // guarded by mu
	closed bool                 // guarded by mu
}

// The pool's bounds: beaconhttp.DefaultBase's.
const (
	upstreamMaxIdlePerHost = 100
	upstreamIdleTimeout    = 90 * time.Second
	upstreamDialTimeout    = 30 * time.Second
	upstreamHeadMax        = 1 << 20 // a response head; net/http's transport allows 10 MB
)

func newUpstreams() *upstreams {
	return &upstreams{maxIdle: upstreamMaxIdlePerHost, idleTimeout: upstreamIdleTimeout, idle: map[string][]*upConn{}}
}

// upConn is one connection to an instance.
type upConn struct {
	addr        string
	c           net.Conn
	br          *bufio.Reader
	bufs        [2][]byte       // a request's head and body …
	out         net.Buffers     // … written at once (WriteTo consumes out, not bufs)
	raw         syscall.RawConn // for the liveness peek; nil where there is none
	peek        func(fd uintptr) bool
	quiet       bool // the last peek found nothing to read
	idleSince   time.Time
	head        []byte // the last response head read: the responseHead points into it
	nothingRead bool   // the last round trip failed before a byte came back
}

func (u *upConn) close() { u.c.Close() }

func newUpConn(addr string, c net.Conn) *upConn {
	u := &upConn{addr: addr, c: c, br: bufio.NewReaderSize(c, h1BufSize)}
	if sc, ok := c.(syscall.Conn); ok {
		if raw, err := sc.SyscallConn(); err == nil {
			u.peek = peekFunc(&u.quiet)
			if u.peek != nil {
				u.raw = raw
			}
		}
	}
	return u
}

// usable reports whether an idle connection can carry a request: still
// open, and with nothing unread — not a close the instance sent while it
// sat idle, nor an answer nobody asked for (an idle timeout's 408, bytes
// past a response's end). net/http's transport learns the same from the
// read it keeps pending on every idle connection; here one non-blocking
// peek when the connection is taken does.
func (u *upConn) usable() bool {
	if u.br.Buffered() > 0 {
		return false
	}
	if u.raw == nil {
		return true
	}
	u.quiet = false
	if err := u.raw.Read(u.peek); err != nil {
		return false
	}
	return u.quiet
}

// get returns an idle connection to addr (reused), or dials one, by
// deadline at the latest; fresh skips the idle ones.
func (p *upstreams) get(ctx context.Context, addr string, deadline time.Time, fresh bool) (u *upConn, reused bool, err error) {
	for !fresh {
		p.mu.Lock()
		if conns := p.idle[addr]; len(conns) > 0 {
			u = conns[len(conns)-1]
			conns[len(conns)-1] = nil
			p.idle[addr] = conns[:len(conns)-1]
		}
		p.mu.Unlock()
		if u == nil {
			break
		}
		if u.usable() {
			return u, true, nil
		}
		u.close()
		u = nil
	}
	d := net.Dialer{Timeout: upstreamDialTimeout, Deadline: deadline, KeepAlive: 30 * time.Second}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, false, err
	}
	return newUpConn(addr, c), false, nil
}

// put keeps u for the next request to its instance.
func (p *upstreams) put(u *upConn) {
	u.idleSince = time.Now()
	if u.br.Buffered() > 0 { // more than the response: not to be trusted with another
		u.close()
		return
	}
	p.mu.Lock()
	if p.closed || len(p.idle[u.addr]) >= p.maxIdle {
		p.mu.Unlock()
		u.close()
		return
	}
	p.idle[u.addr] = append(p.idle[u.addr], u)
	p.mu.Unlock()
}

// reap closes the connections idle longer than idleTimeout, and forgets
// instances with none left.
func (p *upstreams) reap(now time.Time) {
	var old []*upConn
	p.mu.Lock()
	for addr, conns := range p.idle {
		keep := conns[:0]
		for _, u := range conns { // oldest first: put appends
			if now.Sub(u.idleSince) > p.idleTimeout {
				old = append(old, u)
			} else {
				keep = append(keep, u)
			}
		}
		clear(conns[len(keep):])
		if len(keep) == 0 {
			delete(p.idle, addr)
		} else {
			p.idle[addr] = keep
		}
	}
	p.mu.Unlock()
	for _, u := range old {
		u.close()
	}
}

// run reaps every half idleTimeout until ctx ends, then closes every idle
// connection and takes no more.
func (p *upstreams) run(ctx context.Context) {
	t := time.NewTicker(p.idleTimeout / 2)
	defer t.Stop()
	for {
		select {
		case now := <-t.C:
			p.reap(now)
		case <-ctx.Done():
			p.mu.Lock()
			p.closed = true
			all := p.idle
			p.idle = map[string][]*upConn{}
			p.mu.Unlock()
			for _, conns := range all {
				for _, u := range conns {
					u.close()
				}
			}
			return
		}
	}
}

// roundTrip writes a request (its head and whole body, one system call)
// and reads the response's final head into resp (1xx interim responses
// are read past). written is how much of the request was written.
func (u *upConn) roundTrip(head, body []byte, resp *responseHead, deadline time.Time) (written int64, err error) {
	u.nothingRead = true
	u.c.SetDeadline(deadline)
	u.bufs = [2][]byte{head, body}
	u.out = u.bufs[:]
	written, err = u.out.WriteTo(u.c)
	if err != nil {
		return written, err
	}
	for {
		if _, err := u.br.Peek(1); err != nil {
			return written, err
		}
		u.nothingRead = false
		u.head, err = readHead(u.br, u.head[:0], upstreamHeadMax)
		if errors.Is(err, errHeadTooLarge) {
			return written, fmt.Errorf("proxy: response head from %s over %d bytes", u.addr, upstreamHeadMax)
		}
		if err != nil {
			return written, err
		}
		if err := parseResponse(u.head, resp); err != nil {
			return written, fmt.Errorf("proxy: %s: %w", u.addr, err)
		}
		switch {
		case resp.status == 101:
			return written, fmt.Errorf("proxy: %s switched protocols unasked", u.addr)
		case resp.status < 200:
			continue // 100 Continue, 103 Early Hints: the final response follows
		}
		return written, nil
	}
}

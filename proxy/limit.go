package proxy

import (
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// limitListener bounds the connections open at once. A connection over
// the bound is answered at once — a 503 that names the limit on plain
// HTTP, a close on TLS — rather than left waiting in the accept queue.
type limitListener struct {
	net.Listener
	sem      chan struct{}
	tls      bool
	field    string
	max      int
	gauge    prometheus.Gauge
	rejected prometheus.Counter
}

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		select {
		case l.sem <- struct{}{}:
			l.gauge.Inc()
			return &limitConn{Conn: c, release: func() { <-l.sem; l.gauge.Dec() }}, nil
		default:
		}
		l.rejected.Inc()
		if !l.tls {
			body := fmt.Sprintf("beacon proxy: too many connections: %d open, the limit (%s)\n", l.max, l.field)
			_ = c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
			_, _ = fmt.Fprintf(c, "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
		}
		c.Close()
	}
}

type limitConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}

// CloseWrite half-closes TCP connections (the TCP proxy's copy).
func (c *limitConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

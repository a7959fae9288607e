package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"beacon.dev/beacon/balancer"
	"beacon.dev/beacon/balancer/leastconn"
	"beacon.dev/beacon/discovery"
	"beacon.dev/beacon/outlier"
)

// tcpProxy forwards each connection to an instance of a service, picked
// by the SDK's balancer (least connections of two random choices, outlier
// ejection, zones). A dial that fails is retried on another instance:
// nothing was sent yet.
type tcpProxy struct {
	cfg    TCPRoute
	ln     net.Listener
	bal    *balancer.Balancer
	sub    *discovery.Subscription
	p      *Proxy
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu    sync.Mutex
	conns map[net.Conn]struct{} // guarded by mu
}

const tcpDialAttempts = 3

func (p *Proxy) newTCP(rc *TCPRoute, field string) (*tcpProxy, error) {
	bal, err := balancer.New(leastconn.Builder{}, balancer.Config{Zone: p.cfg.Load().Zone}, balancer.WithOutlierDetection(outlier.Config{}, outlier.WithName(rc.Service)))
	if err != nil {
		return nil, err
	}
	sub, err := p.cache.Subscribe(rc.Service)
	if err != nil {
		bal.Close()
		return nil, fmt.Errorf("proxy: %s.service: %w", field, err)
	}
	bal.Update(sub.Endpoints())
	ln, err := p.listen(rc.Name, rc.Addr, rc.MaxConnections, true, field+".maxConnections")
	if err != nil {
		sub.Close()
		bal.Close()
		return nil, err
	}
	t := &tcpProxy{cfg: *rc, ln: ln, bal: bal, sub: sub, p: p, conns: map[net.Conn]struct{}{}}
	t.ctx, t.cancel = context.WithCancel(context.Background())
	t.wg.Add(1)
	go func() { defer t.wg.Done(); _ = bal.Run(t.ctx, sub) }() // ends with close
	return t, nil
}

// serve accepts until close. An accept that fails for another reason (out
// of file descriptors) is tried again after a pause, as net/http does.
func (t *tcpProxy) serve() {
	var pause time.Duration
	for {
		c, err := t.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || t.ctx.Err() != nil {
				return
			}
			pause = min(max(2*pause, 5*time.Millisecond), time.Second)
			t.p.log.Warn("beacon proxy: accept failed; trying again", "route", t.cfg.Name, "err", err, "in", pause)
			select {
			case <-t.ctx.Done():
				return
			case <-time.After(pause):
			}
			continue
		}
		pause = 0
		// Counted under mu, so that close (which cancels under mu before
		// it waits) never waits while a handler is being added.
		t.mu.Lock()
		if t.ctx.Err() != nil {
			t.mu.Unlock()
			c.Close()
			return
		}
		t.wg.Add(1)
		t.mu.Unlock()
		go func() { defer t.wg.Done(); t.handle(c) }() // ends with its connection; close ends those
	}
}

func (t *tcpProxy) track(c net.Conn, add bool) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if add {
		if t.ctx.Err() != nil {
			return false
		}
		t.conns[c] = struct{}{}
	} else {
		delete(t.conns, c)
	}
	return true
}

func (t *tcpProxy) handle(c net.Conn) {
	defer c.Close()
	if !t.track(c, true) {
		return
	}
	defer t.track(c, false)
	result := t.p.m.tcp.WithLabelValues(t.cfg.Name, t.cfg.Service, "failed")
	var tried string
	for range tcpDialAttempts {
		pk, err := t.bal.Pick(balancer.PickInfo{Avoid: tried})
		if err != nil {
			result.Inc()
			return
		}
		tried = pk.ID
		ctx, cancel := context.WithTimeout(t.ctx, time.Duration(t.cfg.ConnectTimeout))
		up, err := (&net.Dialer{}).DialContext(ctx, "tcp", pk.Addr)
		cancel()
		if err != nil {
			pk.Done(err)
			continue
		}
		if !t.track(up, true) {
			up.Close()
			pk.Done(nil)
			return
		}
		t.p.m.tcp.WithLabelValues(t.cfg.Name, t.cfg.Service, "proxied").Inc()
		pipe(c, up, time.Duration(t.cfg.IdleTimeout))
		t.track(up, false)
		pk.Done(nil)
		return
	}
	result.Inc()
}

// pipe copies both ways, half-closing each side when the other is done,
// and returns once both directions ended. A read in either direction
// pushes both connections' deadlines (reads and writes) idle further: a
// connection quiet both ways for idle — or whose reader stopped reading —
// is closed. A direction that ends in an error (not EOF) closes both.
func pipe(a, b net.Conn, idle time.Duration) {
	alive := func() {
		at := time.Now().Add(idle)
		_ = a.SetDeadline(at)
		_ = b.SetDeadline(at)
	}
	alive()
	copyTo := func(dst, src net.Conn) {
		buf := copyBuffers.Get()
		defer copyBuffers.Put(buf)
		// writerOnly hides dst's ReadFrom, which would copy through a
		// buffer of its own (no splice from a wrapped reader anyway).
		if _, err := io.CopyBuffer(writerOnly{dst}, &activeReader{src, alive}, buf); err != nil {
			a.Close() // the other direction's Read or Write ends too
			b.Close()
			return
		}
		closeWrite(dst)
	}
	done := make(chan struct{})
	go func() { // owned by pipe: it waits for it
		defer close(done)
		copyTo(b, a)
	}()
	copyTo(a, b)
	<-done
	a.Close()
	b.Close()
}

type writerOnly struct{ io.Writer }

// activeReader reports every read that returned data.
type activeReader struct {
	c     net.Conn
	alive func()
}

func (r *activeReader) Read(p []byte) (int, error) {
	n, err := r.c.Read(p)
	if n > 0 {
		r.alive()
	}
	return n, err
}

func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
		return
	}
	c.Close()
}

// close stops accepting, closes the open connections and waits for their
// goroutines.
func (t *tcpProxy) close() {
	t.ln.Close()
	t.mu.Lock()
	t.cancel()
	for c := range t.conns {
		c.Close()
	}
	t.mu.Unlock()
	t.wg.Wait()
	t.sub.Close()
	t.bal.Close()
}

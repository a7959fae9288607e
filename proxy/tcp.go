package proxy

import (
	"context"
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

// serve accepts until close.
func (t *tcpProxy) serve() {
	for {
		c, err := t.ln.Accept()
		if err != nil {
			return
		}
		t.wg.Add(1)
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
// pushes both read deadlines idle further: a connection quiet both ways
// for idle is closed.
func pipe(a, b net.Conn, idle time.Duration) {
	alive := func() {
		at := time.Now().Add(idle)
		_ = a.SetReadDeadline(at)
		_ = b.SetReadDeadline(at)
	}
	alive()
	done := make(chan struct{})
	go func() { // owned by pipe: it waits for it
		defer close(done)
		_, _ = io.Copy(b, &activeReader{a, alive})
		closeWrite(b)
	}()
	_, _ = io.Copy(a, &activeReader{b, alive})
	closeWrite(a)
	<-done
	a.Close()
	b.Close()
}

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

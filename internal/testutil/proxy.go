package testutil

import (
	"net"
	"sync"
	"testing"
)

// Proxy forwards TCP connections to a target and can cut them all at once,
// as a network failure would.
type Proxy struct {
	target string
	ln     net.Listener

	mu    sync.Mutex
	conns map[net.Conn]struct{} // guarded by mu
	down  bool                  // guarded by mu
	// frozen stops forwarding from the target to clients, as a client
	// process that stopped reading would; guarded by mu.
	frozen bool
	thaw   *sync.Cond
	wg     sync.WaitGroup
}

// NewProxy listens on a loopback port and forwards to target. It is closed
// when the test ends.
func NewProxy(t testing.TB, target string) *Proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("NewProxy: %v", err)
	}
	p := &Proxy{target: target, ln: ln, conns: make(map[net.Conn]struct{})}
	p.thaw = sync.NewCond(&p.mu)
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.Close)
	return p
}

// Addr is where clients connect.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		down := p.down
		p.mu.Unlock()
		if down {
			c.Close()
			continue
		}
		up, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		// A small fixed receive buffer (no autotuning) makes a frozen
		// proxy push back on the target within a few hundred KiB.
		_ = up.(*net.TCPConn).SetReadBuffer(64 << 10)
		p.mu.Lock()
		p.conns[c], p.conns[up] = struct{}{}, struct{}{}
		p.mu.Unlock()
		p.wg.Add(2)
		go p.pipe(c, up, true)
		go p.pipe(up, c, false)
	}
}

func (p *Proxy) pipe(dst, src net.Conn, toClient bool) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if toClient {
			// Checked after the read, which may have been waiting when
			// Freeze was called: nothing reaches the client once frozen.
			p.mu.Lock()
			for p.frozen {
				p.thaw.Wait()
			}
			p.mu.Unlock()
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				break
			}
		}
		if err != nil {
			break
		}
	}
	dst.Close()
	src.Close()
	p.mu.Lock()
	delete(p.conns, dst)
	delete(p.conns, src)
	p.mu.Unlock()
}

// Cut closes every open connection; new ones are accepted.
func (p *Proxy) Cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		c.Close()
	}
}

// SetDown cuts every connection and refuses new ones until SetDown(false),
// like a network partition.
func (p *Proxy) SetDown(down bool) {
	p.mu.Lock()
	p.down = down
	p.mu.Unlock()
	if down {
		p.Cut()
	}
}

// Freeze stops passing data from the target to clients (TCP back-pressure
// then stalls the target's writes), until Freeze(false).
func (p *Proxy) Freeze(frozen bool) {
	p.mu.Lock()
	p.frozen = frozen
	p.mu.Unlock()
	p.thaw.Broadcast()
}

// Close stops accepting, cuts everything and waits for the copiers.
func (p *Proxy) Close() {
	p.Freeze(false)
	p.ln.Close()
	p.Cut()
	p.wg.Wait()
}

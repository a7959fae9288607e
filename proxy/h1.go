package proxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime/debug"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"beacon.dev/beacon/balancer"
	"beacon.dev/beacon/beaconhttp"
	"beacon.dev/beacon/policy"
)

// The HTTP/1.1 fast path (docs/proxy.md): a plain listener's connections
// are served here, request by request, straight from their bytes to an
// instance's pooled connection and back — no *http.Request, no goroutines
// per connection beyond its own, and one read and one write each way per
// request. What it does not serve (see the hand-off reasons) goes, with
// its connection and the bytes already read, to the listener's net/http
// server, which serves the rest of that connection as it always did.

// fastBodyMax is the largest request body the fast path takes; it reads
// it whole before the first attempt, so that every retry can resend it.
// A larger one is streamed by net/http (and retried only within
// beaconhttp's replay bound).
const fastBodyMax = 64 << 10

// fastHeadMax bounds a request head on the fast path; a larger one (up to
// the listener's maxHeaderBytes) is net/http's.
const fastHeadMax = 64 << 10

// h1Server serves one listener's connections.
type h1Server struct {
	p       *Proxy
	lim     Limits
	handoff *handoffListener // the listener's net/http server accepts from it

	closing atomic.Bool // shutdown began
	// ctx is the requests' context: cancelled when a shutdown runs out
	// of time, so that a dial or a retry's wait ends with it.
	ctx    context.Context
	cancel context.CancelFunc
	mu     sync.Mutex
	conns  map[*h1Conn]struct{} // guarded by mu
	wg     sync.WaitGroup
}

func newH1Server(p *Proxy, lim Limits, addr net.Addr) *h1Server {
	s := &h1Server{p: p, lim: lim, handoff: newHandoffListener(addr), conns: map[*h1Conn]struct{}{}}
	s.ctx, s.cancel = context.WithCancel(p.stopping)
	return s
}

// serve accepts from ln until it is closed.
func (s *h1Server) serve(ln net.Listener) error {
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if te, ok := err.(interface{ Temporary() bool }); ok && te.Temporary() { // EMFILE and the like: back off, as net/http does
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				time.Sleep(delay)
				continue
			}
			return err
		}
		delay = 0
		fc := &h1Conn{s: s, c: c}
		s.mu.Lock()
		if s.closing.Load() {
			s.mu.Unlock()
			c.Close()
			continue
		}
		s.conns[fc] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go fc.serve() // owned by s: shutdown closes it, wg waits
	}
}

// shutdown stops serving gracefully: connections between requests (idle,
// or still reading a head) close at once, the others after their
// request; once ctx ends, every connection is closed and every request's
// context cancelled. The listener must be closed first.
func (s *h1Server) shutdown(ctx context.Context) error {
	defer s.cancel()
	s.mu.Lock()
	s.closing.Store(true)
	for fc := range s.conns {
		fc.wakeIfIdle()
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }() // ends when the connections do, which the close below forces
	select {
	case <-done:
		return nil
	case <-ctx.Done():
	}
	s.cancel()
	s.mu.Lock()
	for fc := range s.conns {
		fc.abort()
	}
	s.mu.Unlock()
	<-done
	return ctx.Err()
}

// h1Conn is one client connection and its request's state, reused from
// request to request.
type h1Conn struct {
	s  *h1Server
	c  net.Conn
	br *bufio.Reader
	bw *bufio.Writer

	idle atomic.Bool // between requests: waiting for one, or reading its head

	raw  []byte // the request head as read
	req  requestHead
	out  []byte // the head sent to the instance
	body []byte

	// The current request's attempts (attempt, a method value made once).
	attemptFn  beaconhttp.Attempt
	ctx        deadlineContext // the proxy's, with the route's deadline
	r          *route
	isHead     bool
	idem       bool
	start      time.Time
	deadline   time.Time // the route's timeout
	attempts   int
	upMu       sync.Mutex // guards up against abort
	up         *upConn    // the instance connection holding the response
	resp       responseHead
	aborted    bool // guarded by upMu
	clientAddr string
}

const (
	h1BufSize = 4 << 10
)

// wakeIfIdle ends the wait for a next request, or the reading of its
// head (shutdown): no request has started there.
func (fc *h1Conn) wakeIfIdle() {
	if fc.idle.Load() {
		fc.c.SetReadDeadline(time.Unix(1, 0))
	}
}

// abort closes the connection and any instance connection it holds.
func (fc *h1Conn) abort() {
	fc.c.Close()
	fc.upMu.Lock()
	fc.aborted = true
	if fc.up != nil {
		fc.up.c.Close()
	}
	fc.upMu.Unlock()
}

func (fc *h1Conn) setUp(u *upConn) bool {
	fc.upMu.Lock()
	defer fc.upMu.Unlock()
	if fc.aborted {
		return false
	}
	fc.up = u
	return true
}

// takeUp returns the held instance connection and forgets it.
func (fc *h1Conn) takeUp() *upConn {
	fc.upMu.Lock()
	u := fc.up
	fc.up = nil
	fc.upMu.Unlock()
	return u
}

func (fc *h1Conn) serve() {
	s := fc.s
	handedOff := false
	defer func() {
		if v := recover(); v != nil { // as net/http: one connection's bug is not the process's end
			s.p.log.Error("beacon proxy: panic serving a connection", "remote", fc.c.RemoteAddr().String(), "panic", v, "stack", string(debug.Stack()))
			handedOff = false
		}
		if u := fc.takeUp(); u != nil {
			u.close()
		}
		if !handedOff {
			fc.bw.Flush() // answers to pipelined requests still buffered
			fc.c.Close()
		}
		s.mu.Lock()
		delete(s.conns, fc)
		s.mu.Unlock()
		s.wg.Done()
	}()
	fc.br = bufio.NewReaderSize(fc.c, h1BufSize)
	fc.bw = bufio.NewWriterSize(fc.c, h1BufSize)
	fc.attemptFn = fc.attempt
	fc.ctx.Context = s.ctx
	if host, _, err := net.SplitHostPort(fc.c.RemoteAddr().String()); err == nil {
		fc.clientAddr = host
	}
	headMax := min(s.lim.MaxHeaderBytes, fastHeadMax)
	for {
		// Wait for the next request's first byte, idle. The deadline is
		// set before the flag, so that a shutdown that sees the flag
		// overrides it.
		if d := time.Duration(s.lim.IdleTimeout); d > 0 {
			fc.c.SetReadDeadline(time.Now().Add(d))
		} else {
			fc.c.SetReadDeadline(time.Time{})
		}
		fc.idle.Store(true)
		if s.isClosing() {
			return
		}
		if _, err := fc.br.Peek(1); err != nil {
			return
		}
		if fc.skipEmptyLines() {
			continue // only line ends so far: still waiting for a request
		}
		if d := time.Duration(s.lim.ReadHeaderTimeout); d > 0 {
			fc.c.SetReadDeadline(time.Now().Add(d))
		}
		if s.isClosing() {
			return // as net/http's Shutdown does with an idle connection
		}
		var err error
		fc.raw, err = readHead(fc.br, fc.raw[:0], headMax)
		fc.idle.Store(false)
		reason := ""
		switch {
		case errors.Is(err, errHeadTooLarge):
			reason = handoffHeadSize
		case err != nil:
			return // the client went away, or took too long
		default:
			reason = parseRequest(fc.raw, &fc.req)
		}
		if reason == "" {
			var keep bool
			keep, reason = fc.serveRequest()
			if reason == "" {
				if !keep {
					fc.bw.Flush()
					return
				}
				if !fc.headBuffered() { // no whole pipelined request waiting: send now
					if fc.bw.Flush() != nil {
						return
					}
				}
				fc.shrink()
				continue
			}
		}
		// net/http takes the connection from here, with what was read.
		if fc.bw.Flush() != nil {
			return
		}
		s.p.m.handoffs.WithLabelValues(reason).Inc()
		handedOff = true
		s.handoff.push(fc.replay())
		return
	}
}

func (s *h1Server) isClosing() bool { return s.closing.Load() }

// skipEmptyLines drops the empty lines a client may send between
// requests (RFC 9112 §2.2; net/http skips them too) and reports whether
// that was all the reader held.
func (fc *h1Conn) skipEmptyLines() bool {
	for fc.br.Buffered() > 0 {
		b, _ := fc.br.Peek(1)
		if b[0] != '\r' && b[0] != '\n' {
			return false
		}
		fc.br.Discard(1)
	}
	return true
}

// headBuffered reports whether the reader holds a whole request head:
// answering it will not wait for the client.
func (fc *h1Conn) headBuffered() bool {
	b, _ := fc.br.Peek(fc.br.Buffered())
	return bytes.Contains(b, []byte("\r\n\r\n"))
}

// shrink lets go of buffers a large request grew.
func (fc *h1Conn) shrink() {
	if cap(fc.raw) > 16<<10 {
		fc.raw = nil
	}
	if cap(fc.body) > 16<<10 {
		fc.body = nil
	}
}

// replay is the connection as net/http is to see it: the head read so far,
// then what the reader holds, then the connection.
func (fc *h1Conn) replay() net.Conn {
	buffered, _ := fc.br.Peek(fc.br.Buffered())
	pending := make([]byte, 0, len(fc.raw)+len(buffered))
	pending = append(append(pending, fc.raw...), buffered...)
	fc.c.SetReadDeadline(time.Time{})
	return &replayConn{Conn: fc.c, pending: pending}
}

// serveRequest serves the parsed request. It returns a hand-off reason
// when the request is net/http's after all (nothing was read past its
// head then), else whether the connection stays open.
func (fc *h1Conn) serveRequest() (keep bool, reason string) {
	p := fc.s.p
	h := &fc.req
	if h.contentLength > fastBodyMax {
		return false, handoffBodySize
	}
	fc.start = time.Now()
	fc.isHead = string(h.method) == http.MethodHead
	t := p.acquire()
	if t == nil {
		fc.writeError(http.StatusServiceUnavailable, "beacon proxy: closing", true)
		return false, ""
	}
	defer t.release()
	host := h.host
	if i := hostPortSplit(host); i >= 0 {
		host = host[:i]
	}
	var r *route
	for _, c := range t.routes {
		if c.matchesRaw(host, h) {
			r = c
			break
		}
	}
	if r != nil && !r.fast {
		return false, handoffRoute
	}
	if r != nil && r.cfg.StripPrefix && bytes.ContainsAny(h.path, "!'()*") {
		return false, handoffTarget // net/http re-escapes a path it rewrote: its to send
	}
	fc.r = r
	if d := time.Duration(fc.s.lim.WriteTimeout); d > 0 {
		fc.c.SetWriteDeadline(fc.start.Add(d))
	}
	keep = !h.close
	if r == nil {
		keep = fc.discardBody() && keep
		n := fc.writeError(http.StatusNotFound, "beacon proxy: no route matches this request", !keep)
		p.m.unrouted.Inc()
		fc.log(http.StatusNotFound, n, "", "", -1, nil)
		return keep, ""
	}
	if lim := fc.s.lim.MaxBodyBytes; lim > 0 && h.contentLength > lim {
		n := fc.writeError(http.StatusRequestEntityTooLarge, fmt.Sprintf("beacon proxy: request body of %d bytes is over the listener's limit (limits.maxBodyBytes %d)", h.contentLength, lim), true)
		r.rm.done(http.StatusRequestEntityTooLarge, time.Since(fc.start), 0)
		fc.log(http.StatusRequestEntityTooLarge, n, r.cfg.Name, r.cfg.Service, -1, nil)
		return false, ""
	}
	fc.deadline = fc.start.Add(time.Duration(r.cfg.Timeout))
	if err := fc.readBody(); err != nil { // the client went away or stalled: nobody to answer
		r.rm.done(499, time.Since(fc.start), 0)
		fc.log(499, 0, r.cfg.Name, r.cfg.Service, -1, fmt.Errorf("reading the request body: %w", err))
		return false, ""
	}
	fc.buildOutHead(r)
	fc.idem = h.idempotencyKey || idempotentMethod(h.method)
	fc.attempts = 0
	if fc.bw.Buffered() > 0 { // answers to earlier pipelined requests: no reason to hold them
		if fc.bw.Flush() != nil {
			return false, ""
		}
	}
	fc.ctx.deadline = fc.deadline
	status, release, err := r.tr.Call(&fc.ctx, r.cfg.Service, fc.idem, fc.attemptFn)
	defer release()
	if err == nil && status == 0 {
		err = errors.New("no response from the instances") // a fallback policy answered (none is configured today)
	}
	if err != nil {
		if u := fc.takeUp(); u != nil { // a retried response that was not handed on
			u.close()
		}
		code, err := errorStatus(err)
		n := fc.writeError(code, "beacon proxy: "+err.Error(), !keep)
		r.rm.done(code, time.Since(fc.start), fc.attempts)
		fc.log(code, n, r.cfg.Name, r.cfg.Service, fc.attempts, err)
		return keep, ""
	}
	n, clientOK, upKept := fc.writeResponse(keep)
	u := fc.takeUp()
	if upKept {
		p.upstreams.put(u)
	} else {
		u.close()
	}
	r.rm.done(fc.resp.status, time.Since(fc.start), fc.attempts)
	fc.log(fc.resp.status, n, r.cfg.Name, r.cfg.Service, fc.attempts, nil)
	return keep && clientOK, ""
}

// deadlineContext is the proxy's context with a request's deadline, so
// that the retry policy sees it (no retry starts that could not end in
// time) without a timer per request: the fast path's I/O is bounded by
// the connections' deadlines.
type deadlineContext struct {
	context.Context
	deadline time.Time
}

func (c *deadlineContext) Deadline() (time.Time, bool) { return c.deadline, true }

// hostPortSplit is the index of the port's colon in a Host, or -1.
func hostPortSplit(host []byte) int {
	for i := len(host) - 1; i >= 0; i-- {
		switch host[i] {
		case ':':
			return i
		case ']':
			return -1
		}
	}
	return -1
}

func idempotentMethod(m []byte) bool {
	switch string(m) {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace, http.MethodPut, http.MethodDelete:
		return true
	}
	return false
}

// readBody reads the request's body whole, within the route's timeout.
func (fc *h1Conn) readBody() error {
	n := int(fc.req.contentLength)
	if n <= 0 {
		fc.body = fc.body[:0]
		return nil
	}
	if cap(fc.body) < n {
		fc.body = make([]byte, n)
	}
	fc.body = fc.body[:n]
	fc.c.SetReadDeadline(fc.deadline)
	_, err := io.ReadFull(fc.br, fc.body)
	return err
}

// discardBody skips the body of a request that is not sent anywhere.
func (fc *h1Conn) discardBody() bool {
	if n := fc.req.contentLength; n > 0 {
		fc.c.SetReadDeadline(time.Now().Add(time.Duration(fc.s.lim.ReadHeaderTimeout)))
		_, err := fc.br.Discard(int(n))
		return err == nil
	}
	return true
}

// buildOutHead writes the head sent to the instances: the request line
// (the route's prefix stripped), the client's headers but the hop-by-hop
// ones, and X-Forwarded-For, -Host and -Proto, as the net/http path's
// httputil.ProxyRequest.SetXForwarded does.
func (fc *h1Conn) buildOutHead(r *route) {
	h := &fc.req
	out := append(fc.out[:0], h.method...)
	out = append(out, ' ')
	target := h.target
	if r.cfg.StripPrefix { // as the net/http path: "/" + the rest without one leading "/"
		rest := target[len(r.cfg.Match.PathPrefix):]
		if len(rest) > 0 && rest[0] == '/' {
			rest = rest[1:]
		}
		out = append(out, '/')
		target = rest
	}
	out = append(out, target...)
	out = append(out, " HTTP/1.1\r\n"...)
	for _, hd := range h.headers {
		if !hopByHop(hd.name, h.hop, true) {
			out = append(out, hd.line...)
		}
	}
	if h.teTrailers { // the one TE that passes, as ReverseProxy's
		out = append(out, "Te: trailers\r\n"...)
	}
	if fc.clientAddr != "" {
		out = append(out, "X-Forwarded-For: "...)
		out = append(append(out, fc.clientAddr...), "\r\n"...)
	}
	out = append(out, "X-Forwarded-Host: "...)
	out = append(append(out, h.host...), "\r\n"...)
	out = append(out, "X-Forwarded-Proto: http\r\n\r\n"...)
	fc.out = out
}

// attempt sends the request to ep and reads the response head; the
// response is left in fc.resp with its connection in fc.up.
func (fc *h1Conn) attempt(ctx context.Context, ep balancer.Pick) (int, error) {
	p := fc.s.p
	if u := fc.takeUp(); u != nil { // the previous attempt's response, retried
		u.close()
	}
	fc.attempts++
	headDL, perTry := fc.deadline, false
	if d := time.Duration(fc.r.cfg.PerTryTimeout); d > 0 {
		if t := time.Now().Add(d); t.Before(headDL) {
			headDL, perTry = t, true
		}
	}
	if !time.Now().Before(fc.deadline) {
		return 0, beaconhttp.Local(fc.routeTimeout())
	}
	for fresh := false; ; fresh = true {
		u, reused, err := p.upstreams.get(ctx, ep.Addr, headDL, fresh)
		if err != nil {
			return 0, fc.attemptError(err, perTry, headDL)
		}
		if !fc.setUp(u) {
			u.close()
			return 0, beaconhttp.Local(errors.New("proxy: closing"))
		}
		written, err := u.roundTrip(fc.out, fc.body, &fc.resp, headDL)
		if err == nil {
			u.c.SetReadDeadline(fc.deadline) // the body: within the route's timeout
			return fc.resp.status, nil
		}
		fc.takeUp()
		u.close()
		// A pooled connection the instance closed as it was taken: the
		// request did not reach it (nothing came back). Like net/http's
		// transport, send again on a new connection when that is safe:
		// an idempotent request, or one not a byte of which was written.
		if reused && !fresh && u.nothingRead && (fc.idem || written == 0) && time.Now().Before(headDL) {
			continue
		}
		return 0, fc.attemptError(err, perTry, headDL)
	}
}

// attemptError classifies an attempt's failure. A timeout at the
// attempt's bound is the per-try timeout (retried elsewhere) or the
// route's (the end); other timeouts (a dial's, a keepalive probe's) are
// the instance's, as any other failure.
func (fc *h1Conn) attemptError(err error, perTry bool, headDL time.Time) error {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() && !time.Now().Before(headDL) {
		if perTry {
			return policy.Retryable(errPerTry{time.Duration(fc.r.cfg.PerTryTimeout)})
		}
		return policy.Permanent(fc.routeTimeout())
	}
	return beaconhttp.Classify(err, true)
}

func (fc *h1Conn) routeTimeout() error {
	return fmt.Errorf("proxy: route timeout %v: %w", time.Duration(fc.r.cfg.Timeout), context.DeadlineExceeded)
}

// writeResponse sends the instance's response to the client: its head
// without the hop-by-hop headers, then its body as it came. It reports
// the body bytes written, whether the client connection can serve
// another request, and whether the instance connection can.
func (fc *h1Conn) writeResponse(keep bool) (n int64, clientOK, upKept bool) {
	u, h := fc.up, &fc.resp
	kind := h.body(fc.isHead)
	bw := fc.bw
	bw.WriteString("HTTP/1.1") // an HTTP/1.0 instance's answer too: the client's connection is 1.1
	bw.Write(h.statusLine[8:])
	for _, hd := range h.headers {
		// Trailer stays: the trailers it announces follow, in the chunked
		// body passed on as it came.
		if !hopByHop(hd.name, h.hop, false) || headerIs(hd.name, "trailer") {
			bw.Write(hd.line)
		}
	}
	switch {
	case kind == bodyChunked:
		bw.WriteString("Transfer-Encoding: chunked\r\n")
	case kind == bodyUntilClose:
		keep = false // the body ends when the connection does
	}
	if !keep || fc.s.isClosing() {
		keep = false
		bw.WriteString("Connection: close\r\n")
	}
	bw.WriteString("\r\n")
	var err error
	switch kind {
	case bodyLength:
		n, err = copyN(bw, u.br, h.contentLength, false)
	case bodyChunked:
		n, err = copyChunked(bw, u.br)
	case bodyUntilClose:
		n, err = copyUntilClose(bw, u.br)
	}
	if err != nil {
		return n, false, false
	}
	upKept = kind != bodyUntilClose && !h.close
	if upKept {
		u.c.SetReadDeadline(time.Time{})
	}
	return n, keep, upKept
}

// errUpstreamBody: the instance's side of a body failed mid-way.
var errUpstreamBody = errors.New("proxy: instance's response body failed")

// A body of unknown length — chunked, or up to the close — is a stream
// (server-sent events, a long poll): what came is flushed to the client
// before each wait for more, as httputil.ReverseProxy does. A body of a
// known length is flushed when the buffer fills or the response ends.

// copyN copies n bytes from the instance's reader, without allocating;
// stream flushes before each wait.
func copyN(dst *bufio.Writer, src *bufio.Reader, n int64, stream bool) (int64, error) {
	var done int64
	for done < n {
		if src.Buffered() == 0 {
			if stream {
				if err := dst.Flush(); err != nil {
					return done, err
				}
			}
			if _, err := src.Peek(1); err != nil {
				return done, err
			}
		}
		b, _ := src.Peek(int(min(int64(src.Buffered()), n-done)))
		if _, err := dst.Write(b); err != nil {
			return done, err
		}
		src.Discard(len(b))
		done += int64(len(b))
	}
	return done, nil
}

// copyChunked copies a chunked body as it is, chunk sizes and trailers
// included, reading the sizes to know where it ends.
func copyChunked(dst *bufio.Writer, src *bufio.Reader) (int64, error) {
	var total int64
	for {
		if err := flushUnlessLine(dst, src); err != nil {
			return total, err
		}
		line, err := src.ReadSlice('\n')
		if err != nil {
			return total, err
		}
		size, ok := chunkSize(line)
		if !ok {
			return total, errUpstreamBody
		}
		dst.Write(line)
		if size == 0 {
			for { // trailers, then the empty line
				if err := flushUnlessLine(dst, src); err != nil {
					return total, err
				}
				line, err := src.ReadSlice('\n')
				if err != nil {
					return total, err
				}
				if len(line) == 2 && line[0] == '\r' {
					dst.Write(line)
					return total, nil
				}
				if len(line) < 2 || line[len(line)-2] != '\r' {
					return total, errUpstreamBody
				}
				if _, ok := parseHeader(line); !ok {
					return total, errUpstreamBody
				}
				dst.Write(line)
			}
		}
		n, err := copyN(dst, src, size, true)
		total += n
		if err != nil {
			return total, err
		}
		if src.Buffered() < 2 {
			if err := dst.Flush(); err != nil {
				return total, err
			}
		}
		crlf, err := src.Peek(2)
		if err != nil || crlf[0] != '\r' || crlf[1] != '\n' {
			return total, errUpstreamBody
		}
		dst.Write(crlf)
		src.Discard(2)
	}
}

// flushUnlessLine flushes dst unless src holds a whole line: reading
// the next one will not wait.
func flushUnlessLine(dst *bufio.Writer, src *bufio.Reader) error {
	b, _ := src.Peek(src.Buffered())
	if bytes.IndexByte(b, '\n') >= 0 {
		return nil
	}
	return dst.Flush()
}

// copyUntilClose copies a body that ends when the instance closes.
func copyUntilClose(dst *bufio.Writer, src *bufio.Reader) (int64, error) {
	var total int64
	for {
		if src.Buffered() == 0 {
			if err := dst.Flush(); err != nil {
				return total, err
			}
			if _, err := src.Peek(1); err == io.EOF {
				return total, nil
			} else if err != nil {
				return total, err
			}
		}
		b, _ := src.Peek(src.Buffered())
		if _, err := dst.Write(b); err != nil {
			return total, err
		}
		src.Discard(len(b))
		total += int64(len(b))
	}
}

// chunkSize parses a chunk-size line (hex digits, extensions after ';').
func chunkSize(line []byte) (int64, bool) {
	if len(line) < 3 || line[len(line)-2] != '\r' {
		return 0, false
	}
	for _, c := range line[:len(line)-2] {
		if c < ' ' && c != '\t' || c == 0x7f {
			return 0, false // a CR, a NUL: net/http refuses those too
		}
	}
	var n int64
	digits := 0
	for i, c := range line[:len(line)-2] {
		var d byte
		switch {
		case '0' <= c && c <= '9':
			d = c - '0'
		case 'a' <= c && c <= 'f':
			d = c - 'a' + 10
		case 'A' <= c && c <= 'F':
			d = c - 'A' + 10
		case c == ';':
			return n, digits > 0
		case c == ' ' || c == '\t': // whitespace, then an extension or the end
			rest := bytes.TrimLeft(line[:len(line)-2][i:], " \t")
			return n, digits > 0 && (len(rest) == 0 || rest[0] == ';')
		default:
			return 0, false
		}
		if digits++; digits > 15 {
			return 0, false
		}
		n = n<<4 | int64(d)
	}
	return n, digits > 0
}

// writeError answers the request with a plain text error, as
// http.Error, and returns the body's length (none for a HEAD request).
func (fc *h1Conn) writeError(code int, msg string, closeConn bool) int64 {
	bw := fc.bw
	bw.WriteString("HTTP/1.1 ")
	bw.WriteString(strconv.Itoa(code))
	bw.WriteByte(' ')
	bw.WriteString(http.StatusText(code))
	bw.WriteString("\r\nContent-Type: text/plain; charset=utf-8\r\nX-Content-Type-Options: nosniff\r\n")
	if closeConn || fc.s.isClosing() {
		bw.WriteString("Connection: close\r\n")
	}
	bw.WriteString("Content-Length: ")
	bw.WriteString(strconv.Itoa(len(msg) + 1))
	bw.WriteString("\r\n\r\n")
	if fc.isHead {
		return 0
	}
	bw.WriteString(msg)
	bw.WriteByte('\n')
	return int64(len(msg) + 1)
}

// log writes the request's access log line, if there is an access log;
// attempts < 0: the request was sent nowhere.
func (fc *h1Conn) log(status int, n int64, route, service string, attempts int, err error) {
	a := fc.s.p.access
	if a == nil {
		return
	}
	h := &fc.req
	a.write(&accessEntry{remote: fc.c.RemoteAddr().String(), method: string(h.method), host: string(h.host),
		path: string(h.path), proto: "HTTP/1.1", status: status, bytes: n, userAgent: string(h.userAgent)},
		route, service, fc.start, attempts, err)
}

// replayConn is a handed-off connection: the bytes the fast path read,
// then the connection's own.
type replayConn struct {
	net.Conn
	pending []byte
}

func (c *replayConn) Read(b []byte) (int, error) {
	if len(c.pending) > 0 {
		n := copy(b, c.pending)
		c.pending = c.pending[n:]
		return n, nil
	}
	return c.Conn.Read(b)
}

// CloseWrite half-closes the connection (upgraded connections' copy).
func (c *replayConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// handoffListener is what a fast-path listener's net/http server accepts
// from: the connections the fast path hands over.
type handoffListener struct {
	addr net.Addr
	ch   chan net.Conn
	done chan struct{}
	once sync.Once
}

func newHandoffListener(addr net.Addr) *handoffListener {
	return &handoffListener{addr: addr, ch: make(chan net.Conn), done: make(chan struct{})}
}

// push hands c over, or closes it once the server stopped.
func (l *handoffListener) push(c net.Conn) {
	select {
	case l.ch <- c:
	case <-l.done:
		c.Close()
	}
}

func (l *handoffListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *handoffListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *handoffListener) Addr() net.Addr { return l.addr }

package server

import (
	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"

	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
)

// This file guards the HTTP side of the API against careless and hostile
// clients: nothing is served before the server is ready (the port is
// open from the first moment so that /readyz can say so), a request body
// is refused as soon as it passes --max-request-bytes (compressed or
// not), and every write to a client is bounded in time, so a client that
// stops reading loses its call instead of holding the server's memory.

// errNotReady is what every API call gets while etcd starts.
var errNotReady = errors.New("server: not ready yet (etcd is starting or the view is loading); see /readyz")

// guardAPI wraps the API's handlers (connect and /v1/watch).
func (s *Server) guardAPI(next http.Handler) http.Handler {
	errw := connect.NewErrorWriter()
	max := s.cfg.Limits.MaxRequestBytes
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-s.ready:
		default:
			if errw.IsSupported(r) {
				_ = errw.Write(w, r, connect.NewError(connect.CodeUnavailable, errNotReady))
			} else {
				http.Error(w, errNotReady.Error(), http.StatusServiceUnavailable)
			}
			return
		}
		id, err := s.authenticate(r)
		if err != nil {
			s.audit.auditUnauthenticated(r.RemoteAddr, r.URL.Path, err)
			if errw.IsSupported(r) {
				_ = errw.Write(w, r, err)
			} else {
				writeConnectErrorAsHTTP(w, err)
			}
			return
		}
		r = r.WithContext(s.withRecheck(context.WithValue(r.Context(), identityKey{}, id), r))
		dw, served := s.writes.wrap(w)
		defer served()
		w = dw
		ct := strings.ToLower(r.Header.Get("Content-Type")) // as connect compares it
		switch {
		case r.Method != http.MethodPost:
		case strings.HasPrefix(ct, "application/grpc") || strings.HasPrefix(ct, "application/connect+"):
			// Enveloped messages (gRPC, Connect streaming): refuse an
			// envelope that announces more than the limit before reading
			// it; connect itself would read (and discard) it to the end.
			r.Body = &envelopeLimiter{r: r.Body, max: max}
		default:
			// Connect unary: read the body here, stop at the limit, and
			// answer 413 at once; decompress it here too, under the limit.
			if !s.readUnaryBody(w, r, max) {
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

// readUnaryBody replaces r.Body with its bytes, decompressed, or answers
// 413 and returns false when it is larger than max.
func (s *Server) readUnaryBody(w http.ResponseWriter, r *http.Request, max int) bool {
	tooLarge := func(what string) bool {
		s.metrics.limitHits.WithLabelValues("max-request-bytes").Inc()
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Connection", "close") // the rest of the body is never read
		w.WriteHeader(http.StatusRequestEntityTooLarge)
		fmt.Fprintf(w, `{"code":"resource_exhausted","message":"server: request %s larger than --max-request-bytes %d"}`+"\n", what, max)
		return false
	}
	if r.ContentLength > int64(max) {
		return tooLarge("body")
	}
	// A deadline for the body, so that bodies trickled on many streams
	// cannot hold the server's memory; cleared for the handler.
	rc := http.NewResponseController(w)
	_ = rc.SetReadDeadline(time.Now().Add(s.cfg.Limits.ReadBodyTimeout))
	body, err := io.ReadAll(io.LimitReader(r.Body, int64(max)+1))
	_ = rc.SetReadDeadline(time.Time{})
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			s.metrics.limitHits.WithLabelValues("read-body-timeout").Inc()
			w.Header().Set("Connection", "close")
			http.Error(w, fmt.Sprintf("server: request body not received within --read-body-timeout %s", s.cfg.Limits.ReadBodyTimeout), http.StatusRequestTimeout)
			return false
		}
		http.Error(w, "server: reading the request body: "+err.Error(), http.StatusBadRequest)
		return false
	}
	if len(body) > max {
		return tooLarge("body")
	}
	if enc := r.Header.Get("Content-Encoding"); enc != "" && enc != "identity" {
		if enc != "gzip" {
			w.Header().Set("Accept-Encoding", "gzip")
			http.Error(w, fmt.Sprintf("server: Content-Encoding %q not supported (gzip is)", enc), http.StatusUnsupportedMediaType)
			return false
		}
		zr, err := gzip.NewReader(bytes.NewReader(body))
		if err == nil {
			body, err = io.ReadAll(io.LimitReader(zr, int64(max)+1))
		}
		if err != nil {
			http.Error(w, "server: decompressing the request body: "+err.Error(), http.StatusBadRequest)
			return false
		}
		if len(body) > max {
			return tooLarge("body, decompressed,")
		}
		r.Header.Del("Content-Encoding")
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	return true
}

// errEnvelopeTooLarge ends a stream whose next message is over the limit.
type errEnvelopeTooLarge struct{ size, max int }

func (e errEnvelopeTooLarge) Error() string {
	return fmt.Sprintf("server: request message of %d bytes larger than --max-request-bytes %d", e.size, e.max)
}

// envelopeLimiter reads a stream of enveloped messages (1 flag byte, a
// 4-byte big-endian length, the message) and fails as soon as a prefix
// announces a message larger than max.
type envelopeLimiter struct {
	r      io.ReadCloser
	max    int
	prefix [5]byte
	have   int // prefix bytes seen of the current envelope
	left   int // message bytes of the current envelope still to pass
	err    error
}

func (l *envelopeLimiter) Read(p []byte) (int, error) {
	if l.err != nil {
		return 0, l.err
	}
	n, err := l.r.Read(p)
	for i := 0; i < n; {
		if l.left > 0 {
			step := min(l.left, n-i)
			l.left -= step
			i += step
			continue
		}
		l.prefix[l.have] = p[i]
		l.have++
		i++
		if l.have == len(l.prefix) {
			l.have = 0
			size := int(binary.BigEndian.Uint32(l.prefix[1:]))
			if size > l.max+64 { // a little room for compression's overhead
				l.err = errEnvelopeTooLarge{size, l.max}
				return i, l.err
			}
			l.left = size
		}
	}
	return n, err
}

func (l *envelopeLimiter) Close() error { return l.r.Close() }

// boundedGzip is connect's gzip decompressor with a bound: past max+1
// bytes it fails instead of letting connect inflate the rest (a 500 KB
// body can inflate to 500 MB) only to count it.
type boundedGzip struct {
	gzip.Reader
	max, read int
}

func (g *boundedGzip) Read(p []byte) (int, error) {
	if g.read > g.max {
		return 0, fmt.Errorf("server: decompressed request message larger than --max-request-bytes %d", g.max)
	}
	n, err := g.Reader.Read(p)
	g.read += n
	return n, err
}

func (g *boundedGzip) Reset(r io.Reader) error {
	g.read = 0
	return g.Reader.Reset(r)
}

func gzipOption(max int) connect.HandlerOption {
	return connect.WithCompression("gzip",
		func() connect.Decompressor { return &boundedGzip{max: max} },
		func() connect.Compressor { return gzip.NewWriter(io.Discard) },
	)
}

// deadlineWriter bounds every write to the client (and every flush,
// which for HTTP/2 waits for flow control): a client that does not read
// for WriteTimeout loses the call. Between writes there is no bound, so a
// watch may stay quiet for hours. A write only notes when it began; the
// server's stalledWrites watchdog cuts the ones that outlast the timeout.
// (A write deadline set and cleared around each write cost four messages
// to net/http's HTTP/2 serve goroutine per watch message — about a third
// of a watch stream's send path at 1,000 streams.)
type deadlineWriter struct {
	http.ResponseWriter
	rc    *http.ResponseController
	base  time.Time    // the watchdog's: since counts from it, on the monotonic clock
	since atomic.Int64 // when the write in progress began, in ns after base (+1); 0 between writes
	cut   atomic.Bool  // the watchdog ended the call

	mu   sync.Mutex // the watchdog's cut against the call's end
	done bool       // guarded by mu: the handler returned; rc may not be used
}

func (d *deadlineWriter) began() { d.since.Store(int64(time.Since(d.base)) + 1) }

func (d *deadlineWriter) Write(p []byte) (int, error) {
	d.began()
	n, err := d.ResponseWriter.Write(p)
	d.since.Store(0)
	return n, err
}

func (d *deadlineWriter) Flush() {
	d.began()
	_ = d.rc.Flush()
	d.since.Store(0)
}

func (d *deadlineWriter) Unwrap() http.ResponseWriter { return d.ResponseWriter }

// stalledWrites is the watchdog of the API's writes: every eighth of the
// timeout (at most a second) it cuts each call whose write has waited
// for the timeout, with a write deadline already passed, which makes
// net/http reset the stream (HTTP/2) or fail the connection's write. A
// stalled write is cut between timeout and timeout and a tick. What
// net/http writes itself after the handler returned (a small unary
// answer, the last flush) is not bounded here.
type stalledWrites struct {
	timeout  time.Duration
	timedOut func()
	base     time.Time

	mu      sync.Mutex
	writers map[*deadlineWriter]struct{} // guarded by mu: the calls being served
}

func newStalledWrites(timeout time.Duration, timedOut func()) *stalledWrites {
	return &stalledWrites{timeout: timeout, timedOut: timedOut, base: time.Now(), writers: map[*deadlineWriter]struct{}{}}
}

// wrap returns w bounded by the watchdog, and the function to call when
// the handler returns (after it, the watchdog leaves the call alone: a
// ResponseController may not be used once ServeHTTP returned).
func (sw *stalledWrites) wrap(w http.ResponseWriter) (*deadlineWriter, func()) {
	d := &deadlineWriter{ResponseWriter: w, rc: http.NewResponseController(w), base: sw.base}
	sw.mu.Lock()
	sw.writers[d] = struct{}{}
	sw.mu.Unlock()
	return d, func() {
		d.mu.Lock()
		d.done = true
		d.mu.Unlock()
		sw.mu.Lock()
		delete(sw.writers, d)
		sw.mu.Unlock()
	}
}

// run cuts stalled writes until ctx ends.
func (sw *stalledWrites) run(ctx context.Context) {
	t := time.NewTicker(min(max(sw.timeout/8, 10*time.Millisecond), time.Second))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			sw.cutStalled(int64(time.Since(sw.base)) + 1)
		}
	}
}

// cutStalled cuts the calls whose write began a timeout or more before
// now (ns after base, +1, as since).
func (sw *stalledWrites) cutStalled(now int64) {
	type candidate struct {
		d     *deadlineWriter
		since int64
	}
	var stalled []candidate
	sw.mu.Lock()
	for d := range sw.writers {
		if s := d.since.Load(); s != 0 && now-s >= int64(sw.timeout) && !d.cut.Load() {
			stalled = append(stalled, candidate{d, s})
		}
	}
	sw.mu.Unlock()
	// Outside the registry's lock: each cut is a message to the
	// connection's goroutine. Under the call's own lock, so that the
	// handler has not returned, and only if that same write still waits.
	for _, c := range stalled {
		c.d.mu.Lock()
		if !c.d.done && c.d.since.Load() == c.since && c.d.cut.CompareAndSwap(false, true) {
			_ = c.d.rc.SetWriteDeadline(time.Now())
			sw.timedOut()
		}
		c.d.mu.Unlock()
	}
}

// retryAfter is the Retry-After a refused client is told, in seconds.
const retryAfter = 1

// limitError is the error a client gets when it reaches a limit: gRPC
// resource_exhausted (HTTP 429 for Connect's unary calls) naming the
// flag, with Retry-After.
func (s *Server) limitError(flag string, format string, args ...any) error {
	s.metrics.limitHits.WithLabelValues(flag).Inc()
	err := connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("server: "+format+" (limit --%s)", append(args, flag)...))
	err.Meta().Set("Retry-After", strconv.Itoa(retryAfter))
	return err
}

// writeProcedures are the calls that write to etcd; each takes a token of
// the connection's write budget.
var writeProcedures = map[string]bool{
	beaconv1connect.RegistryServiceCreateSessionProcedure:    true,
	beaconv1connect.RegistryServiceCloseSessionProcedure:     true,
	beaconv1connect.RegistryServiceRegisterProcedure:         true,
	beaconv1connect.RegistryServiceRegisterBatchProcedure:    true,
	beaconv1connect.RegistryServiceDeregisterProcedure:       true,
	beaconv1connect.RegistryServiceSetStatusProcedure:        true,
	beaconv1connect.RegistryServiceSetServiceConfigProcedure: true,
	beaconv1connect.RegistryServiceSetServicePolicyProcedure: true,
	beaconv1connect.RegistryServiceUpdateCheckProcedure:      true,
	beaconv1connect.AclServiceBootstrapProcedure:             true, // also what a key guesser spends
	beaconv1connect.AclServiceCreateTokenProcedure:           true,
	beaconv1connect.AclServiceUpdateTokenProcedure:           true,
	beaconv1connect.AclServiceDeleteTokenProcedure:           true,
	beaconv1connect.AclServicePutPolicyProcedure:             true,
	beaconv1connect.AclServiceDeletePolicyProcedure:          true,
	beaconv1connect.AclServicePutRoleProcedure:               true,
	beaconv1connect.AclServiceDeleteRoleProcedure:            true,
	beaconv1connect.KVServicePutProcedure:                    true,
	beaconv1connect.KVServiceDeleteProcedure:                 true,
	beaconv1connect.KVServiceTxnProcedure:                    true,
	beaconv1connect.KVServiceRollbackProcedure:               true,
	beaconv1connect.KVServiceReportAppliedProcedure:          true,
	beaconv1connect.KVServiceStartRolloutProcedure:           true,
	beaconv1connect.KVServiceEndRolloutProcedure:             true,
	beaconv1connect.LockServiceAcquireProcedure:              true,
	beaconv1connect.LockServiceReleaseProcedure:              true,
	beaconv1connect.LockServiceProclaimProcedure:             true,
}

// limitsInterceptor spends a write token of the caller's connection, one
// of its address and, with ACLs, one of its token, on every write call (a
// RegisterBatch spends one per instance). Tokens are taken from every
// bucket or from none: a call one bucket refuses gives back what the
// others had granted.
type limitsInterceptor struct{ s *Server }

func (i limitsInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if writeProcedures[req.Spec().Procedure] {
			cc, l := connOf(ctx), i.s.cfg.Limits
			n, now := 1, time.Now()
			switch b := req.Any().(type) {
			case *beaconv1.RegisterBatchRequest:
				n = max(1, len(b.GetInstances()))
				if n > l.registerBatchMax() {
					return next(ctx, req) // refused whole by the handler, naming its own limit
				}
			case *beaconv1.KVTxnRequest:
				if len(b.GetOps()) > l.MaxKVTxnOps {
					return next(ctx, req) // refused by the handler, naming its own limit
				}
				n = max(1, len(b.GetOps()))
			}
			if err := i.s.spendWrites(ctx, cc, n, now); err != nil {
				return nil, err
			}
		}
		return next(ctx, req)
	}
}

// spendWrites takes n write tokens from the connection's, its address's
// and (with ACLs) its token's buckets, or from none of them.
func (s *Server) spendWrites(ctx context.Context, cc *clientConn, n int, now time.Time) error {
	l := s.cfg.Limits
	conn := cc.writes.ReserveN(now, n)
	if !conn.OK() || conn.DelayFrom(now) > 0 {
		conn.CancelAt(now)
		return s.limitError("write-rate", "this connection writes faster than %v per second (burst %d)", l.WriteRate, l.WriteBurst)
	}
	ip := cc.ipWrites.ReserveN(now, n)
	if !ip.OK() || ip.DelayFrom(now) > 0 {
		ip.CancelAt(now)
		conn.CancelAt(now)
		return s.limitError("write-rate-per-ip", "this client address writes faster than %v per second (burst %d)", l.WriteRatePerIP, l.WriteBurstPerIP)
	}
	if s.acl != nil && !s.quotas.allowWrite(identityOf(ctx).Accessor, n) {
		ip.CancelAt(now)
		conn.CancelAt(now)
		return s.limitError("write-rate-per-token", "token %s writes faster than %v per second (burst %d)", identityOf(ctx).Accessor, l.WriteRatePerToken, l.WriteBurstPerToken)
	}
	return nil
}

func (limitsInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (limitsInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

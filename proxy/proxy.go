package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"os"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"beacon.dev/beacon/balancer"
	"beacon.dev/beacon/balancer/p2c"
	"beacon.dev/beacon/beaconhttp"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/discovery"
	"beacon.dev/beacon/outlier"
	"beacon.dev/beacon/policy"
	"beacon.dev/beacon/tracing"
)

// Option configures a Proxy.
type Option func(*Proxy)

// WithLogger sets the logger (default: discard).
func WithLogger(l *slog.Logger) Option { return func(p *Proxy) { p.log = l } }

// WithTracerProvider traces every routed request: a server span named by
// its route ("proxy ROUTE"), joined to the caller's trace by W3C trace
// context, with beacon's call and attempt spans under it (package
// tracing: the instance picked and why, retries, hedges) and the trace
// context passed on to the instance. Without it nothing is traced, and
// a caller's traceparent header passes through untouched.
func WithTracerProvider(tp trace.TracerProvider) Option {
	return func(p *Proxy) { p.tp, p.tracer = tp, tracing.Tracer(tp, "beacon.dev/beacon/proxy") }
}

// WithRegisterer registers the proxy's metrics there too (the metrics
// listener always serves them).
func WithRegisterer(r prometheus.Registerer) Option { return func(p *Proxy) { p.extraReg = r } }

// Proxy serves a Config. Make it with New, run it with Run, change its
// routes with Reload. Safe for concurrent use.
type Proxy struct {
	log       *slog.Logger
	tp        trace.TracerProvider // nil: no tracing
	tracer    trace.Tracer
	extraReg  prometheus.Registerer
	reg       *prometheus.Registry
	m         *metrics
	access    *accessLog
	client    *client.Client
	cache     *discovery.Cache
	base      *http.Transport
	upstreams *upstreams     // the HTTP/1.1 fast path's connections
	bg        sync.WaitGroup // the upstreams' reaper

	mu    sync.Mutex             // serialises Reload
	cfg   atomic.Pointer[Config] // the running config
	table atomic.Pointer[table]  // the routes requests use

	retire sync.WaitGroup // goroutines closing old tables
	closed atomic.Bool

	ready     chan struct{}
	readyOnce sync.Once

	// stopping ends upgraded connections (websockets) when Close starts:
	// http.Server.Shutdown does not track hijacked connections.
	stopping context.Context
	stop     context.CancelFunc
}

// table is one generation of routes. Requests hold a reference while they
// run (acquire/release); the proxy holds one while the table is current.
// The last release closes the routes' transports.
type table struct {
	routes []*route
	refs   atomic.Int64
	done   chan struct{}
}

func (t *table) release() {
	if t.refs.Add(-1) == 0 {
		close(t.done)
	}
}

// close releases the table's routes; a route carried into a newer table
// (its configuration unchanged) stays open there.
func (t *table) close() {
	for _, r := range t.routes {
		r.release()
	}
}

// acquire returns the current table with a reference taken.
func (p *Proxy) acquire() *table {
	for {
		if p.closed.Load() {
			return nil // Close released the last table
		}
		t := p.table.Load()
		n := t.refs.Load()
		if n > 0 && t.refs.CompareAndSwap(n, n+1) {
			return t
		}
		// n == 0: retired between Load and here; the next Load sees the
		// new table.
	}
}

// New connects to the registry named by cfg and builds the routes. It
// listens on nothing until Run.
func New(cfg *Config, opts ...Option) (*Proxy, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	p := &Proxy{log: slog.New(slog.DiscardHandler), reg: prometheus.NewRegistry(), ready: make(chan struct{})}
	p.stopping, p.stop = context.WithCancel(context.Background())
	for _, o := range opts {
		o(p)
	}
	p.m = newMetrics(p.reg)
	if p.extraReg != nil {
		if err := p.extraReg.Register(p.m); err != nil {
			return nil, fmt.Errorf("proxy: metrics: %w", err)
		}
	}
	var err error
	if p.access, err = openAccessLog(cfg.AccessLog.Path); err != nil {
		return nil, err
	}
	copts := []client.Option{client.WithLogger(p.log)}
	if cfg.Registry.Namespace != "" {
		copts = append(copts, client.WithNamespace(cfg.Registry.Namespace))
	}
	if r := cfg.Registry; r.TLS.CA != "" || r.TLS.Cert != "" {
		tc, err := client.TLSFromFiles(r.TLS.CA, r.TLS.Cert, r.TLS.Key)
		if err != nil {
			p.access.close()
			return nil, fmt.Errorf("proxy: registry.tls: %w", err)
		}
		copts = append(copts, client.WithTLS(tc))
	}
	token := cfg.Registry.Token
	if f := cfg.Registry.TokenFile; f != "" {
		b, err := os.ReadFile(f)
		if err != nil {
			p.access.close()
			return nil, fmt.Errorf("proxy: registry.tokenFile: %w", err)
		}
		token = strings.TrimSpace(string(b))
	}
	if token != "" {
		copts = append(copts, client.WithToken(token))
	}
	if p.client, err = client.New(cfg.Registry.Servers, copts...); err != nil {
		p.access.close()
		return nil, fmt.Errorf("proxy: registry: %w", err)
	}
	if p.cache, err = discovery.New(discovery.FromClient(p.client, cfg.Registry.Namespace), discovery.Config{SnapshotDir: cfg.Registry.SnapshotDir}); err != nil {
		p.client.Close()
		p.access.close()
		return nil, fmt.Errorf("proxy: discovery: %w", err)
	}
	p.base = beaconhttp.DefaultBase()
	p.base.DisableCompression = true // pass Accept-Encoding and bodies through untouched
	p.upstreams = newUpstreams()
	p.bg.Add(1)
	go func() { defer p.bg.Done(); p.upstreams.run(p.stopping) }() // owned by p: ends with Close (or closeDeps)
	t, err := p.build(cfg, nil)
	if err != nil {
		p.closeDeps()
		return nil, err
	}
	p.cfg.Store(cfg)
	p.table.Store(t)
	return p, nil
}

func (p *Proxy) closeDeps() {
	p.stop()
	p.bg.Wait()
	p.cache.Close()
	p.client.Close()
	p.base.CloseIdleConnections()
	p.access.close()
}

// Close stops following services and closes the registry connection once
// the requests in flight are done. Call it after Run returned.
func (p *Proxy) Close() {
	if p.closed.Swap(true) {
		return
	}
	p.stop()
	p.mu.Lock()
	t := p.table.Load()
	p.mu.Unlock()
	t.release()
	<-t.done
	t.close()
	p.retire.Wait()
	p.closeDeps()
}

// Config returns the running configuration (do not modify it).
func (p *Proxy) Config() *Config { return p.cfg.Load() }

// Client is the proxy's registry client.
func (p *Proxy) Client() *client.Client { return p.client }

// Gatherer serves the proxy's metrics.
func (p *Proxy) Gatherer() prometheus.Gatherer { return p.reg }

// ReloadFile reads path and applies it with Reload.
func (p *Proxy) ReloadFile(path string) error {
	cfg, err := LoadConfig(path)
	if err != nil {
		return err
	}
	return p.Reload(cfg)
}

// Reload applies cfg's routes. Requests in flight finish on the routes they
// started on; connections stay open. A cfg that is invalid, or that
// changes anything but the routes (listeners, registry, sidecar, tcp,
// metrics, access log: those need a restart), is refused and the running
// configuration kept.
func (p *Proxy) Reload(cfg *Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed.Load() {
		return errors.New("proxy: closed")
	}
	if field, ok := p.cfg.Load().sameExceptRoutes(cfg); !ok {
		return fe(field, "changed: only routes are reloaded; restart the proxy to change %s", field)
	}
	t, err := p.build(cfg, p.table.Load())
	if err != nil {
		return err
	}
	old := p.table.Swap(t)
	p.cfg.Store(cfg)
	old.release()
	p.retire.Add(1)
	go func() { // owned by p: Close waits for it
		defer p.retire.Done()
		<-old.done // the last request on the old routes is done
		old.close()
	}()
	p.m.reloads.Inc()
	return nil
}

// build makes a table of routes. A route of prev whose configuration is
// unchanged is carried over as it is: its balancer keeps its ejections,
// latency averages and connections across the reload.
func (p *Proxy) build(cfg *Config, prev *table) (*table, error) {
	t := &table{done: make(chan struct{})}
	t.refs.Store(1)
	kept := map[string]*route{}
	if prev != nil {
		for _, r := range prev.routes {
			kept[r.cfg.Name] = r
		}
	}
	for i := range cfg.Routes {
		if r := kept[cfg.Routes[i].Name]; r != nil && reflect.DeepEqual(r.cfg, cfg.Routes[i]) && r.zone == cfg.Zone && bytes.Equal(r.tlsFiles, tlsFiles(r.cfg.UpstreamTLS)) {
			r.tables.Add(1)
			t.routes = append(t.routes, r)
			continue
		}
		r, err := p.newRoute(cfg, &cfg.Routes[i])
		if err != nil {
			t.close()
			return nil, fmt.Errorf("proxy: routes[%d] (%s): %w", i, cfg.Routes[i].Name, err)
		}
		t.routes = append(t.routes, r)
	}
	return t, nil
}

// route is one configured route, ready to serve.
type route struct {
	tables   atomic.Int32 // the tables holding the route; the last to let go closes it
	zone     string       // cfg.Zone when built
	cfg      Route
	host     string // lower case; "*.x" matches subdomains of x
	tr       *beaconhttp.Transport
	tlsBase  *http.Transport // the route's own, with upstreamTLS; else nil
	tlsFiles []byte          // their content when built: rotated files make a new route
	hedge    *policy.Hedger
	rp       *httputil.ReverseProxy
	fast     bool // the HTTP/1.1 fast path may serve it: no hedging, no upstream TLS, no tracing
	rm       routeMetrics
}

// tlsFiles is the content of u's files (nil without u), to tell a
// rotated certificate from an unchanged one.
func tlsFiles(u *UpstreamTLS) []byte {
	if u == nil {
		return nil
	}
	var all []byte
	for _, f := range []string{u.CA, u.Cert, u.Key} {
		if f != "" {
			b, _ := os.ReadFile(f)
			all = append(append(all, b...), 0)
		}
	}
	return all
}

// release lets go of the route for one table.
func (r *route) release() {
	if r.tables.Add(-1) != 0 {
		return
	}
	r.tr.Close()
	if r.tlsBase != nil {
		r.tlsBase.CloseIdleConnections()
	}
}

func (p *Proxy) newRoute(cfg *Config, rc *Route) (*route, error) {
	r := &route{cfg: *rc, zone: cfg.Zone, host: strings.ToLower(rc.Match.Host), rm: p.m.forRoute(rc.Name, rc.Service)}
	r.tables.Store(1)
	var subsets []balancer.Subset
	for _, s := range rc.Split {
		subsets = append(subsets, balancer.Subset{Name: s.Name, Weight: s.Weight,
			Match: balancer.Selector{Version: s.Version, Tags: s.Tags, Metadata: s.Metadata}})
	}
	budget, err := policy.NewBudget(policy.DefaultBudget)
	if err != nil {
		return nil, err
	}
	var base http.RoundTripper = p.base
	if u := rc.UpstreamTLS; u != nil {
		tc, err := client.TLSFromFiles(u.CA, u.Cert, u.Key)
		if err != nil {
			return nil, fmt.Errorf("upstreamTLS: %w", err)
		}
		tc.ServerName = u.ServerName
		if tc.ServerName == "" {
			tc.ServerName = rc.Service
		}
		r.tlsFiles = tlsFiles(u)
		r.tlsBase = p.base.Clone()
		r.tlsBase.TLSClientConfig = tc
		r.tlsBase.ForceAttemptHTTP2 = true
		base = r.tlsBase
	}
	oc := outlier.Config{ConsecutiveFailures: rc.Outlier.ConsecutiveFailures, BaseEjection: time.Duration(rc.Outlier.BaseEjection)}
	opts := []beaconhttp.Option{
		beaconhttp.WithServices(rc.Service),
		beaconhttp.WithBase(&attemptRT{base: base, perTry: time.Duration(rc.PerTryTimeout), tls: r.tlsBase != nil, traced: p.tracer != nil}),
		beaconhttp.WithBalancer(p2c.Builder{}, balancer.Config{Subsets: subsets, Zone: cfg.Zone, PanicThreshold: rc.PanicThreshold}),
		beaconhttp.WithOutlierDetection(oc),
		beaconhttp.WithRetry(policy.RetryConfig{MaxAttempts: rc.Retry.MaxAttempts, Budget: budget}),
	}
	if p.tp != nil {
		opts = append(opts, beaconhttp.WithTracing(p.tp))
	}
	if b := rc.Breaker; b != nil {
		opts = append(opts, beaconhttp.WithBreaker(policy.BreakerConfig{FailureRate: b.FailureRate, MinCalls: b.MinCalls, OpenFor: time.Duration(b.OpenFor)}))
	}
	if r.tr, err = beaconhttp.NewTransport(p.cache, opts...); err != nil {
		return nil, err
	}
	var rt http.RoundTripper = r.tr
	if h := rc.Hedge; h != nil {
		if r.hedge, err = policy.NewHedger(policy.HedgeConfig{Delay: time.Duration(h.Delay), MaxExtra: h.MaxExtra, Budget: budget}); err != nil {
			r.tr.Close()
			return nil, err
		}
		rt = &hedgeRT{next: r.tr, h: r.hedge}
	}
	r.fast = r.hedge == nil && r.tlsBase == nil && p.tracer == nil
	prefix := rc.Match.PathPrefix
	r.rp = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetXForwarded()
			pr.Out.URL.Scheme = "http"
			pr.Out.URL.Host = rc.Service // beaconhttp resolves it
			if rc.StripPrefix {
				pr.Out.URL.Path = "/" + strings.TrimPrefix(strings.TrimPrefix(pr.In.URL.Path, prefix), "/")
				pr.Out.URL.RawPath = ""
			}
		},
		Transport:    rt,
		BufferPool:   copyBuffers,
		ErrorHandler: p.upstreamError,
		ErrorLog:     slog.NewLogLogger(p.log.Handler(), slog.LevelDebug),
	}
	return r, nil
}

// matches reports whether req is the route's.
func (r *route) matches(req *http.Request, host string) bool {
	if !r.hostMatches(host) {
		return false
	}
	m := &r.cfg.Match
	if m.PathPrefix != "" && !strings.HasPrefix(req.URL.Path, m.PathPrefix) {
		return false
	}
	for k, v := range m.Headers {
		if req.Header.Get(k) != v {
			return false
		}
	}
	return true
}

// hostMatches reports whether host (lower case, no port) is the route's.
func (r *route) hostMatches(host string) bool {
	switch {
	case r.host == "":
		return true
	case strings.HasPrefix(r.host, "*."):
		return strings.HasSuffix(host, r.host[1:])
	}
	return host == r.host
}

// matchesRaw is matches for the fast path's parsed head; host is the Host
// header without its port.
func (r *route) matchesRaw(host []byte, h *requestHead) bool {
	if r.host != "" {
		if len(host) > 1 && host[0] == '[' && host[len(host)-1] == ']' {
			host = host[1 : len(host)-1]
		}
		if !r.hostMatches(strings.ToLower(string(host))) {
			return false
		}
	}
	m := &r.cfg.Match
	if m.PathPrefix != "" && !bytes.HasPrefix(h.path, []byte(m.PathPrefix)) {
		return false
	}
	for k, v := range m.Headers {
		var got []byte // the first value, as Header.Get (which never holds Host)
		for _, hd := range h.headers {
			if bytes.EqualFold(hd.name, []byte(k)) && !headerIs(hd.name, "host") {
				got = hd.value
				break
			}
		}
		if string(got) != v {
			return false
		}
	}
	return true
}

// ServeHTTP routes one request.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	start := time.Now()
	t := p.acquire()
	if t == nil {
		http.Error(w, "beacon proxy: closing", http.StatusServiceUnavailable)
		return
	}
	defer t.release()
	host := req.Host
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.ToLower(host)
	var r *route
	for _, c := range t.routes {
		if c.matches(req, host) {
			r = c
			break
		}
	}
	rec := &recorder{ResponseWriter: w}
	if r == nil {
		http.Error(rec, "beacon proxy: no route matches this request", http.StatusNotFound)
		p.m.unrouted.Inc()
		p.access.writeRequest(req, rec, "", "", start, nil)
		return
	}
	lim := limitsOf(req.Context())
	if lim != nil && lim.MaxBodyBytes > 0 && req.Body != nil && req.Body != http.NoBody {
		if req.ContentLength > lim.MaxBodyBytes {
			http.Error(rec, fmt.Sprintf("beacon proxy: request body of %d bytes is over the listener's limit (limits.maxBodyBytes %d)", req.ContentLength, lim.MaxBodyBytes), http.StatusRequestEntityTooLarge)
			r.rm.done(rec.status(), time.Since(start), 0)
			p.access.writeRequest(req, rec, r.cfg.Name, r.cfg.Service, start, nil)
			return
		}
		req.Body = http.MaxBytesReader(rec, req.Body, lim.MaxBodyBytes)
	}
	ctx := req.Context()
	upgrade := req.Header.Get("Upgrade") != ""
	if !upgrade { // an upgraded connection lives as long as its peers want
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(r.cfg.Timeout))
		defer cancel()
	} else { // … or until the proxy closes
		var cancel context.CancelFunc
		ctx, cancel = context.WithCancel(ctx)
		defer cancel()
		defer context.AfterFunc(p.stopping, cancel)()
	}
	if p.tracer != nil {
		var span trace.Span
		ctx, span = p.startSpan(ctx, req, r)
		defer func() { endSpan(span, rec.status()) }()
	}
	var attempts atomic.Int32
	st := &reqState{attempts: &attempts}
	ctx = context.WithValue(ctx, stateKey{}, st)
	r.rp.ServeHTTP(rec, req.WithContext(ctx))
	n := int(attempts.Load())
	r.rm.done(rec.status(), time.Since(start), n)
	p.access.writeRequest(req, rec, r.cfg.Name, r.cfg.Service, start, st)
}

// upstreamError answers a request that got no upstream response.
func (p *Proxy) upstreamError(w http.ResponseWriter, req *http.Request, err error) {
	code, err := errorStatus(err)
	if st, ok := req.Context().Value(stateKey{}).(*reqState); ok {
		st.err = err
	}
	p.log.Debug("beacon proxy: upstream error", "url", req.URL.String(), "err", err)
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(code)
	fmt.Fprintf(w, "beacon proxy: %v\n", err)
}

// errorStatus is the status answering a request that got no upstream
// response, and the error to tell the client.
func errorStatus(err error) (int, error) {
	code := http.StatusBadGateway
	var mbe *http.MaxBytesError
	switch {
	case errors.As(err, &mbe):
		code = http.StatusRequestEntityTooLarge
		err = fmt.Errorf("request body over the listener's limit (limits.maxBodyBytes %d)", mbe.Limit)
	case errors.Is(err, balancer.ErrNoEndpoint):
		code = http.StatusServiceUnavailable
	case errors.Is(err, policy.ErrOpen), errors.Is(err, policy.ErrBulkheadFull):
		code = http.StatusServiceUnavailable
	case errors.Is(err, context.DeadlineExceeded):
		code = http.StatusGatewayTimeout
	case errors.Is(err, context.Canceled):
		code = 499 // the client went away (nginx's code); nobody reads it
	}
	return code, err
}

// stateKey carries a request's *reqState in its context.
type stateKey struct{}

type reqState struct {
	attempts *atomic.Int32
	err      error
}

// attemptRT counts attempts for the metrics and bounds each one's wait
// for the response headers (the route's perTryTimeout): the bound is on
// the headers only, so that a long response streams as long as the
// route's timeout allows.
type attemptRT struct {
	base   http.RoundTripper
	perTry time.Duration
	tls    bool // https to the instance (upstreamTLS)
	traced bool // pass the attempt's span on as W3C trace context
}

// errPerTry is a timeout as net.Error, which beaconhttp retries.
type errPerTry struct{ d time.Duration }

func (e errPerTry) Error() string {
	return fmt.Sprintf("proxy: no response headers within perTryTimeout %v", e.d)
}
func (e errPerTry) Timeout() bool   { return true }
func (e errPerTry) Temporary() bool { return true }

var _ net.Error = errPerTry{}

func (a *attemptRT) RoundTrip(req *http.Request) (*http.Response, error) {
	if st, ok := req.Context().Value(stateKey{}).(*reqState); ok {
		st.attempts.Add(1)
	}
	if a.tls { // beaconhttp resolved the instance over http://SERVICE
		u := *req.URL
		u.Scheme = "https"
		req = req.WithContext(req.Context()) // a shallow copy to change
		req.URL = &u
	}
	if a.traced {
		// Attempts (hedges) share the request's headers: each gets its own
		// copy to carry its own span.
		req = req.Clone(req.Context())
		traceContext.Inject(req.Context(), propagation.HeaderCarrier(req.Header))
	}
	if a.perTry <= 0 {
		return a.base.RoundTrip(req)
	}
	ctx, cancel := context.WithCancelCause(req.Context())
	timer := time.AfterFunc(a.perTry, func() { cancel(errPerTry{a.perTry}) })
	resp, err := a.base.RoundTrip(req.WithContext(ctx))
	if !timer.Stop() && err != nil {
		cancel(nil)
		return nil, errPerTry{a.perTry}
	}
	if err != nil {
		cancel(nil)
		return nil, err
	}
	resp.Body = &cancelBody{ReadCloser: resp.Body, cancel: func() { cancel(nil) }}
	return resp, nil
}

// hedgeRT hedges GET and HEAD requests without a body with policy.Hedger:
// the first response wins, the others are cancelled.
type hedgeRT struct {
	next http.RoundTripper
	h    *policy.Hedger
}

func (h *hedgeRT) RoundTrip(req *http.Request) (*http.Response, error) {
	if (req.Method != http.MethodGet && req.Method != http.MethodHead) || (req.Body != nil && req.Body != http.NoBody) || req.Header.Get("Upgrade") != "" {
		return h.next.RoundTrip(req)
	}
	var (
		mu     sync.Mutex
		winner *http.Response
		over   bool           // DoHold returned: no attempt starts any more
		active sync.WaitGroup // attempts still running, losers included
	)
	// The losers are cancelled when DoHold returns, but may still be in
	// the transport: RoundTrip waits for them, so that none outlives the
	// route table (a reload closes its transports after its last request).
	defer func() {
		mu.Lock()
		over = true
		mu.Unlock()
		active.Wait()
	}()
	release, err := h.h.DoHold(req.Context(), func(ctx context.Context, _ int) error {
		mu.Lock()
		if over {
			mu.Unlock()
			return context.Canceled
		}
		active.Add(1)
		mu.Unlock()
		defer active.Done()
		resp, err := h.next.RoundTrip(req.Clone(ctx))
		if err != nil {
			return err
		}
		mu.Lock()
		defer mu.Unlock()
		if winner != nil || ctx.Err() != nil { // lost
			resp.Body.Close()
			return policy.ErrHedgeLost
		}
		winner = resp // the only attempt to return nil: DoHold's winner
		return nil
	})
	mu.Lock()
	defer mu.Unlock()
	switch {
	case err == nil && winner != nil:
		winner.Body = &cancelBody{ReadCloser: winner.Body, cancel: release}
		return winner, nil
	case winner != nil: // answered just as the caller gave up
		winner.Body.Close()
	case err == nil:
		err = errors.New("proxy: hedged request ended without a response")
	}
	release()
	return nil, err
}

// copyBuffers are the 32 KiB buffers bodies are copied through: without
// a pool ReverseProxy allocates (and the GC clears) one per request, 70 %
// of the bytes a small proxied request allocates.
var copyBuffers httputil.BufferPool = &bufferPool{}

type bufferPool struct{ p sync.Pool }

func (b *bufferPool) Get() []byte {
	if v, ok := b.p.Get().(*[]byte); ok {
		return *v
	}
	return make([]byte, 32<<10)
}

func (b *bufferPool) Put(buf []byte) { b.p.Put(&buf) }

// cancelBody cancels its request's context when closed.
type cancelBody struct {
	io.ReadCloser
	cancel func()
}

func (b *cancelBody) Close() error {
	err := b.ReadCloser.Close()
	b.cancel()
	return err
}

// recorder keeps the status and size of a response. Unwrap lets
// http.ResponseController (flush, hijack for upgrades) reach the
// connection.
type recorder struct {
	http.ResponseWriter
	code  int
	bytes int64
}

func (r *recorder) WriteHeader(code int) {
	if r.code == 0 && code >= 200 || code == http.StatusSwitchingProtocols {
		r.code = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(b []byte) (int, error) {
	if r.code == 0 {
		r.code = http.StatusOK
	}
	n, err := r.ResponseWriter.Write(b)
	r.bytes += int64(n)
	return n, err
}

func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

func (r *recorder) status() int {
	if r.code == 0 {
		return http.StatusOK
	}
	return r.code
}

var traceContext propagation.TraceContext

// startSpan opens a routed request's server span, in the caller's trace
// when its request carries W3C trace context. Its name is the route's (a
// bounded set, from the configuration), never the request's path.
func (p *Proxy) startSpan(ctx context.Context, req *http.Request, r *route) (context.Context, trace.Span) {
	ctx = traceContext.Extract(ctx, propagation.HeaderCarrier(req.Header))
	return p.tracer.Start(ctx, "proxy "+r.cfg.Name, trace.WithSpanKind(trace.SpanKindServer),
		trace.WithAttributes(attribute.String("http.request.method", req.Method),
			attribute.String("beacon.route", r.cfg.Name), attribute.String("beacon.service", r.cfg.Service)))
}

func endSpan(span trace.Span, status int) {
	span.SetAttributes(attribute.Int("http.response.status_code", status))
	if status >= 500 {
		span.SetStatus(codes.Error, http.StatusText(status))
	}
	span.End()
}

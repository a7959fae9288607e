package beaconhttp

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"beacon.dev/beacon/balancer"
	"beacon.dev/beacon/balancer/p2c"
	"beacon.dev/beacon/discovery"
	"beacon.dev/beacon/outlier"
	"beacon.dev/beacon/policy"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/tracing"
)

// DefaultMaxReplay bounds the request body kept to replay on a retry.
const DefaultMaxReplay = 1 << 20

// Option configures a Transport.
type Option func(*Transport)

// WithBase sets the transport that carries the requests to the chosen
// instance (default: a clone of http.DefaultTransport).
func WithBase(rt http.RoundTripper) Option { return func(t *Transport) { t.base = rt } }

// WithBalancer chooses the algorithm and routing (default P2C, no routing
// options).
func WithBalancer(b balancer.Builder, cfg balancer.Config) Option {
	return func(t *Transport) { t.builder, t.balCfg = b, cfg }
}

// WithOutlierDetection tunes ejection (default outlier.DefaultConfig).
func WithOutlierDetection(cfg outlier.Config) Option {
	return func(t *Transport) { t.outlierCfg = cfg }
}

// WithRetry tunes retries (default policy.DefaultRetry with a
// policy.DefaultBudget per service).
func WithRetry(cfg policy.RetryConfig) Option { return func(t *Transport) { t.retry = cfg } }

// WithBreaker gives every service a circuit breaker with this config.
func WithBreaker(cfg policy.BreakerConfig) Option {
	return func(t *Transport) { t.breakerCfg = &cfg }
}

// WithPolicies adds executor options (timeouts, bulkhead, rate limit,
// fallback) for every service. The timeouts (policy.WithTimeout,
// policy.WithPerTryTimeout) cover reading the response body too, as
// http.Client.Timeout does: the attempt's context ends when the body is
// read to the end or closed, or when a timeout expires.
func WithPolicies(opts ...policy.Option) Option {
	return func(t *Transport) { t.extra = append(t.extra, opts...) }
}

// WithServices lets requests whose host is one of these service names
// (http://orders/…) go to the service's instances.
func WithServices(names ...string) Option {
	return func(t *Transport) {
		for _, n := range names {
			t.allowed[n] = true
		}
	}
}

// WithServiceSuffix lets a request to NAME+suffix (with suffix ".svc",
// http://orders.svc/…) go to the instances of service NAME, whatever NAME
// is. The suffix starts with a dot.
func WithServiceSuffix(suffix string) Option { return func(t *Transport) { t.suffix = suffix } }

// WithTracing records each request to a service as a span of tp's tracer
// (tracing.SpanCall, ended when the response headers arrive), each attempt
// — retries — as a child span (tracing.SpanAttempt) with the endpoint the
// balancer picked and why, and the policies' refusals as events (package
// tracing lists them). Attempts run in their span's context: with an
// otelhttp transport as the base (WithBase(otelhttp.NewTransport(…))),
// its client span nests under the attempt and its W3C trace context goes
// to the instance. nil tp, or no option: nothing is recorded.
func WithTracing(tp trace.TracerProvider) Option {
	return func(t *Transport) { t.tracer = tracing.Tracer(tp, "beacon.dev/beacon/beaconhttp") }
}

// WithConfigChanges marks, with WithTracing, the first request after each
// change of the watched configuration values (config.Binding) with the
// value's key and revision (tracing.EventConfigChange on the call span).
func WithConfigChanges(c *tracing.ConfigChanges) Option {
	return func(t *Transport) { t.config = c }
}

// WithMaxReplay bounds the request body buffered for retries (default
// 1 MiB). A larger body is streamed once and never retried.
func WithMaxReplay(n int64) Option { return func(t *Transport) { t.maxReplay = n } }

// Transport is an http.RoundTripper for service names. A request whose
// host, without a port, is a service the transport was told about
// (WithServices, WithServiceSuffix) goes to an instance of that service;
// any other request goes to the base transport unchanged. Only those hosts:
// each service followed costs a balancer, a goroutine and a place in the
// discovery cache's watch, and URLs often come from users. Safe for
// concurrent use.
type Transport struct {
	allowed    map[string]bool // hosts that are services
	suffix     string          // NAME+suffix is service NAME
	cache      *discovery.Cache
	base       http.RoundTripper
	builder    balancer.Builder
	balCfg     balancer.Config
	outlierCfg outlier.Config
	retry      policy.RetryConfig
	breakerCfg *policy.BreakerConfig
	extra      []policy.Option
	maxReplay  int64
	tracer     trace.Tracer // nil: no tracing
	config     *tracing.ConfigChanges
	ctx        context.Context
	stop       context.CancelFunc
	wg         sync.WaitGroup

	mu       sync.Mutex
	services map[string]*service // guarded by mu
	closed   bool                // guarded by mu
	followed sync.Map            // name -> *service: services' lock-free read path
}

type service struct {
	bal  *balancer.Balancer
	exec *policy.Executor
	sub  *discovery.Subscription

	tlsMu sync.Mutex
	tls   *http.Transport // guarded by tlsMu; for https://SERVICE, verifies the service name
}

// tlsTransport returns the transport for https requests to the service:
// a clone of base whose TLS ServerName is the service name (unless base
// sets one), since the URL now carries the instance's address and a
// certificate names the service, not each instance's IP.
func (s *service) tlsTransport(base http.RoundTripper, name string) (*http.Transport, error) {
	s.tlsMu.Lock()
	defer s.tlsMu.Unlock()
	if s.tls != nil {
		return s.tls, nil
	}
	bt, ok := base.(*http.Transport)
	if !ok {
		return nil, fmt.Errorf("beaconhttp: https://%s needs an *http.Transport as base (WithBase) to set the TLS server name; have %T", name, base)
	}
	t := bt.Clone()
	if t.TLSClientConfig == nil {
		t.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	if t.TLSClientConfig.ServerName == "" {
		t.TLSClientConfig.ServerName = name
	}
	s.tls = t
	return t, nil
}

func (s *service) close() {
	s.sub.Close()
	s.bal.Close()
	s.tlsMu.Lock()
	defer s.tlsMu.Unlock()
	if s.tls != nil {
		s.tls.CloseIdleConnections()
	}
}

// NewTransport returns a transport resolving names through cache. Close
// it to stop following services.
func NewTransport(cache *discovery.Cache, opts ...Option) (*Transport, error) {
	t := &Transport{cache: cache, builder: p2c.Builder{}, maxReplay: DefaultMaxReplay, services: make(map[string]*service), allowed: map[string]bool{}}
	for _, o := range opts {
		o(t)
	}
	for n := range t.allowed {
		if err := registry.ValidateName("WithServices", n); err != nil {
			return nil, fmt.Errorf("beaconhttp: %w", err)
		}
	}
	if t.suffix != "" && (!strings.HasPrefix(t.suffix, ".") || len(t.suffix) < 2 || strings.ContainsAny(t.suffix, ":/ ")) {
		return nil, fmt.Errorf("beaconhttp: invalid WithServiceSuffix %q: a dot and a domain, like .svc", t.suffix)
	}
	if len(t.allowed) == 0 && t.suffix == "" {
		return nil, errors.New("beaconhttp: no service hosts: say which hosts are services with WithServices or WithServiceSuffix")
	}
	if t.base == nil {
		t.base = DefaultBase()
	}
	if t.maxReplay < 0 {
		return nil, fmt.Errorf("beaconhttp: max replay %d must not be negative", t.maxReplay)
	}
	// Validate the per-service configuration once, up front.
	if _, err := t.newService(""); err != nil {
		return nil, err
	}
	t.ctx, t.stop = context.WithCancel(context.Background())
	return t, nil
}

// DefaultBase returns the transport used when WithBase is not given:
// http.DefaultTransport's settings, but keeping up to 100 idle
// connections per instance (Go's default keeps 2, so that 16 concurrent
// callers open and close a connection on most calls to a service).
func DefaultBase() *http.Transport {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.MaxIdleConns = 1000
	t.MaxIdleConnsPerHost = 100
	return t
}

// Close stops following services. Requests in flight finish.
func (t *Transport) Close() {
	t.mu.Lock()
	t.closed = true
	services := t.services
	t.services = map[string]*service{}
	t.followed.Clear()
	t.mu.Unlock()
	t.stop()
	t.wg.Wait()
	for _, s := range services {
		s.close()
	}
}

// newService builds a balancer and an executor; with an empty name it only
// validates the options.
func (t *Transport) newService(name string) (*service, error) {
	bal, err := balancer.New(t.builder, t.balCfg, balancer.WithOutlierDetection(t.outlierCfg, outlier.WithName(name)))
	if err != nil {
		return nil, err
	}
	retry := t.retry
	if retry.Budget == nil {
		retry.Budget, _ = policy.NewBudget(policy.DefaultBudget)
	}
	opts := []policy.Option{policy.WithRetry(retry)}
	if t.breakerCfg != nil {
		br, err := policy.NewBreaker(*t.breakerCfg)
		if err != nil {
			bal.Close()
			return nil, err
		}
		opts = append(opts, policy.WithBreaker(br))
	}
	exec, err := policy.New(append(opts, t.extra...)...)
	if err != nil {
		bal.Close()
		return nil, err
	}
	if name == "" {
		bal.Close()
		return nil, nil
	}
	return &service{bal: bal, exec: exec}, nil
}

// service returns the state for a service name, following it on first use.
func (t *Transport) service(name string) (*service, error) {
	if s, ok := t.followed.Load(name); ok { // every call but the first
		return s.(*service), nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, errors.New("beaconhttp: transport closed")
	}
	if s, ok := t.services[name]; ok {
		return s, nil
	}
	s, err := t.newService(name)
	if err != nil {
		return nil, err
	}
	if s.sub, err = t.cache.Subscribe(name); err != nil {
		s.bal.Close()
		return nil, err
	}
	s.bal.Update(s.sub.Endpoints())
	t.wg.Add(1)
	go func() { // owned by the transport: ends with Close
		defer t.wg.Done()
		_ = s.bal.Run(t.ctx, s.sub)
	}()
	t.services[name] = s
	t.followed.Store(name, s)
	return s, nil
}

// serviceOf returns the service a request host names, if the transport
// routes it.
func (t *Transport) serviceOf(u *url.URL) (string, bool) {
	if u == nil || u.Port() != "" {
		return "", false
	}
	host := u.Hostname()
	if t.allowed[host] {
		return host, true
	}
	if t.suffix != "" && strings.HasSuffix(host, t.suffix) {
		name := strings.TrimSuffix(host, t.suffix)
		return name, registry.ValidateName("service", name) == nil
	}
	return "", false
}

// errStatus carries a retryable HTTP status through the retry loop.
type errStatus struct{ code int }

func (e *errStatus) Error() string { return "beaconhttp: status " + strconv.Itoa(e.code) }

// RoundTrip implements http.RoundTripper.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	name, ok := t.serviceOf(req.URL)
	if !ok {
		return t.base.RoundTrip(req)
	}
	rt := t.base
	if req.URL.Scheme == "https" {
		svc, err := t.service(name)
		if err != nil {
			return nil, err
		}
		if rt, err = svc.tlsTransport(t.base, req.URL.Hostname()); err != nil {
			return nil, err
		}
	}
	replay, err := t.replayable(req)
	if err != nil {
		return nil, err
	}
	var last *http.Response
	status, release, err := t.Call(req.Context(), name, replay && idempotent(req), func(ctx context.Context, ep balancer.Pick) (int, error) {
		if last != nil { // a retried 5xx: its body is not returned
			drain(last)
			last = nil
		}
		// A shallow copy with its own URL: the base transport reads the
		// headers and does not change them, so they need no deep copy.
		out := req.WithContext(ctx)
		u := *req.URL
		u.Host = ep.Addr
		out.URL = &u
		out.Host = req.Host
		if out.Host == "" {
			out.Host = name
		}
		if replay && req.GetBody != nil {
			var err error
			if out.Body, err = req.GetBody(); err != nil {
				return 0, Local(err)
			}
		}
		resp, err := rt.RoundTrip(out)
		if err != nil {
			return 0, Classify(err, replay)
		}
		last = resp
		return resp.StatusCode, nil
	}, attribute.String("http.request.method", req.Method))
	if err != nil {
		if last != nil {
			drain(last)
		}
		release()
		return nil, fmt.Errorf("beaconhttp: %s %s: %w", req.Method, req.URL, err)
	}
	if status == 0 { // a fallback answered the error without a response
		if last != nil { // an earlier attempt's, retried
			drain(last)
		}
		release()
		return nil, fmt.Errorf("beaconhttp: %s %s: the fallback gave no response", req.Method, req.URL)
	}
	return hold(last, release), nil
}

// Local marks an attempt's failure as the caller's own — a request body
// that could not be read again, a caller shutting down — not the
// instance's: outlier ejection does not count it against the instance,
// and the call is not retried. (A circuit breaker still counts it: it
// judges calls, not instances.)
func Local(err error) error { return policy.Permanent(&localError{err}) }

type localError struct{ err error }

func (e *localError) Error() string { return e.err.Error() }
func (e *localError) Unwrap() error { return e.err }

// Attempt is one try of a call, sent to the instance ep the balancer
// picked. It reports the status of the response it got, or an error when
// none came, marked for the retry policy (Classify). An attempt that is
// retried must let go of its response itself, when the next one starts.
type Attempt func(ctx context.Context, ep balancer.Pick) (status int, err error)

// Call runs attempt against the instances of service under the
// transport's policies, as RoundTrip does for an *http.Request: the
// balancer picks each attempt's instance (a retry avoids the previous
// one), outcomes feed outlier ejection (a 5xx is a failure), a 502, 503 or
// 504 is retried while the policy allows, the breaker and the retry budget
// apply, and with WithTracing the call and its attempts are spans
// (attrs go on the call's). For a caller that speaks HTTP to the
// instances itself — beacon proxy's HTTP/1.1 path — or any protocol whose
// outcome is a status. idempotent lets a failure after sending be
// retried; an unsent one (Classify) always may be.
//
// Call returns nil when the last attempt got a response, even a 5xx the
// retries could not get past; status is that response's, or 0 when the
// last attempt got none (a fallback policy answered the error). release
// ends the attempt's context and its timeouts (WithPolicies): call it
// once done with the response, whatever the error.
func (t *Transport) Call(ctx context.Context, service string, idempotent bool, attempt Attempt, attrs ...attribute.KeyValue) (status int, release context.CancelFunc, err error) {
	svc, err := t.service(service)
	if err != nil {
		return 0, noop, err
	}
	kind := policy.NotIdempotent
	if idempotent {
		kind = policy.Idempotent
	}
	var tried string // the previous attempt's endpoint: retries go elsewhere
	var span trace.Span
	attempts := 0
	if t.tracer != nil {
		ctx, span = tracing.StartCall(ctx, t.tracer, idempotent, append(attrs, attribute.String("server.address", service))...)
		t.config.Record(span)
	}
	// DoHold, not Do: the response is read after the call returns, and the
	// timeouts must keep running, not cancel, while its body is read.
	release, err = svc.exec.DoHold(ctx, kind, func(ctx context.Context) (err error) {
		status = 0
		if t.tracer != nil {
			attempts++
			var aspan trace.Span
			ctx, aspan = tracing.StartAttempt(ctx, t.tracer, attempts, 0)
			defer func() { endAttempt(aspan, status, err) }()
		}
		ep, err := svc.bal.Pick(balancer.PickInfo{Avoid: tried})
		if err != nil {
			return policy.Unsent(err)
		}
		tried = ep.ID
		if t.tracer != nil {
			tracing.RecordPick(ctx, svc.bal.Name(), ep)
		}
		if status, err = attempt(ctx, ep); err != nil {
			status = 0
			var local *localError
			if errors.As(err, &local) {
				ep.Done(nil)
			} else {
				t.done(ctx, svc.bal, ep, err)
			}
			return err
		}
		if status >= 500 {
			t.done(ctx, svc.bal, ep, &errStatus{status})
		} else {
			ep.Done(nil)
		}
		if retryableStatus(status) {
			return policy.Retryable(&errStatus{status})
		}
		return nil
	})
	// Retries exhausted on a 5xx: the caller hands on its response.
	var es *errStatus
	exhausted := err != nil && errors.As(err, &es) && status != 0
	if span != nil {
		code := ""
		switch {
		case err != nil && errors.As(err, &es): // the last try's 5xx
			code = strconv.Itoa(es.code)
		case err != nil:
			code = "error"
		}
		tracing.EndCall(span, err, code)
	}
	if exhausted {
		err = nil
	} else if err != nil {
		status = 0
	}
	return status, release, err
}

func noop() {}

// endAttempt records an attempt's outcome on its span: the status of
// its response, or 0 when none came.
func endAttempt(span trace.Span, status int, err error) {
	switch {
	case status >= 500:
		tracing.EndAttempt(span, "error", strconv.Itoa(status), attribute.Int("http.response.status_code", status))
	case status > 0:
		tracing.EndAttempt(span, "ok", "", attribute.Int("http.response.status_code", status))
	default:
		tracing.EndAttempt(span, "error", "no response")
	}
}

// hold leaves the attempt's context, with its timeouts, alive while the
// caller reads resp's body, as http.Client does for its Timeout: reading
// to the end (or to an error) or closing the body releases it. A response
// without a body releases it at once, and so does a 101 Switching
// Protocols: its body is the upgraded connection, which the base
// transport hands over (an io.ReadWriteCloser) and the timeouts do not
// govern.
func hold(resp *http.Response, release context.CancelFunc) *http.Response {
	if resp.Body == nil || resp.Body == http.NoBody || resp.StatusCode == http.StatusSwitchingProtocols {
		release()
		return resp
	}
	resp.Body = &heldBody{rc: resp.Body, release: release}
	return resp
}

// heldBody releases the attempt's context when the body is done with.
// release is a context.CancelFunc or a pair of them: safe to call more
// than once and concurrently.
type heldBody struct {
	rc      io.ReadCloser
	release context.CancelFunc
}

func (b *heldBody) Read(p []byte) (int, error) {
	n, err := b.rc.Read(p)
	if err != nil { // io.EOF, or the body failed: the context has served
		b.release()
	}
	return n, err
}

func (b *heldBody) Close() error {
	err := b.rc.Close()
	b.release()
	return err
}

// replayable makes the body replayable within the bound. It reports false
// when the body is too large to keep: the request then goes once.
func (t *Transport) replayable(req *http.Request) (bool, error) {
	if req.Body == nil || req.Body == http.NoBody || req.GetBody != nil {
		return true, nil
	}
	buf, err := io.ReadAll(io.LimitReader(req.Body, t.maxReplay+1))
	if err != nil {
		return false, fmt.Errorf("beaconhttp: reading request body: %w", err)
	}
	if int64(len(buf)) > t.maxReplay {
		// Too large: send what was read followed by the rest, once.
		rest := req.Body
		req.Body = struct {
			io.Reader
			io.Closer
		}{io.MultiReader(bytes.NewReader(buf), rest), rest}
		return false, nil
	}
	req.Body.Close()
	req.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(buf)), nil }
	req.Body, _ = req.GetBody()
	return true, nil
}

// idempotent follows RFC 9110 §9.2.2, plus requests that carry an
// Idempotency-Key header (the IETF httpapi draft): the caller vouches for
// them.
func idempotent(req *http.Request) bool {
	switch req.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace, http.MethodPut, http.MethodDelete:
		return true
	}
	return req.Header.Get("Idempotency-Key") != ""
}

func retryableStatus(code int) bool {
	return code == http.StatusBadGateway || code == http.StatusServiceUnavailable || code == http.StatusGatewayTimeout
}

// Classify marks an attempt's transport error for the retry policy: a
// refused connection never reached the instance (policy.Unsent: any call
// may go elsewhere); a reset, an early end or a timeout is worth another
// try of an idempotent call; other errors are not. A request whose body
// could not be replayed (sent is spent) is retried only when unsent.
func Classify(err error, replayable bool) error {
	if !replayable && !errors.Is(err, syscall.ECONNREFUSED) {
		return policy.Permanent(err) // the body is spent
	}
	if errors.Is(err, syscall.ECONNREFUSED) {
		return policy.Unsent(err)
	}
	var ne net.Error
	if errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || (errors.As(err, &ne) && ne.Timeout()) {
		return policy.Retryable(err)
	}
	return err
}

// drain reads a little of a discarded response so its connection can be
// reused, then closes it.
func drain(resp *http.Response) {
	_, _ = io.CopyN(io.Discard, resp.Body, 64<<10)
	resp.Body.Close()
}

// done reports an attempt's failure to its endpoint; traced, an ejection
// it caused (or one beside it: the detector does not say which failure
// tipped it) becomes an event on the attempt's span, as in beacongrpc.
func (t *Transport) done(ctx context.Context, bal *balancer.Balancer, ep balancer.Pick, failure error) {
	d := bal.Outlier()
	if t.tracer == nil || d == nil {
		ep.Done(failure)
		return
	}
	was := d.Ejected(ep.ID)
	ep.Done(failure)
	if !was && d.Ejected(ep.ID) {
		tracing.RecordEjection(ctx, ep.ID)
	}
}

package beaconhttp_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"beacon.dev/beacon/balancer"
	"beacon.dev/beacon/balancer/roundrobin"
	"beacon.dev/beacon/beaconhttp"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/discovery"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/outlier"
	"beacon.dev/beacon/policy"
	"beacon.dev/beacon/registry"
)

// backend is a real HTTP server on 127.0.0.1 that answers with its name,
// or with the status in fail while fail is set.
type backend struct {
	name   string
	srv    *http.Server
	ln     net.Listener
	port   int
	hits   atomic.Int64
	fail   atomic.Int64 // HTTP status to answer with; 0: 200
	mu     sync.Mutex
	bodies []string
}

func startBackend(t *testing.T, name string) *backend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &backend{name: name, ln: ln, port: ln.Addr().(*net.TCPAddr).Port}
	b.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b.hits.Add(1)
		body, _ := io.ReadAll(r.Body)
		b.mu.Lock()
		b.bodies = append(b.bodies, string(body))
		b.mu.Unlock()
		if code := b.fail.Load(); code != 0 {
			w.WriteHeader(int(code))
			return
		}
		fmt.Fprintf(w, "%s %s %s", b.name, r.Host, body)
	})}
	go b.srv.Serve(ln)
	t.Cleanup(func() { b.stop() })
	return b
}

func (b *backend) stop() { b.srv.Close() }

type env struct {
	ctx   context.Context
	c     *client.Client
	cache *discovery.Cache
	proxy *testutil.Proxy
}

func newEnv(t testing.TB) *env {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	t.Cleanup(cancel)
	srv := testutil.StartBeacon(t)
	proxy := testutil.NewProxy(t, srv.Addr())
	c, err := client.New([]string{proxy.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	cache, err := discovery.New(discovery.FromClient(c, ""), discovery.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cache.Close)
	return &env{ctx: ctx, c: c, cache: cache, proxy: proxy}
}

func (e *env) register(t testing.TB, service string, backends ...*backend) {
	t.Helper()
	sub, err := e.cache.Subscribe(service) // follow it, as the transport will
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sub.Close)
	for _, b := range backends {
		if _, err := e.c.Register(e.ctx, registry.Instance{Service: service, ID: b.name, Address: "127.0.0.1", Port: b.port}); err != nil {
			t.Fatal(err)
		}
	}
	testutil.Eventually(t, 20*time.Second, "cache sees "+service, func() bool {
		set, _ := e.cache.Endpoints(service)
		return len(set.Endpoints) == len(backends)
	})
}

func newTransport(t *testing.T, e *env, opts ...beaconhttp.Option) *http.Client {
	t.Helper()
	opts = append([]beaconhttp.Option{beaconhttp.WithRetry(policy.RetryConfig{MaxAttempts: 3, BaseBackoff: time.Millisecond}),
		beaconhttp.WithServices("echo", "pay", "upload", "secure")}, opts...)
	tr, err := beaconhttp.NewTransport(e.cache, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tr.Close)
	return &http.Client{Transport: tr, Timeout: 20 * time.Second}
}

func get(t *testing.T, hc *http.Client, url string) (int, string) {
	t.Helper()
	resp, err := hc.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

func TestSpreadsOverInstancesAndKeepsTheHost(t *testing.T) {
	e := newEnv(t)
	bs := []*backend{startBackend(t, "a"), startBackend(t, "b"), startBackend(t, "c")}
	e.register(t, "echo", bs...)
	hc := newTransport(t, e)
	for range 300 {
		code, body := get(t, hc, "http://echo/hello")
		if code != 200 || !strings.Contains(body, " echo ") {
			t.Fatalf("GET http://echo/ = %d %q, want 200 from an instance, Host echo", code, body)
		}
	}
	for _, b := range bs {
		if b.hits.Load() == 0 {
			t.Errorf("backend %s got no request of 300", b.name)
		}
	}
}

func TestKilledInstanceCostsNoFailedRequest(t *testing.T) {
	e := newEnv(t)
	bs := []*backend{startBackend(t, "a"), startBackend(t, "b"), startBackend(t, "c")}
	e.register(t, "echo", bs...)
	tr, err := beaconhttp.NewTransport(e.cache, beaconhttp.WithRetry(policy.RetryConfig{MaxAttempts: 3, BaseBackoff: time.Millisecond}),
		beaconhttp.WithOutlierDetection(outlier.Config{ConsecutiveFailures: 2}), beaconhttp.WithServices("echo"))
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	hc := &http.Client{Transport: tr, Timeout: 20 * time.Second}
	for range 30 {
		get(t, hc, "http://echo/")
	}
	bs[0].stop() // gone, still registered
	before := bs[1].hits.Load() + bs[2].hits.Load()
	for i := range 300 {
		if code, body := get(t, hc, "http://echo/"); code != 200 {
			t.Fatalf("request %d after the kill = %d %q, want 200", i, code, body)
		}
	}
	if got := bs[1].hits.Load() + bs[2].hits.Load() - before; got != 300 {
		t.Errorf("survivors served %d of 300", got)
	}
}

func TestRetriesFollowIdempotency(t *testing.T) {
	e := newEnv(t)
	down, up := startBackend(t, "down"), startBackend(t, "up")
	down.fail.Store(503)
	e.register(t, "pay", down, up)
	// Round robin, so that first attempts reach the failing instance half
	// the time; outlier detection off, so that it keeps failing.
	hc := newTransport(t, e, beaconhttp.WithBalancer(roundrobin.Builder{}, balancer.Config{}),
		beaconhttp.WithOutlierDetection(outlier.Config{ConsecutiveFailures: -1, FailureRate: -1}))

	// GET: a 503 is retried on the other instance.
	for range 20 {
		if code, _ := get(t, hc, "http://pay/"); code != 200 {
			t.Fatalf("GET = %d, want 200 after a retry", code)
		}
	}
	// POST without an idempotency key: a 503 is returned, not retried.
	got503 := false
	for range 20 {
		resp, err := hc.Post("http://pay/charge", "text/plain", strings.NewReader("one charge"))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		got503 = got503 || resp.StatusCode == 503
	}
	if !got503 {
		t.Error("20 POSTs never saw the 503: a non-idempotent request was retried")
	}
	// POST with an idempotency key: retried, and the body replayed intact.
	for i := range 20 {
		req, _ := http.NewRequest("POST", "http://pay/charge", strings.NewReader("charge-"+strconv.Itoa(i)))
		req.Header.Set("Idempotency-Key", "k-"+strconv.Itoa(i))
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || !strings.HasSuffix(string(body), "charge-"+strconv.Itoa(i)) {
			t.Fatalf("keyed POST = %d %q, want 200 echoing its body", resp.StatusCode, body)
		}
	}
}

func TestLargeBodiesGoOnceAndIntact(t *testing.T) {
	e := newEnv(t)
	down, up := startBackend(t, "down"), startBackend(t, "up")
	down.fail.Store(503)
	e.register(t, "upload", down, up)
	hc := newTransport(t, e, beaconhttp.WithMaxReplay(16), beaconhttp.WithBalancer(roundrobin.Builder{}, balancer.Config{}),
		beaconhttp.WithOutlierDetection(outlier.Config{ConsecutiveFailures: -1, FailureRate: -1}))
	big := strings.Repeat("x", 1000)
	codes := map[int]int{}
	for range 20 {
		req, _ := http.NewRequest("PUT", "http://upload/f", io.NopCloser(strings.NewReader(big))) // no GetBody
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		codes[resp.StatusCode]++
	}
	if codes[503] == 0 || codes[200] == 0 {
		t.Errorf("status counts %v: a PUT over the replay bound must go once (some 503s) and intact", codes)
	}
	up.mu.Lock()
	defer up.mu.Unlock()
	for _, b := range up.bodies {
		if b != big {
			t.Fatalf("a body arrived with %d bytes, want %d", len(b), len(big))
		}
	}
}

func TestRegistryOutageAfterWarmUp(t *testing.T) {
	e := newEnv(t)
	bs := []*backend{startBackend(t, "a"), startBackend(t, "b")}
	e.register(t, "echo", bs...)
	hc := newTransport(t, e)
	get(t, hc, "http://echo/")
	e.proxy.SetDown(true)
	e.proxy.Cut()
	testutil.Eventually(t, 20*time.Second, "cache notices the outage", func() bool { return e.cache.Status().Stale > 0 })
	for i := range 100 {
		if code, _ := get(t, hc, "http://echo/"); code != 200 {
			t.Fatalf("request %d during the registry outage = %d", i, code)
		}
	}
}

func TestOtherHostsPassThrough(t *testing.T) {
	e := newEnv(t)
	b := startBackend(t, "direct")
	hc := newTransport(t, e)
	code, body := get(t, hc, fmt.Sprintf("http://127.0.0.1:%d/", b.port))
	if code != 200 || !strings.HasPrefix(body, "direct") {
		t.Errorf("direct GET = %d %q", code, body)
	}
}

// recorder answers every request itself and remembers the hosts asked.
type recorder struct {
	mu    sync.Mutex
	hosts []string
}

func (r *recorder) RoundTrip(req *http.Request) (*http.Response, error) {
	r.mu.Lock()
	r.hosts = append(r.hosts, req.URL.Host)
	r.mu.Unlock()
	return &http.Response{StatusCode: http.StatusOK, Body: http.NoBody, Header: http.Header{}, Request: req}, nil
}

// Only the hosts the transport was told about are services: any other
// host — a user-supplied URL, say — goes to the base transport as it is,
// and follows nothing.
func TestOnlyAllowedHostsAreServices(t *testing.T) {
	e := newEnv(t)
	b := startBackend(t, "echo")
	e.register(t, "echo", b)
	rec := &recorder{}
	tr, err := beaconhttp.NewTransport(e.cache, beaconhttp.WithBase(rec), beaconhttp.WithServices("echo"), beaconhttp.WithServiceSuffix(".svc"))
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	before := e.cache.Status().Services
	instance := fmt.Sprintf("127.0.0.1:%d", b.port)
	for _, tc := range []struct{ url, wantHost string }{
		{"http://echo/", instance},
		{"http://echo.svc/", instance},
		{"http://postgres/", "postgres"},
		{"http://Echo.svc/", "Echo.svc"},
		{"http://echo:80/", "echo:80"},
		{"http://.svc/", ".svc"},
		{"http://a.b.svc/", "a.b.svc"},
	} {
		rec.mu.Lock()
		rec.hosts = nil
		rec.mu.Unlock()
		req, _ := http.NewRequest(http.MethodGet, tc.url, nil)
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Errorf("GET %s: %v", tc.url, err)
			continue
		}
		resp.Body.Close()
		rec.mu.Lock()
		if len(rec.hosts) != 1 || rec.hosts[0] != tc.wantHost {
			t.Errorf("GET %s reached %v, want %s", tc.url, rec.hosts, tc.wantHost)
		}
		rec.mu.Unlock()
	}
	// A thousand user-chosen single-label hosts follow nothing.
	for i := range 1000 {
		req, _ := http.NewRequest(http.MethodGet, fmt.Sprintf("http://host-%d/", i), nil)
		if resp, err := tr.RoundTrip(req); err == nil {
			resp.Body.Close()
		}
	}
	if got := e.cache.Status().Services; got > before+1 {
		t.Errorf("the cache follows %d services (%d before), want at most echo added", got, before)
	}

	for _, opts := range [][]beaconhttp.Option{
		nil,
		{beaconhttp.WithServices("Bad!")},
		{beaconhttp.WithServiceSuffix("svc")},
	} {
		if _, err := beaconhttp.NewTransport(e.cache, opts...); err == nil {
			t.Errorf("NewTransport(%d options) accepted a transport with no valid service hosts", len(opts))
		}
	}
}

// Call is RoundTrip's policy loop for callers that speak HTTP themselves:
// a 503 goes to the other instance, a refused dial too (even for a
// non-idempotent call: nothing was sent), and a 5xx the retries cannot
// get past comes back as the last attempt's status, not an error.
func TestCallRetriesElsewhereAndHandsBackTheLastStatus(t *testing.T) {
	e := newEnv(t)
	a, b := startBackend(t, "a"), startBackend(t, "b")
	e.register(t, "echo", a, b)
	tr, err := beaconhttp.NewTransport(e.cache, beaconhttp.WithServices("echo"),
		beaconhttp.WithRetry(policy.RetryConfig{MaxAttempts: 2, BaseBackoff: time.Millisecond}),
		beaconhttp.WithOutlierDetection(outlier.Config{ConsecutiveFailures: -1, FailureRate: -1}))
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	call := func(idempotent bool, answer func(addr string) (int, error)) (addrs []string, err error) {
		_, release, err := tr.Call(e.ctx, "echo", idempotent, func(ctx context.Context, ep balancer.Pick) (int, error) {
			addrs = append(addrs, ep.Addr)
			return answer(ep.Addr)
		})
		release()
		return addrs, err
	}
	aAddr := fmt.Sprintf("127.0.0.1:%d", a.port)
	// a answers 503: a call starting there is retried on b.
	for range 10 {
		addrs, err := call(true, func(addr string) (int, error) {
			if addr == aAddr {
				return 503, nil
			}
			return 200, nil
		})
		if err != nil || (len(addrs) == 2 && addrs[0] == addrs[1]) || len(addrs) > 2 {
			t.Fatalf("attempts %v, err %v: want at most 2, a retry on the other instance, no error", addrs, err)
		}
	}
	// A refused dial is unsent: even a non-idempotent call goes on.
	tries := 0
	addrs, err := call(false, func(addr string) (int, error) {
		if tries++; tries == 1 {
			return 0, beaconhttp.Classify(&net.OpError{Op: "dial", Err: syscall.ECONNREFUSED}, false)
		}
		return 200, nil
	})
	if err != nil || len(addrs) != 2 {
		t.Fatalf("refused then answered: attempts %v, err %v; want 2 attempts, no error", addrs, err)
	}
	// A reset after sending a non-idempotent call: not retried.
	addrs, err = call(false, func(string) (int, error) {
		return 0, beaconhttp.Classify(syscall.ECONNRESET, true)
	})
	if err == nil || len(addrs) != 1 {
		t.Fatalf("reset non-idempotent call: attempts %v, err %v; want 1 attempt and the error", addrs, err)
	}
	// Both answer 503: the last status comes back, no error.
	addrs, err = call(true, func(string) (int, error) { return 503, nil })
	if err != nil || len(addrs) != 2 {
		t.Fatalf("503 everywhere: attempts %v, err %v; want 2 attempts and no error (the caller hands on the 503)", addrs, err)
	}
	// A spent body is never retried after a reset.
	if err := beaconhttp.Classify(syscall.ECONNRESET, false); policy.IsRetryable(err) {
		t.Errorf("Classify(reset, not replayable) = %v, retryable; want permanent", err)
	}
}

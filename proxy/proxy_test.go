package proxy_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"beacon.dev/beacon/internal/chisq"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/proxy"
)

func TestProxyRoutesByHostPathAndHeader(t *testing.T) {
	e := newEnv(t)
	var seen atomic.Pointer[http.Request]
	e.backend("alpha", "alpha-1", "", nil)
	e.backend("beta", "beta-1", "", func(w http.ResponseWriter, r *http.Request) {
		seen.Store(r)
		fmt.Fprintf(w, "beta-1 %s", r.URL.Path)
	})
	e.backend("gamma", "gamma-1", "", nil)
	addr := testutil.FreeAddr(t)
	_, base, _ := e.startProxy(fmt.Sprintf(`
listeners:
  - {name: edge, addr: %q}
routes:
  - {name: canary-header, match: {headers: {X-Canary: "1"}}, service: gamma}
  - {name: api-beta, match: {host: api.example.com, pathPrefix: /beta/}, stripPrefix: true, service: beta}
  - {name: alpha, match: {pathPrefix: /alpha}, service: alpha}
`, addr))
	hc := &http.Client{Timeout: 10 * time.Second}
	waitServing(t, hc, base+"/alpha", nil, "alpha-1")
	for _, tc := range []struct {
		path string
		hdr  map[string]string
		code int
		body string
	}{
		{"/alpha/x", nil, 200, "alpha-1"},
		{"/alpha/x", map[string]string{"X-Canary": "1"}, 200, "gamma-1"},
		{"/beta/orders/7", map[string]string{"Host": "api.example.com:8080"}, 200, "beta-1 /orders/7"},
		{"/beta/orders/7", map[string]string{"Host": "other.example.com"}, 404, ""},
		{"/nothing", nil, 404, ""},
	} {
		code, body := get(t, hc, base+tc.path, tc.hdr)
		if code != tc.code || (tc.body != "" && body != tc.body) {
			t.Errorf("GET %s %v = %d %q, want %d %q", tc.path, tc.hdr, code, body, tc.code, tc.body)
		}
	}
	r := seen.Load()
	if r == nil {
		t.Fatal("beta saw no request")
	}
	if got := r.Header.Get("X-Forwarded-For"); got != "127.0.0.1" {
		t.Errorf("X-Forwarded-For = %q, want 127.0.0.1", got)
	}
	if got := r.Header.Get("X-Forwarded-Host"); got != "api.example.com:8080" {
		t.Errorf("X-Forwarded-Host = %q, want api.example.com:8080", got)
	}
	if got := r.Header.Get("X-Forwarded-Proto"); got != "http" {
		t.Errorf("X-Forwarded-Proto = %q, want http", got)
	}
	if r.Host != "api.example.com:8080" {
		t.Errorf("Host = %q, want the client's api.example.com:8080", r.Host)
	}
}

// Hop-by-hop headers stop at the proxy; a streamed body goes through.
func TestProxyHopByHopAndStreaming(t *testing.T) {
	e := newEnv(t)
	var hdr atomic.Pointer[http.Header]
	e.backend("stream", "stream-1", "", func(w http.ResponseWriter, r *http.Request) {
		h := r.Header.Clone()
		hdr.Store(&h)
		n, _ := io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "%d", n)
	})
	addr := testutil.FreeAddr(t)
	_, base, _ := e.startProxy(fmt.Sprintf("listeners:\n  - {name: edge, addr: %q}\nroutes:\n  - {name: s, service: stream}\n", addr))
	hc := &http.Client{Timeout: 10 * time.Second}
	waitServing(t, hc, base+"/", nil, "0")
	pr, pw := io.Pipe()
	go func() {
		for range 100 {
			pw.Write(make([]byte, 10<<10))
		}
		pw.Close()
	}()
	req, _ := http.NewRequest(http.MethodPost, base+"/up", pr)
	req.Header.Set("Connection", "keep-alive, X-Secret")
	req.Header.Set("X-Secret", "hop")
	req.Header.Set("Proxy-Authorization", "Basic eA==")
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != fmt.Sprint(100*10<<10) {
		t.Errorf("streamed body: backend read %s bytes, want %d", b, 100*10<<10)
	}
	h := *hdr.Load()
	for _, k := range []string{"X-Secret", "Proxy-Authorization", "Connection"} {
		if v := h.Get(k); v != "" {
			t.Errorf("backend got hop-by-hop header %s: %q", k, v)
		}
	}
}

func TestProxyCanarySplit9010(t *testing.T) {
	e := newEnv(t)
	e.backend("orders", "orders-v1", "v1", nil)
	e.backend("orders", "orders-v2", "v2", nil)
	addr := testutil.FreeAddr(t)
	_, base, _ := e.startProxy(fmt.Sprintf(`
listeners: [{name: edge, addr: %q}]
routes:
  - name: orders
    service: orders
    split:
      - {name: stable, weight: 90, version: v1}
      - {name: canary, weight: 10, version: v2}
`, addr))
	hc := &http.Client{Timeout: 10 * time.Second}
	// Both versions known to the proxy before counting.
	waitServing(t, hc, base+"/", nil, "orders-v2")
	counts := map[string]int{}
	for range 2000 {
		code, body := get(t, hc, base+"/", nil)
		if code != 200 {
			t.Fatalf("GET = %d %q", code, body)
		}
		counts[body]++
	}
	obs := []int{counts["orders-v1"], counts["orders-v2"]}
	if err := chisq.Fit(obs, []float64{0.9, 0.1}); err != nil {
		t.Errorf("split v1/v2 = %v, want 90/10: %v", obs, err)
	}
}

// A backend that dies under load (listener closed, connections reset)
// costs no idempotent request: beaconhttp retries them elsewhere.
func TestProxyBackendKilledUnderLoadFailsNoIdempotentRequest(t *testing.T) {
	e := newEnv(t)
	var victim = e.backend("inv", "inv-1", "", nil)
	e.backend("inv", "inv-2", "", nil)
	e.backend("inv", "inv-3", "", nil)
	addr := testutil.FreeAddr(t)
	p, base, _ := e.startProxy(fmt.Sprintf("listeners: [{name: edge, addr: %q}]\nroutes: [{name: inv, service: inv}]\n", addr))
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 16}}
	defer hc.CloseIdleConnections()
	for _, id := range []string{"inv-1", "inv-2", "inv-3"} {
		waitServing(t, hc, base+"/", nil, id)
	}
	var ok, failed, victimHits atomic.Int64
	var firstErr atomic.Value
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				code, body := get(t, hc, base+"/", nil)
				if code != 200 {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, fmt.Sprintf("%d %s", code, body))
					continue
				}
				ok.Add(1)
				if body == "inv-1" {
					victimHits.Add(1)
				}
			}
		}()
	}
	testutil.Eventually(t, 20*time.Second, "load reaching the victim", func() bool { return victimHits.Load() > 50 })
	victim.Listener.Close()
	victim.CloseClientConnections()
	before := ok.Load()
	testutil.Eventually(t, 30*time.Second, "500 more requests after the kill", func() bool { return ok.Load() > before+500 })
	cancel()
	wg.Wait()
	if n := failed.Load(); n != 0 {
		t.Errorf("%d of %d requests failed after a backend died, want 0; first: %v", n, n+ok.Load(), firstErr.Load())
	}
	if r := counter(t, p, "beacon_proxy_retries_total", "inv"); r == 0 {
		t.Errorf("beacon_proxy_retries_total{route=inv} = 0, want the retries that hid the dead backend")
	}
	if n := counter(t, p, "beacon_proxy_requests_total", "inv"); n < float64(ok.Load()) {
		t.Errorf("beacon_proxy_requests_total{route=inv} = %v, want >= %d", n, ok.Load())
	}
}

// counter sums a metric's series of one route.
func counter(t *testing.T, p *proxy.Proxy, name, route string) float64 {
	return counterOf(t, p, name, "route", route)
}

// A reload swaps the routes under a request in flight: it finishes on
// the route it started on, and the next request takes the new routes.
func TestProxyReloadKeepsInFlightRequests(t *testing.T) {
	e := newEnv(t)
	arrived, release := make(chan struct{}), make(chan struct{})
	e.backend("slow", "slow-1", "", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			close(arrived)
			<-release
		}
		io.WriteString(w, "slow-1")
	})
	e.backend("fast", "fast-1", "", nil)
	addr := testutil.FreeAddr(t)
	p, base, path := e.startProxy(fmt.Sprintf("listeners: [{name: edge, addr: %q}]\nroutes: [{name: r, service: slow}]\n", addr))
	hc := &http.Client{Timeout: 30 * time.Second}
	waitServing(t, hc, base+"/", nil, "slow-1")
	type result struct {
		code int
		body string
	}
	slow := make(chan result, 1)
	go func() {
		code, body := get(t, hc, base+"/slow", nil)
		slow <- result{code, body}
	}()
	<-arrived
	e.writeConfig(path, fmt.Sprintf("listeners: [{name: edge, addr: %q}]\nroutes: [{name: r, service: fast}]\n", addr))
	if err := p.ReloadFile(path); err != nil {
		t.Fatalf("ReloadFile() = %v", err)
	}
	waitServing(t, hc, base+"/", nil, "fast-1")
	close(release)
	if r := <-slow; r.code != 200 || r.body != "slow-1" {
		t.Errorf("request in flight across the reload = %d %q, want 200 slow-1", r.code, r.body)
	}
	// A bad file is refused, naming the field; the routes stay.
	e.writeConfig(path, fmt.Sprintf("listeners: [{name: edge, addr: %q}]\nroutes: [{name: r, service: fast, split: [{name: a, weight: 0, version: v1}]}]\n", addr))
	err := p.ReloadFile(path)
	if !errors.Is(err, proxy.ErrInvalidConfig) || !strings.Contains(err.Error(), "routes[0].split[0].weight: must be 1..100") {
		t.Errorf("ReloadFile(bad) = %v, want routes[0].split[0].weight: must be 1..100", err)
	}
	if code, body := get(t, hc, base+"/", nil); code != 200 || body != "fast-1" {
		t.Errorf("after a refused reload GET = %d %q, want 200 fast-1", code, body)
	}
	// A listener change needs a restart.
	e.writeConfig(path, fmt.Sprintf("listeners: [{name: edge, addr: %q}]\nroutes: [{name: r, service: fast}]\n", testutil.FreeAddr(t)))
	if err := p.ReloadFile(path); err == nil || !strings.Contains(err.Error(), "listeners: changed") {
		t.Errorf("ReloadFile(new listener) = %v, want listeners: changed", err)
	}
}

func TestProxyConfigErrorsNameTheField(t *testing.T) {
	reg := "registry: {servers: [\"127.0.0.1:8970\"]}\n"
	lis := "listeners: [{name: edge, addr: \"127.0.0.1:0\"}]\n"
	for _, tc := range []struct{ yaml, want string }{
		{lis + "routes: [{name: a, service: x}]", "registry.servers: at least one"},
		{reg + "routes: [{name: a, service: x}]", "listeners: nothing to serve"},
		{reg + lis, "routes: HTTP listeners need at least one route"},
		{reg + lis + "routes: [{name: a, service: x}, {name: a, service: y}]", "routes[1].name: \"a\" is also routes[0].name"},
		{reg + lis + "routes: [{name: a, service: Bad_Name}]", "routes[0].service: must be a beacon service name"},
		{reg + lis + "routes: [{name: a, service: x}, {name: b, service: x, split: [{name: s, weight: 90, version: v1}, {name: c, weight: 101, version: v2}]}]", "routes[1].split[1].weight: must be 1..100"},
		{reg + lis + "routes: [{name: a, service: x, split: [{name: s, weight: 9}]}]", "routes[0].split[0]: needs version, tags or metadata"},
		{reg + lis + "routes: [{name: a, service: x, match: {pathPrefix: api}}]", "routes[0].match.pathPrefix: must start with /"},
		{reg + lis + "routes: [{name: a, service: x, timeout: soon}]", "a duration like"},
		{reg + lis + "routes: [{name: a, service: x, retries: 3}]", "unknown field \"retries\""},
		{reg + "listeners: [{name: edge, addr: \"nope\"}]\nroutes: [{name: a, service: x}]", "listeners[0].addr: must be host:port"},
		{reg + "listeners: [{name: edge, addr: \":1\", limits: {maxBodyBytes: -2}}]\nroutes: [{name: a, service: x}]", "listeners[0].limits.maxBodyBytes"},
		{reg + "sidecar: {service: orders, addr: \":9001\", local: \"127.0.0.1:8000\"}", "sidecar.advertise: required"},
		{reg + lis + "routes: [{name: a, service: x, hedge: {delay: 0s}}]", "routes[0].hedge.delay: must be positive"},
	} {
		_, err := proxy.ParseConfig([]byte(tc.yaml))
		if err == nil || !errors.Is(err, proxy.ErrInvalidConfig) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseConfig(%q) = %v, want an error containing %q", tc.yaml, err, tc.want)
		}
	}
	good := reg + lis + "routes: [{name: a, service: x}]"
	cfg, err := proxy.ParseConfig([]byte(good))
	if err != nil {
		t.Fatalf("ParseConfig(good) = %v", err)
	}
	if got := cfg.Listeners[0].Limits; got.MaxConnections != proxy.DefaultLimits.MaxConnections || got.MaxBodyBytes != proxy.DefaultLimits.MaxBodyBytes {
		t.Errorf("defaults not applied: %+v", got)
	}
	// JSON is YAML.
	if _, err := proxy.ParseConfig([]byte(`{"registry": {"servers": ["127.0.0.1:8970"]}, "listeners": [{"name": "e", "addr": ":8080"}], "routes": [{"name": "a", "service": "x"}]}`)); err != nil {
		t.Errorf("ParseConfig(JSON) = %v", err)
	}
}

func FuzzProxyConfig(f *testing.F) {
	f.Add([]byte("registry: {servers: [\"127.0.0.1:8970\"]}\nlisteners: [{name: e, addr: \":8080\"}]\nroutes: [{name: a, service: x, split: [{name: s, weight: 90, version: v1}]}]\n"))
	f.Add([]byte(`{"registry": {"servers": ["h:1"]}, "sidecar": {"service": "o", "addr": "127.0.0.1:1", "local": "127.0.0.1:2"}}`))
	f.Add([]byte("routes: [{name: a, timeout: 1s, hedge: {delay: 5ms}}]"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := proxy.ParseConfig(data)
		if err != nil {
			if !errors.Is(err, proxy.ErrInvalidConfig) && !strings.Contains(err.Error(), "proxy: config") {
				t.Fatalf("ParseConfig error %v is not ErrInvalidConfig", err)
			}
			return
		}
		// A valid config stays valid: Validate's defaults are stable.
		if err := cfg.Validate(); err != nil {
			t.Fatalf("Validate() of a parsed config = %v", err)
		}
	})
}

// An upgraded connection (a websocket) does not hold the proxy open: Close
// ends it, and requests after Close get 503, not a spin.
func TestCloseEndsUpgradedConnections(t *testing.T) {
	e := newEnv(t)
	e.backend("ws", "ws-1", "", func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "echo" {
			http.Error(w, "want Upgrade: echo", http.StatusBadRequest)
			return
		}
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
		brw.Flush()
		io.Copy(conn, brw) // echo until the other side closes
	})
	addr := testutil.FreeAddr(t)
	path := filepath.Join(t.TempDir(), "proxy.yaml")
	e.writeConfig(path, fmt.Sprintf("listeners: [{name: edge, addr: %q}]\nroutes: [{name: ws, service: ws}]\n", addr))
	cfg, err := proxy.LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	p, err := proxy.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- p.Run(ctx) }()
	<-p.Ready()
	waitServing(t, &http.Client{Timeout: 10 * time.Second}, "http://"+addr+"/", nil, "want Upgrade: echo")

	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	io.WriteString(conn, "GET / HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade = %v, %v", resp, err)
	}
	io.WriteString(conn, "ping\n")
	if line, err := br.ReadString('\n'); err != nil || line != "ping\n" {
		t.Fatalf("echo = %q, %v", line, err)
	}
	cancel()
	if err := <-ran; err != nil {
		t.Fatalf("Run() = %v", err)
	}
	closed := make(chan struct{})
	go func() { p.Close(); close(closed) }()
	testutil.Eventually(t, 30*time.Second, "Close returned with an upgraded connection open", func() bool {
		select {
		case <-closed:
			return true
		default:
			return false
		}
	})
	if _, err := io.ReadAll(br); err != nil && !errors.Is(err, net.ErrClosed) && !strings.Contains(err.Error(), "reset") {
		t.Fatalf("the upgraded connection after Close: %v", err)
	}
	rec := httptest.NewRecorder()
	p.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "http://ws/", nil))
	if rec.Code != http.StatusServiceUnavailable {
		t.Fatalf("a request after Close = %d, want 503", rec.Code)
	}
}

// A reload that leaves a route unchanged keeps its balancer: an instance
// it ejected stays ejected, where a rebuilt route would send it requests
// again at once. A route that changed starts afresh.
func TestProxyReloadKeepsUnchangedRoutesEjections(t *testing.T) {
	e := newEnv(t)
	var badHits atomic.Int64
	// good is the slower: P2C prefers bad's fast 503s until it is
	// ejected, so 50 requests in a row missing bad mean it is ejected.
	e.backend("web", "good", "", func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(2 * time.Millisecond) // the instance's work
		io.WriteString(w, "good")
	})
	e.backend("web", "bad", "", func(w http.ResponseWriter, r *http.Request) {
		badHits.Add(1)
		http.Error(w, "bad", http.StatusServiceUnavailable)
	})
	e.backend("other", "other-1", "", nil)
	addr := testutil.FreeAddr(t)
	route := "  - {name: web, service: web, outlier: {consecutiveFailures: 2, baseEjection: 10m}}\n"
	head := fmt.Sprintf("listeners: [{name: edge, addr: %q}]\nroutes:\n", addr)
	p, base, path := e.startProxy(head + route)
	hc := &http.Client{Timeout: 10 * time.Second}
	defer hc.CloseIdleConnections()
	waitServing(t, hc, base+"/", nil, "good")
	// Requests (503s retried on good) until bad is ejected.
	quiet := func(n int) bool {
		before := badHits.Load()
		for range n {
			if code, body := get(t, hc, base+"/", nil); code != 200 || body != "good" {
				t.Fatalf("GET / = %d %q, want 200 good (retried)", code, body)
			}
		}
		return badHits.Load() == before
	}
	testutil.Eventually(t, 30*time.Second, "bad ejected", func() bool { return quiet(50) })

	// Reload with a new route beside the unchanged one.
	e.writeConfig(path, head+"  - {name: other, match: {pathPrefix: /other}, service: other}\n"+route)
	if err := p.ReloadFile(path); err != nil {
		t.Fatal(err)
	}
	waitServing(t, hc, base+"/other", nil, "other-1")
	if !quiet(100) {
		t.Errorf("after a reload that left the route unchanged, the ejected instance got requests again")
	}

	// Changing the route builds it afresh: bad is tried again.
	e.writeConfig(path, head+"  - {name: web, service: web, timeout: 20s, outlier: {consecutiveFailures: 2, baseEjection: 10m}}\n")
	if err := p.ReloadFile(path); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "the changed route trying bad again", func() bool { return !quiet(20) })
}

// A hedged GET: when the first attempt hangs, the hedge answers, and the
// winner's body — streamed after its headers, so read after the hedger
// returned — arrives whole; the hung attempt is cancelled.
func TestProxyHedgeWinnerStreamsWholeBody(t *testing.T) {
	e := newEnv(t)
	var hung, cancelled atomic.Int64
	e.backend("web", "hang", "", func(w http.ResponseWriter, r *http.Request) {
		hung.Add(1)
		<-r.Context().Done() // the proxy gave up on this attempt
		cancelled.Add(1)
	})
	e.backend("web", "stream", "", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		for i := range 5 {
			time.Sleep(5 * time.Millisecond) // the rest of the body comes later
			fmt.Fprintf(w, "part%d;", i)
			w.(http.Flusher).Flush()
		}
	})
	addr := testutil.FreeAddr(t)
	_, base, _ := e.startProxy(fmt.Sprintf("listeners: [{name: edge, addr: %q}]\nroutes: [{name: web, service: web, hedge: {delay: 200ms}, outlier: {consecutiveFailures: -1}}]\n", addr))
	hc := &http.Client{Timeout: 30 * time.Second}
	defer hc.CloseIdleConnections()
	waitServing(t, hc, base+"/", nil, "part0;part1;part2;part3;part4;")
	testutil.Eventually(t, 60*time.Second, "a request hedged past the hung instance", func() bool {
		code, body := get(t, hc, base+"/", nil)
		if code != 200 || body != "part0;part1;part2;part3;part4;" {
			t.Fatalf("GET / = %d %q, want the whole streamed body", code, body)
		}
		return hung.Load() > 0
	})
	testutil.Eventually(t, 30*time.Second, "every hung attempt cancelled", func() bool { return cancelled.Load() == hung.Load() })
}

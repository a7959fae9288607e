package proxy_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	itestutil "beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/proxy"
	"beacon.dev/beacon/registry"
)

// rawClient speaks HTTP/1.1 to the proxy byte by byte: what the fast path
// receives is exactly what the test wrote.
type rawClient struct {
	t  *testing.T
	c  net.Conn
	br *bufio.Reader
}

func dialRaw(t *testing.T, base string) *rawClient {
	t.Helper()
	c, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(30 * time.Second))
	return &rawClient{t: t, c: c, br: bufio.NewReader(c)}
}

func (rc *rawClient) send(s string) {
	rc.t.Helper()
	if _, err := io.WriteString(rc.c, s); err != nil {
		rc.t.Fatal(err)
	}
}

// read reads one response (to a request of method) whole.
func (rc *rawClient) read(method string) (*http.Response, string) {
	rc.t.Helper()
	var resp *http.Response
	for {
		var err error
		if resp, err = http.ReadResponse(rc.br, &http.Request{Method: method}); err != nil {
			rc.t.Fatalf("reading the response: %v", err)
		}
		if resp.StatusCode >= 200 || resp.StatusCode == 101 {
			break
		}
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		rc.t.Fatalf("reading the body: %v", err)
	}
	resp.Body.Close()
	return resp, string(b)
}

// counterOf sums the proxy's counter name over the series with the label
// label=value ("" label: every series).
func counterOf(t *testing.T, p *proxy.Proxy, name, label, value string) float64 {
	t.Helper()
	mfs, err := p.Gatherer().Gather()
	if err != nil {
		t.Fatal(err)
	}
	total := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			match := label == ""
			for _, l := range m.GetLabel() {
				match = match || l.GetName() == label && l.GetValue() == value
			}
			if match {
				total += m.GetCounter().GetValue()
			}
		}
	}
	return total
}

// handoffs is the proxy's beacon_proxy_handoffs_total for reason.
func handoffs(t *testing.T, p *proxy.Proxy, reason string) float64 {
	return counterOf(t, p, "beacon_proxy_handoffs_total", "reason", reason)
}

func allHandoffs(t *testing.T, p *proxy.Proxy) float64 {
	return counterOf(t, p, "beacon_proxy_handoffs_total", "", "")
}

// The fast path forwards what net/http's path forwards: the method,
// target (prefix stripped), Host and body as sent; the client's headers
// but the hop-by-hop ones (and those its Connection header names); its
// own X-Forwarded-For, -Host and -Proto in place of the client's. Back:
// the instance's status and headers but the hop-by-hop ones, and its
// body. Two requests written at once (pipelined) are answered in order.
// No request here is handed to net/http.
func TestFastPathForwardsLikeNetHTTP(t *testing.T) {
	e := newEnv(t)
	seen := make(chan *http.Request, 16)
	bodies := make(chan string, 16)
	e.backend("web", "web-1", "", func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		seen <- r
		bodies <- string(b)
		w.Header().Set("X-Answer", "yes")
		w.Header().Set("Keep-Alive", "timeout=5")
		fmt.Fprintf(w, "got %s %s", r.Method, r.URL.RequestURI())
	})
	p, base, _ := e.startProxy(fmt.Sprintf(`listeners: [{name: edge, addr: %q}]
routes:
  - {name: api, match: {pathPrefix: /api/}, service: web, stripPrefix: true}
  - {name: web, service: web}
`, itestutil.FreeAddr(t)))
	waitServing(t, &http.Client{Timeout: 5 * time.Second}, base+"/x", nil, "got GET /x")
	drain := func() {
		for len(seen) > 0 {
			<-seen
			<-bodies
		}
	}
	drain()
	rc := dialRaw(t, base)
	rc.send("POST /api/orders?id=7 HTTP/1.1\r\nHost: shop.example:8080\r\nContent-Length: 5\r\n" +
		"Connection: X-Secret\r\nX-Secret: hop\r\nKeep-Alive: timeout=9\r\nProxy-Authorization: Basic x\r\n" +
		"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Host: forged\r\nX-Custom: kept\r\n\r\nhello" +
		"GET /second HTTP/1.1\r\nHost: shop.example\r\n\r\n")
	resp, body := rc.read(http.MethodPost)
	if resp.StatusCode != 200 || body != "got POST /orders?id=7" {
		t.Fatalf("POST = %d %q, want 200 \"got POST /orders?id=7\"", resp.StatusCode, body)
	}
	if resp.Header.Get("X-Answer") != "yes" || resp.Header.Get("Keep-Alive") != "" {
		t.Errorf("response headers %v: want X-Answer passed, Keep-Alive dropped", resp.Header)
	}
	r := <-seen
	if b := <-bodies; b != "hello" {
		t.Errorf("instance got body %q, want hello", b)
	}
	checks := map[string]string{"X-Custom": "kept", "X-Secret": "", "Keep-Alive": "", "Proxy-Authorization": "",
		"X-Forwarded-For": "127.0.0.1", "X-Forwarded-Host": "shop.example:8080", "X-Forwarded-Proto": "http"}
	for k, want := range checks {
		if got := strings.Join(r.Header.Values(k), ","); got != want {
			t.Errorf("instance got %s %q, want %q", k, got, want)
		}
	}
	if r.Host != "shop.example:8080" {
		t.Errorf("instance got Host %q, want the client's", r.Host)
	}
	resp, body = rc.read(http.MethodGet)
	if resp.StatusCode != 200 || body != "got GET /second" {
		t.Errorf("pipelined GET = %d %q, want 200 \"got GET /second\"", resp.StatusCode, body)
	}
	if n := allHandoffs(t, p); n != 0 {
		t.Errorf("%v connections handed to net/http, want none", n)
	}
}

// What the fast path does not serve goes, with its connection, to
// net/http, which answers it as before: each case is answered correctly
// and counted under its reason, and malformed requests get net/http's 400.
func TestFastPathHandsOffWhatItDoesNotServe(t *testing.T) {
	e := newEnv(t)
	e.backend("web", "web-1", "", func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "%s %s %d", r.Method, r.URL.Path, n)
	})
	p, base, _ := e.startProxy(fmt.Sprintf(`listeners: [{name: edge, addr: %q, h2c: true}]
routes: [{name: web, service: web}]
`, itestutil.FreeAddr(t)))
	waitServing(t, &http.Client{Timeout: 5 * time.Second}, base+"/x", nil, "GET /x 0")
	big := strings.Repeat("b", 70<<10)
	cases := []struct {
		reason, request, method string
		status                  int
		body                    string
	}{
		{"version", "GET /old HTTP/1.0\r\nHost: a\r\n\r\n", "GET", 200, "GET /old 0"},
		{"transfer-encoding", "POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", "POST", 200, "POST /c 3"},
		{"expect", "PUT /e HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok", "PUT", 200, "PUT /e 2"},
		{"target", "GET /p%61th HTTP/1.1\r\nHost: a\r\n\r\n", "GET", 200, "GET /path 0"},
		{"target", "GET http://a/abs HTTP/1.1\r\nHost: a\r\n\r\n", "GET", 200, "GET /abs 0"},
		{"body-size", "POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: " + strconv.Itoa(len(big)) + "\r\n\r\n" + big, "POST", 200, "POST /big " + strconv.Itoa(len(big))},
		{"head-size", "GET /h HTTP/1.1\r\nHost: a\r\nX-Big: " + strings.Repeat("h", 70<<10) + "\r\n\r\n", "GET", 200, "GET /h 0"},
		{"malformed", "GET /m HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx", "GET", 400, ""},
		{"malformed", "GET /m HTTP/1.1\nHost: a\n\n", "GET", 200, "GET /m 0"}, // bare LF: net/http accepts it
		{"malformed", "GET /n HTTP/1.1\r\n\r\n", "GET", 400, ""},              // no Host
	}
	for _, c := range cases {
		before := handoffs(t, p, c.reason)
		rc := dialRaw(t, base)
		rc.send(c.request)
		resp, body := rc.read(c.method)
		if resp.StatusCode != c.status || (c.body != "" && body != c.body) {
			t.Errorf("%q: %d %q, want %d %q", c.request[:min(len(c.request), 60)], resp.StatusCode, body, c.status, c.body)
		}
		if got := handoffs(t, p, c.reason); got != before+1 {
			t.Errorf("%q: handoffs{reason=%s} went %v → %v, want one more", c.request[:min(len(c.request), 60)], c.reason, before, got)
		}
	}
	// HTTP/2 with prior knowledge on an h2c listener.
	h2 := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{Protocols: h2cOnly()}}
	defer h2.CloseIdleConnections()
	resp, err := h2.Get(base + "/two")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.ProtoMajor != 2 || string(b) != "GET /two 0" {
		t.Errorf("h2c prior knowledge: %s %q, want HTTP/2 and the answer", resp.Proto, b)
	}
}

func h2cOnly() *http.Protocols {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	return &p
}

// The instance's answer reaches the client however its body is framed:
// by length, chunked with trailers, until the connection closes (from an
// HTTP/1.0 instance), none (HEAD, 204, 304), after a 103 Early Hints.
func TestFastPathPassesEveryResponseFraming(t *testing.T) {
	e := newEnv(t)
	e.backend("web", "web-1", "", func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/chunked":
			w.Header().Set("Trailer", "X-Sum")
			io.WriteString(w, "part1,")
			w.(http.Flusher).Flush()
			io.WriteString(w, "part2")
			w.Header().Set("X-Sum", "42")
		case "/nocontent":
			w.WriteHeader(204)
		case "/notmodified":
			w.WriteHeader(304)
		case "/hints":
			w.Header().Set("Link", "</style.css>; rel=preload")
			w.WriteHeader(103)
			io.WriteString(w, "after hints")
		default:
			io.WriteString(w, "plain body")
		}
	})
	// An HTTP/1.0 instance: its body ends when it closes the connection.
	rawBackend(t, e, "legacy", "legacy-1", func(c net.Conn) {
		if _, err := http.ReadRequest(bufio.NewReader(c)); err == nil {
			io.WriteString(c, "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nlegacy body")
		}
	})
	p, base, _ := e.startProxy(fmt.Sprintf(`listeners: [{name: edge, addr: %q}]
routes:
  - {name: legacy, match: {pathPrefix: /legacy}, service: legacy}
  - {name: web, service: web}
`, itestutil.FreeAddr(t)))
	hc := &http.Client{Timeout: 5 * time.Second}
	waitServing(t, hc, base+"/", nil, "plain body")
	waitServing(t, hc, base+"/legacy", nil, "legacy body")

	rc := dialRaw(t, base)
	rc.send("GET /chunked HTTP/1.1\r\nHost: a\r\n\r\n")
	resp, body := rc.read("GET")
	if body != "part1,part2" || resp.Trailer.Get("X-Sum") != "42" || len(resp.TransferEncoding) == 0 {
		t.Errorf("chunked: %q trailer %v encoding %v, want the body, X-Sum 42, chunked", body, resp.Trailer, resp.TransferEncoding)
	}
	for _, c := range []struct{ method, path string }{{"HEAD", "/"}, {"GET", "/nocontent"}, {"GET", "/notmodified"}} {
		rc.send(c.method + " " + c.path + " HTTP/1.1\r\nHost: a\r\n\r\n")
		if _, body := rc.read(c.method); body != "" {
			t.Errorf("%s %s: body %q, want none", c.method, c.path, body)
		}
	}
	rc.send("GET /hints HTTP/1.1\r\nHost: a\r\n\r\n")
	if resp, body := rc.read("GET"); resp.StatusCode != 200 || body != "after hints" {
		t.Errorf("after 103: %d %q, want 200 \"after hints\"", resp.StatusCode, body)
	}
	// The connection still serves: every response above ended where it should.
	rc.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
	if _, body := rc.read("GET"); body != "plain body" {
		t.Errorf("after the others: %q, want plain body", body)
	}
	rc.send("GET /legacy HTTP/1.1\r\nHost: a\r\n\r\n")
	resp, body = rc.read("GET")
	if body != "legacy body" || !resp.Close || resp.Proto != "HTTP/1.1" {
		t.Errorf("HTTP/1.0 instance: %s %q close=%v, want HTTP/1.1, the body, and the connection closed after it", resp.Proto, body, resp.Close)
	}
	if n := allHandoffs(t, p); n != 0 {
		t.Errorf("%v connections handed to net/http, want none", n)
	}
}

// An instance that closes each connection after one answer, without
// saying so, leaves a dead connection in the pool each time: the next
// request finds it closed and goes again on a new connection, not failing
// and not counting as a retry.
func TestFastPathResendsOverAPooledConnectionTheInstanceClosed(t *testing.T) {
	e := newEnv(t)
	var served atomic.Int64
	rawBackend(t, e, "web", "web-1", func(c net.Conn) { // one answer per connection
		req, err := http.ReadRequest(bufio.NewReader(c))
		if err != nil {
			return
		}
		served.Add(1)
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(req.Method), req.Method)
	})
	p, base, _ := e.startProxy(fmt.Sprintf(`listeners: [{name: edge, addr: %q}]
routes: [{name: web, service: web, retry: {maxAttempts: 1}}]
`, itestutil.FreeAddr(t)))
	hc := &http.Client{Timeout: 5 * time.Second}
	waitServing(t, hc, base+"/", nil, "GET")
	before := served.Load()
	rc := dialRaw(t, base)
	for i := range 20 {
		method := "GET"
		if i%2 == 1 {
			method = "PUT" // idempotent too
		}
		rc.send(method + " / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
		if resp, body := rc.read(method); resp.StatusCode != 200 || body != method {
			t.Fatalf("request %d: %d %q, want 200 %q", i, resp.StatusCode, body, method)
		}
	}
	if got := served.Load() - before; got != 20 {
		t.Errorf("the instance served %d requests, want 20 (each once)", got)
	}
	if n := counterOf(t, p, "beacon_proxy_retries_total", "", ""); n != 0 {
		t.Errorf("%v retries counted, want 0: a resend over a closed pooled connection is no retry", n)
	}
}

// A shutdown lets the request in flight on the fast path finish (its
// response says the connection closes), closes idle connections and those
// still reading a head at once, and Run returns nil (not "requests still
// in flight", which waiting for the half-sent head would give).
func TestFastPathShutdownFinishesTheRequestInFlight(t *testing.T) {
	e := newEnv(t)
	release := make(chan struct{})
	arrived := make(chan struct{}, 1)
	e.backend("web", "web-1", "", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			arrived <- struct{}{}
			<-release
		}
		io.WriteString(w, "done "+r.URL.Path)
	})
	addr := itestutil.FreeAddr(t)
	path := t.TempDir() + "/proxy.yaml"
	e.writeConfig(path, fmt.Sprintf("listeners: [{name: edge, addr: %q, limits: {readHeaderTimeout: 10m}}]\nroutes: [{name: web, service: web}]\n", addr))
	cfg, err := proxy.LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	p, err := proxy.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	<-p.Ready()
	base := "http://" + addr
	waitServing(t, &http.Client{Timeout: 5 * time.Second}, base+"/", nil, "done /")

	idle := dialRaw(t, base)
	idle.send("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
	idle.read("GET")
	// A request's head begun: no request has started there, so the
	// shutdown does not wait for it (its header timeout is 10 minutes).
	halfHead := dialRaw(t, base)
	halfHead.send("GET / HTTP/1.1\r\nHo")
	busy := dialRaw(t, base)
	busy.send("GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
	<-arrived
	cancel()
	// The idle connection and the one reading a head are closed by the shutdown.
	if _, err := idle.br.ReadByte(); err == nil {
		t.Error("the idle connection got a byte, want it closed")
	}
	if _, err := halfHead.br.ReadByte(); err == nil {
		t.Error("the connection reading a head got a byte, want it closed")
	}
	close(release)
	resp, body := busy.read("GET")
	if body != "done /slow" || !resp.Close {
		t.Errorf("in flight at shutdown: %q close=%v, want the whole answer and Connection: close", body, resp.Close)
	}
	if err := <-done; err != nil {
		t.Errorf("Run() = %v, want nil", err)
	}
}

// A Connection header naming the request's framing cannot smuggle a
// request in a body: the fast path hands it to net/http, which sends the
// body as the body. A HEAD that no route takes is answered without a
// body, and the connection goes on serving.
func TestFastPathKeepsRequestsApart(t *testing.T) {
	e := newEnv(t)
	var paths sync.Map
	e.backend("web", "web-1", "", func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		paths.Store(r.URL.Path, len(b))
		fmt.Fprintf(w, "%s %d", r.URL.Path, len(b))
	})
	p, base, _ := e.startProxy(fmt.Sprintf(`listeners: [{name: edge, addr: %q}]
routes: [{name: web, match: {host: shop.example}, service: web}]
`, itestutil.FreeAddr(t)))
	waitServing(t, &http.Client{Timeout: 5 * time.Second}, base+"/x", map[string]string{"Host": "shop.example"}, "/x 0")

	smuggled := "GET /admin HTTP/1.1\r\nHost: shop.example\r\n\r\n"
	rc := dialRaw(t, base)
	rc.send(fmt.Sprintf("POST /in HTTP/1.1\r\nHost: shop.example\r\nConnection: content-length\r\nContent-Length: %d\r\n\r\n%s", len(smuggled), smuggled))
	if resp, body := rc.read("POST"); resp.StatusCode != 200 || body != fmt.Sprintf("/in %d", len(smuggled)) {
		t.Errorf("POST with Connection: content-length = %d %q, want the body passed as a body", resp.StatusCode, body)
	}
	if _, ok := paths.Load("/admin"); ok {
		t.Error("the instance served /admin: a request was smuggled in a body")
	}
	if got := handoffs(t, p, "malformed"); got != 1 {
		t.Errorf("handoffs{reason=malformed} = %v, want 1", got)
	}

	rc = dialRaw(t, base)
	rc.send("HEAD /nothing HTTP/1.1\r\nHost: elsewhere.example\r\n\r\nGET /y HTTP/1.1\r\nHost: shop.example\r\n\r\n")
	if resp, _ := rc.read("HEAD"); resp.StatusCode != 404 {
		t.Errorf("unrouted HEAD = %d, want 404", resp.StatusCode)
	}
	if resp, body := rc.read("GET"); resp.StatusCode != 200 || body != "/y 0" {
		t.Errorf("the request after an unrouted HEAD = %d %q, want 200 \"/y 0\" (no error body in between)", resp.StatusCode, body)
	}
}

// An instance that sends bytes after its answer (an idle timeout's 408,
// a body longer than it said) never has them read as the answer to the
// next request: that connection is not used again.
func TestFastPathNeverPassesAStrayAnswerOn(t *testing.T) {
	e := newEnv(t)
	rawBackend(t, e, "web", "web-1", func(c net.Conn) {
		br := bufio.NewReader(c)
		for {
			req, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			io.Copy(io.Discard, req.Body)
			body := fmt.Sprintf("ok %s", req.URL.Path)
			// One write: the answer, then a stray 408 on the same connection.
			fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%sHTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n", len(body), body)
		}
	})
	_, base, _ := e.startProxy(fmt.Sprintf(`listeners: [{name: edge, addr: %q}]
routes: [{name: web, service: web, retry: {maxAttempts: 1}}]
`, itestutil.FreeAddr(t)))
	waitServing(t, &http.Client{Timeout: 5 * time.Second}, base+"/w", nil, "ok /w")
	rc := dialRaw(t, base)
	for i := range 20 {
		rc.send(fmt.Sprintf("POST /p%d HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi", i))
		if resp, body := rc.read("POST"); resp.StatusCode != 200 || body != fmt.Sprintf("ok /p%d", i) {
			t.Fatalf("POST %d = %d %q, want 200 %q", i, resp.StatusCode, body, fmt.Sprintf("ok /p%d", i))
		}
	}
}

// A streamed answer (chunked, its end unknown) reaches the client as it
// comes: the instance sends its second part only once the client has
// read the first.
func TestFastPathStreamsAnswersOfUnknownLength(t *testing.T) {
	e := newEnv(t)
	gotFirst := make(chan struct{})
	e.backend("web", "web-1", "", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/stream" {
			io.WriteString(w, "plain")
			return
		}
		io.WriteString(w, "first;")
		w.(http.Flusher).Flush()
		select {
		case <-gotFirst:
		case <-r.Context().Done():
			return
		}
		io.WriteString(w, "second")
	})
	_, base, _ := e.startProxy(fmt.Sprintf(`listeners: [{name: edge, addr: %q}]
routes: [{name: web, service: web}]
`, itestutil.FreeAddr(t)))
	waitServing(t, &http.Client{Timeout: 5 * time.Second}, base+"/", nil, "plain")
	rc := dialRaw(t, base)
	rc.send("GET /stream HTTP/1.1\r\nHost: a\r\n\r\n")
	resp, err := http.ReadResponse(rc.br, &http.Request{Method: "GET"})
	if err != nil {
		t.Fatal(err)
	}
	first := make([]byte, len("first;"))
	if _, err := io.ReadFull(resp.Body, first); err != nil || string(first) != "first;" {
		t.Fatalf("first part = %q, %v; want it before the instance sends more", first, err)
	}
	close(gotFirst)
	rest, err := io.ReadAll(resp.Body)
	if err != nil || string(rest) != "second" {
		t.Errorf("rest = %q, %v; want second", rest, err)
	}
}

// A client that sends a request and the start of another, then stops
// sending, still gets the first answer whole.
func TestFastPathAnswersBeforeAHalfClose(t *testing.T) {
	e := newEnv(t)
	e.backend("web", "web-1", "", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, strings.Repeat("z", 10000))
	})
	_, base, _ := e.startProxy(fmt.Sprintf(`listeners: [{name: edge, addr: %q}]
routes: [{name: web, service: web}]
`, itestutil.FreeAddr(t)))
	waitServing(t, &http.Client{Timeout: 5 * time.Second}, base+"/", nil, strings.Repeat("z", 10000))
	rc := dialRaw(t, base)
	rc.send("GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /sec")
	rc.c.(*net.TCPConn).CloseWrite()
	if resp, body := rc.read("GET"); resp.StatusCode != 200 || len(body) != 10000 {
		t.Errorf("the answer before the half-close = %d, %d bytes; want 200 and 10000", resp.StatusCode, len(body))
	}
}

// Answers are sent before the proxy waits on the client again: after a
// request followed by a stray line end (RFC 9112 §2.2 lets clients send
// one, and it is skipped), and after a request followed by the start of
// another. The header timeout is 10 minutes, so an answer held back would
// not come before the test's own deadline.
func TestFastPathAnswersBeforeWaitingOnTheClient(t *testing.T) {
	e := newEnv(t)
	e.backend("web", "web-1", "", func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "%s %s", r.URL.Path, b)
	})
	p, base, _ := e.startProxy(fmt.Sprintf(`listeners: [{name: edge, addr: %q, limits: {readHeaderTimeout: 10m}}]
routes: [{name: web, service: web}]
`, itestutil.FreeAddr(t)))
	waitServing(t, &http.Client{Timeout: 5 * time.Second}, base+"/x", nil, "/x")
	rc := dialRaw(t, base)
	rc.send("POST /one HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc\r\n")
	if resp, body := rc.read("POST"); resp.StatusCode != 200 || body != "/one abc" {
		t.Fatalf("POST then CRLF = %d %q, want 200 \"/one abc\"", resp.StatusCode, body)
	}
	rc.send("GET /two HTTP/1.1\r\nHost: a\r\n\r\nGET /thr")
	if resp, body := rc.read("GET"); resp.StatusCode != 200 || body != "/two " {
		t.Fatalf("GET after the CRLF = %d %q, want 200 \"/two \"", resp.StatusCode, body)
	}
	rc.send("ee HTTP/1.1\r\nHost: a\r\n\r\n")
	if resp, body := rc.read("GET"); resp.StatusCode != 200 || body != "/three " {
		t.Errorf("the request sent in two parts = %d %q, want 200 \"/three \"", resp.StatusCode, body)
	}
	if n := allHandoffs(t, p); n != 0 {
		t.Errorf("%v connections handed to net/http, want none", n)
	}
}

// rawBackend serves each connection accepted on a loopback port with
// serve, until the test ends, and registers it as instance id of service.
func rawBackend(t *testing.T, e *env, service, id string, serve func(c net.Conn)) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() { // ends when the listener closes
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { // ends when serve returns
				defer c.Close()
				c.SetDeadline(time.Now().Add(20 * time.Second))
				serve(c)
			}()
		}
	}()
	host, port, _ := net.SplitHostPort(ln.Addr().String())
	pn, _ := strconv.Atoi(port)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := e.sess.Register(ctx, registry.Instance{Service: service, ID: id, Address: host, Port: pn}); err != nil {
		t.Fatal(err)
	}
}

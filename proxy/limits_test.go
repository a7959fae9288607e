package proxy_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"beacon.dev/beacon/internal/testutil"
)

// Every limit of an HTTP listener answers with a status that names it,
// and the proxy keeps serving: the body bound (413, declared or streamed),
// the connection bound (503 on the extra connection only), a service with
// no instance (503); the metrics listener counts it all per route.
func TestProxyListenerLimitsNameThemselves(t *testing.T) {
	e := newEnv(t)
	e.backend("web", "web-1", "", func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "web-1 read %d", n)
	})
	addr, metricsAddr := testutil.FreeAddr(t), testutil.FreeAddr(t)
	_, base, _ := e.startProxy(fmt.Sprintf(`listeners: [{name: edge, addr: %q, limits: {maxConnections: 2, maxBodyBytes: 1024}}]
routes:
  - {name: empty, match: {pathPrefix: /empty}, service: nobody}
  - {name: web, service: web}
metrics: {addr: %q}
`, addr, metricsAddr))
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxConnsPerHost: 1}}
	defer hc.CloseIdleConnections()
	waitServing(t, hc, base+"/", nil, "web-1 read 0")

	post := func(body io.Reader, size int64) (int, string) {
		req, _ := http.NewRequest(http.MethodPost, base+"/", body)
		req.ContentLength = size
		resp, err := hc.Do(req)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := post(strings.NewReader(strings.Repeat("x", 1000)), 1000); code != 200 || body != "web-1 read 1000" {
		t.Errorf("a body under the limit = %d %q, want it passed", code, body)
	}
	if code, body := post(strings.NewReader(strings.Repeat("x", 2048)), 2048); code != http.StatusRequestEntityTooLarge || !strings.Contains(body, "limits.maxBodyBytes") {
		t.Errorf("a declared body over the limit = %d %q, want 413 naming limits.maxBodyBytes", code, body)
	}
	// Chunked: the size is known only while streaming.
	if code, body := post(io.MultiReader(strings.NewReader(strings.Repeat("x", 4096))), -1); code != http.StatusRequestEntityTooLarge || !strings.Contains(body, "limits.maxBodyBytes") {
		t.Errorf("a streamed body over the limit = %d %q, want 413 naming limits.maxBodyBytes", code, body)
	}
	if code, body := get(t, hc, base+"/empty", nil); code != http.StatusServiceUnavailable {
		t.Errorf("a route whose service has no instance = %d %q, want 503", code, body)
	}

	// Two connections held: the third is answered 503 naming the limit
	// and closed; the held ones keep working. (The client's own
	// connection must be gone first, and the held ones counted.)
	open := func() float64 {
		v, _ := testutil.Metric(t, metricsAddr, `beacon_proxy_connections{listener="edge"}`)
		return v
	}
	hc.CloseIdleConnections()
	testutil.Eventually(t, 20*time.Second, "no connection open", func() bool { return open() == 0 })
	var held []net.Conn
	for range 2 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		held = append(held, c)
	}
	testutil.Eventually(t, 20*time.Second, "two connections counted", func() bool { return open() == 2 })
	testutil.Eventually(t, 20*time.Second, "the third connection refused with 503", func() bool {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return false
		}
		defer c.Close()
		// The refusal comes at once, before any request (one written
		// now could meet the closed socket and reset the answer).
		c.SetReadDeadline(time.Now().Add(2 * time.Second)) // not refused: a slot was free; try again
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return false
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(b), "limits.maxConnections") {
			t.Fatalf("over the connection limit = %d %q, want 503 naming limits.maxConnections", resp.StatusCode, b)
		}
		return true
	})
	for i, c := range held {
		fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("held connection %d = %v, %v; want 200", i, resp, err)
		}
		resp.Body.Close()
	}

	// The metrics listener: per route, and the refusal.
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	text, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`beacon_proxy_requests_total{code="4xx",route="web",service="web"}`,
		`beacon_proxy_requests_total{code="5xx",route="empty",service="nobody"}`,
		`beacon_proxy_connections_rejected_total{listener="edge"}`,
	} {
		if !strings.Contains(string(text), want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

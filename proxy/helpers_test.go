package proxy_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/proxy"
	"beacon.dev/beacon/registry"
)

// env is a beacon server and a session registering test backends.
type env struct {
	t    testing.TB
	addr string
	c    *client.Client
	sess *client.Session
}

func newEnv(t testing.TB) *env {
	t.Helper()
	nd := testutil.StartBeacon(t)
	c, err := client.New([]string{nd.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	sess, err := c.NewSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return &env{t: t, addr: nd.Addr(), c: c, sess: sess}
}

// backend starts an HTTP server answering its name and registers it.
func (e *env) backend(service, id, version string, h http.HandlerFunc) *httptest.Server {
	e.t.Helper()
	return e.backendMeta(service, id, version, nil, h)
}

// backendMeta is backend with the instance's metadata.
func (e *env) backendMeta(service, id, version string, meta map[string]string, h http.HandlerFunc) *httptest.Server {
	e.t.Helper()
	if h == nil {
		h = func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, id) }
	}
	srv := httptest.NewServer(h)
	e.t.Cleanup(srv.Close)
	host, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	pn, _ := strconv.Atoi(port)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := e.sess.Register(ctx, registry.Instance{Service: service, ID: id, Address: host, Port: pn, Version: version, Metadata: meta}); err != nil {
		e.t.Fatal(err)
	}
	return srv
}

// writeConfig writes a YAML config with the registry filled in.
func (e *env) writeConfig(path, body string) {
	e.t.Helper()
	cfg := fmt.Sprintf("registry:\n  servers: [%q]\n%s", e.addr, body)
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		e.t.Fatal(err)
	}
}

// startProxy runs a proxy on the config file until the test ends.
func (e *env) startProxy(body string, opts ...proxy.Option) (*proxy.Proxy, string, string) {
	e.t.Helper()
	path := filepath.Join(e.t.TempDir(), "proxy.yaml")
	e.writeConfig(path, body)
	cfg, err := proxy.LoadConfig(path)
	if err != nil {
		e.t.Fatal(err)
	}
	p, err := proxy.New(cfg, opts...)
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	e.t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			e.t.Errorf("Run() = %v", err)
		}
		p.Close()
	})
	select {
	case <-p.Ready():
	case err := <-done:
		e.t.Fatalf("Run() = %v before ready", err)
	}
	url := ""
	if len(cfg.Listeners) > 0 {
		url = "http://" + cfg.Listeners[0].Addr
	}
	return p, url, path
}

// get sends a GET and returns status and body.
func get(t testing.TB, hc *http.Client, url string, hdr map[string]string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		if k == "Host" {
			req.Host = v
			continue
		}
		req.Header.Set(k, v)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b))
}

// waitServing waits until url answers want. Each try has a deadline of
// its own: while the proxy's view of the service is still filling in, a
// request may land on an instance the test made slow or hung, and the
// wait must go on with the next try rather than hang on that one.
func waitServing(t testing.TB, hc *http.Client, url string, hdr map[string]string, want string) {
	t.Helper()
	try := *hc
	try.Timeout = 5 * time.Second
	testutil.Eventually(t, 60*time.Second, url+" answering "+want, func() bool {
		_, body := get(t, &try, url, hdr)
		return body == want
	})
}

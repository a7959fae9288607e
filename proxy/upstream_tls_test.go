package proxy_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/proxy"
	"beacon.dev/beacon/registry"
)

// A route with upstreamTLS speaks TLS to its instances, verifying their
// certificate against the CA for the service's name (not the instance's
// address), and presents the proxy's client certificate to instances that
// require one; HTTP/2 is negotiated. Without the client certificate, or
// trusting another CA, the request fails with 502 and the reason.
func TestProxyUpstreamMTLS(t *testing.T) {
	e := newEnv(t)
	dir := t.TempDir()
	ca := testutil.NewCA(t, "upstream-ca")
	caFile := ca.WriteCert(t, filepath.Join(dir, "ca.pem"))
	srvCert, srvKey := ca.Issue(t, dir, "web", testutil.CertSpec{Names: []string{"web"}})
	cliCert, cliKey := ca.Issue(t, dir, "proxy", testutil.CertSpec{Client: true})
	other := testutil.NewCA(t, "other-ca")
	otherFile := other.WriteCert(t, filepath.Join(dir, "other.pem"))

	// The instance requires a client certificate from the CA and answers
	// with the protocol and the client's name.
	pair, err := tls.LoadX509KeyPair(srvCert, srvKey)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pem, _ := os.ReadFile(caFile)
	pool.AppendCertsFromPEM(pem)
	backend := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s %s", r.Proto, r.TLS.PeerCertificates[0].Subject.CommonName)
	}))
	backend.TLS = &tls.Config{Certificates: []tls.Certificate{pair}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool}
	backend.EnableHTTP2 = true
	backend.StartTLS()
	t.Cleanup(backend.Close)
	host, port, _ := net.SplitHostPort(backend.Listener.Addr().String())
	pn, _ := strconv.Atoi(port)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := e.sess.Register(ctx, registry.Instance{Service: "web", ID: "web-1", Address: host, Port: pn}); err != nil {
		t.Fatal(err)
	}

	addr := testutil.FreeAddr(t)
	_, base, _ := e.startProxy(fmt.Sprintf(`listeners: [{name: edge, addr: %q}]
routes:
  - {name: mtls, match: {pathPrefix: /mtls}, service: web, upstreamTLS: {ca: %q, cert: %q, key: %q}}
  - {name: nocert, match: {pathPrefix: /nocert}, service: web, upstreamTLS: {ca: %q}}
  - {name: wrongca, match: {pathPrefix: /wrongca}, service: web, upstreamTLS: {ca: %q, cert: %q, key: %q}}
  - {name: plain, service: web}
`, addr, caFile, cliCert, cliKey, caFile, otherFile, cliCert, cliKey))
	hc := &http.Client{Timeout: 10 * time.Second}
	defer hc.CloseIdleConnections()
	waitServing(t, hc, base+"/mtls", nil, "HTTP/2.0 proxy")
	for _, tc := range []struct {
		path string
		code int
		want string
	}{
		{"/nocert", http.StatusBadGateway, ""},             // the instance refused the handshake (TLS 1.3 says so after it: the wording varies)
		{"/wrongca", http.StatusBadGateway, "certificate"}, // the proxy refused the instance's certificate
		{"/plain", http.StatusBadRequest, "HTTPS server"},  // plain HTTP to a TLS port: the instance says so
	} {
		code, body := get(t, hc, base+tc.path, nil)
		if code != tc.code || !strings.Contains(body, tc.want) {
			t.Errorf("GET %s = %d %q, want %d naming %q", tc.path, code, body, tc.code, tc.want)
		}
	}
}

// upstreamTLS with only one of cert and key is refused, naming the field;
// an unreadable CA fails the route's build, naming the route.
func TestProxyUpstreamTLSConfigErrors(t *testing.T) {
	head := "registry: {servers: [\"127.0.0.1:1\"]}\nlisteners: [{name: edge, addr: \"127.0.0.1:1\"}]\n"
	if _, err := proxy.ParseConfig([]byte(head + "routes: [{name: r, service: web, upstreamTLS: {cert: c.pem}}]\n")); err == nil || !strings.Contains(err.Error(), "routes[0].upstreamTLS") {
		t.Errorf("cert without key: %v, want an error naming routes[0].upstreamTLS", err)
	}
	cfg, err := proxy.ParseConfig([]byte(head + "routes: [{name: r, service: web, upstreamTLS: {ca: /nonexistent/ca.pem}}]\n"))
	if err != nil {
		t.Fatal(err)
	}
	if p, err := proxy.New(cfg); err == nil || !strings.Contains(err.Error(), "routes[0] (r): upstreamTLS") {
		if p != nil {
			p.Close()
		}
		t.Errorf("an unreadable CA: %v, want an error naming routes[0] (r): upstreamTLS", err)
	}
}

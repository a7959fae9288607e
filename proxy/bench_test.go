package proxy_test

import (
	"fmt"
	"io"
	"net/http"
	"testing"
	"time"

	"beacon.dev/beacon/internal/testutil"
)

// BenchmarkProxyRequest: one small GET through the proxy to a backend on
// loopback, the client keeping its connection. -benchmem shows what one
// proxied request allocates (client, proxy and backend are all in this
// process: the time is not the proxy's alone; bench's BenchmarkProxy
// measures it against nginx and HAProxy as separate processes).
func BenchmarkProxyRequest(b *testing.B) {
	e := newEnv(b)
	e.backend("web", "web-1", "", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "web-1") })
	addr := testutil.FreeAddr(b)
	_, base, _ := e.startProxy(fmt.Sprintf("listeners: [{name: edge, addr: %q}]\nroutes: [{name: web, service: web}]\n", addr))
	hc := &http.Client{Timeout: 10 * time.Second}
	defer hc.CloseIdleConnections()
	waitServing(b, hc, base+"/", nil, "web-1")
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		resp, err := hc.Get(base + "/")
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			b.Fatalf("status %d", resp.StatusCode)
		}
	}
}

package bench

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"connectrpc.com/connect"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server"
	"beacon.dev/beacon/server/servertest"
)

// aclBenchServer starts a server, with ACLs and TLS when secure, and
// returns it with the client options a service holding a service
// identity for "bench" would use (none when not secure).
func aclBenchServer(b *testing.B, secure bool) (*server.Server, []client.Option) {
	b.Helper()
	cfg := servertest.Config(b, "")
	if !secure {
		return servertest.Start(b, cfg), nil
	}
	dir := b.TempDir()
	ca := testutil.NewCA(b, "bench-ca")
	cfg.TLSCertFile, cfg.TLSKeyFile = ca.Issue(b, dir, "server", testutil.CertSpec{Names: []string{"localhost", "127.0.0.1"}})
	cfg.ACL = true
	// The cost of deciding, not the quota: one token drives every worker.
	cfg.Limits.WriteRatePerToken, cfg.Limits.WriteBurstPerToken = 1e6, 1e6
	srv := servertest.Start(b, cfg)
	caFile := ca.WriteCert(b, filepath.Join(dir, "ca.pem"))
	tlsCfg, err := client.TLSFromFiles(caFile, "", "")
	if err != nil {
		b.Fatal(err)
	}
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: tlsCfg, ForceAttemptHTTP2: true}}
	ctx := context.Background()
	acls := beaconv1connect.NewAclServiceClient(hc, "https://"+srv.Addr())
	boot, err := acls.Bootstrap(ctx, connect.NewRequest(&beaconv1.BootstrapRequest{}))
	if err != nil {
		b.Fatal(err)
	}
	req := connect.NewRequest(&beaconv1.CreateTokenRequest{Token: &beaconv1.AclToken{ServiceIdentities: []*beaconv1.AclServiceIdentity{{Service: "bench"}}}})
	req.Header().Set("Authorization", "Bearer "+boot.Msg.GetToken().GetSecretId())
	tok, err := acls.CreateToken(ctx, req)
	if err != nil {
		b.Fatal(err)
	}
	return srv, []client.Option{client.WithTLS(tlsCfg), client.WithToken(tok.Msg.GetToken().GetSecretId())}
}

// BenchmarkSecurityOverhead measures what ACLs and TLS cost, each side in
// the same run: registrations/s of 16 sessions, and propagation to N=100
// watchers, with a server without ACLs or TLS and one with both (clients
// holding a service identity token, sessions their session credentials,
// watchers without session:read, so reading the redacted encoding).
func BenchmarkSecurityOverhead(b *testing.B) {
	b.Run("register", func(b *testing.B) {
		rate := map[bool]float64{}
		for _, secure := range []bool{false, true} {
			srv, opts := aclBenchServer(b, secure)
			rate[secure] = registerRate(b, srv.Addr(), opts, b.N)
		}
		b.ReportMetric(rate[false], "open-registrations/s")
		b.ReportMetric(rate[true], "secure-registrations/s")
		b.ReportMetric(rate[true]/rate[false], "secure/open")
		b.ReportMetric(0, "ns/op")
	})
	b.Run("propagation-N=100", func(b *testing.B) {
		p99 := map[bool]time.Duration{}
		for _, secure := range []bool{false, true} {
			srv, opts := aclBenchServer(b, secure)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
			l := propagationBeacon(ctx, b, func(int) []string { return []string{srv.Addr()} }, 100, b.N, opts...)
			cancel()
			p99[secure] = l.quantile(l.lastOfStart, 0.99)
		}
		b.ReportMetric(ms(p99[false]), "open-from-start-last-of-N-p99-ms")
		b.ReportMetric(ms(p99[true]), "secure-from-start-last-of-N-p99-ms")
		b.ReportMetric(float64(p99[true])/float64(p99[false]), "secure/open")
		b.ReportMetric(0, "ns/op")
	})
}

func registerRate(b *testing.B, addr string, opts []client.Option, n int) float64 {
	const workers = 16
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	sessions := make([]*client.Session, workers)
	for i := range sessions {
		c, err := client.New([]string{addr}, opts...)
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		if sessions[i], err = c.NewSession(ctx); err != nil {
			b.Fatal(err)
		}
		defer sessions[i].Close(context.Background())
	}
	return throughput(b, workers, n, func(w, i int) error {
		// Each session its own instances: with ACLs a session may not
		// take over another's.
		in := registry.Instance{Service: "bench", ID: fmt.Sprintf("w%d-%d", w, i%125), Address: "127.0.0.1", Port: 1 + i%60000}
		_, err := sessions[w].Register(ctx, in)
		return err
	})
}

// BenchmarkTLSHandshake: a new connection and one call, in the clear and
// over TLS 1.3, each side in the same run (what a client pays once per
// connection; the SDK keeps its connections).
func BenchmarkTLSHandshake(b *testing.B) {
	open, _ := aclBenchServer(b, false)
	dir := b.TempDir()
	ca := testutil.NewCA(b, "bench-ca")
	cfg := servertest.Config(b, "")
	cfg.TLSCertFile, cfg.TLSKeyFile = ca.Issue(b, dir, "server", testutil.CertSpec{Names: []string{"127.0.0.1"}})
	secure := servertest.Start(b, cfg)
	tlsCfg, err := client.TLSFromFiles(ca.WriteCert(b, filepath.Join(dir, "ca.pem")), "", "")
	if err != nil {
		b.Fatal(err)
	}
	call := func(hc *http.Client, url string) {
		rc := beaconv1connect.NewRegistryServiceClient(hc, url)
		if _, err := rc.ListServices(context.Background(), connect.NewRequest(&beaconv1.ListServicesRequest{})); err != nil {
			b.Fatal(err)
		}
		hc.CloseIdleConnections()
	}
	per := func(f func()) time.Duration {
		start := time.Now()
		for range b.N {
			f()
		}
		return time.Since(start) / time.Duration(b.N)
	}
	clear := per(func() { call(&http.Client{Transport: &http.Transport{DisableKeepAlives: true}}, "http://"+open.Addr()) })
	tlsd := per(func() {
		call(&http.Client{Transport: &http.Transport{TLSClientConfig: tlsCfg.Clone(), DisableKeepAlives: true, TLSNextProto: map[string]func(string, *tls.Conn) http.RoundTripper{}}}, "https://"+secure.Addr())
	})
	b.ReportMetric(float64(clear.Microseconds()), "clear-connect+call-µs")
	b.ReportMetric(float64(tlsd.Microseconds()), "tls-connect+call-µs")
	b.ReportMetric(float64(tlsd)/float64(clear), "tls/clear")
	b.ReportMetric(0, "ns/op")
}

package server_test

import (
	"context"
	"crypto/tls"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server"
	"beacon.dev/beacon/server/servertest"
)

// tlsServer starts a server on TLS with a certificate from ca for
// 127.0.0.1, requiring client certificates from clientCA when given.
func tlsServer(t *testing.T, dir string, ca, clientCA *testutil.CA, spec testutil.CertSpec) *server.Server {
	t.Helper()
	cfg := servertest.Config(t, "")
	if spec.Names == nil {
		spec.Names = []string{"127.0.0.1", "localhost"}
	}
	cfg.TLSCertFile, cfg.TLSKeyFile = ca.Issue(t, dir, "server", spec)
	if clientCA != nil {
		cfg.TLSClientCAFile = clientCA.WriteCert(t, filepath.Join(dir, "client-ca.pem"))
	}
	return servertest.Start(t, cfg)
}

// try registers and lists through a client with tlsCfg (nil: cleartext).
func try(t *testing.T, addr string, tlsCfg *tls.Config) error {
	t.Helper()
	opts := []client.Option{client.WithAttemptTimeout(10 * time.Second)}
	if tlsCfg != nil {
		opts = append(opts, client.WithTLS(tlsCfg))
	}
	c, err := client.New([]string{addr}, opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.Register(ctx, registry.Instance{Service: "tls", ID: "t-1", Address: "127.0.0.1", Port: 9000}); err != nil {
		return err
	}
	_, err = c.Instances(ctx, "tls")
	return err
}

func trusting(t *testing.T, dir string, ca *testutil.CA, client *testutil.CA, name string) *tls.Config {
	t.Helper()
	var certFile, keyFile string
	if client != nil {
		certFile, keyFile = client.Issue(t, dir, name, testutil.CertSpec{Names: []string{name}, Client: true})
	}
	cfg, err := clientTLS(ca.WriteCert(t, filepath.Join(dir, name+"-trusts.pem")), certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

var clientTLS = client.TLSFromFiles

// The API over TLS: the SDK with the CA talks to it (gRPC needs HTTP/2,
// negotiated by ALPN) and so does plain HTTPS; a cleartext client, a
// client trusting another CA, a certificate for another name and an
// expired one are all refused.
func TestTLSServesTheAPIAndRefusesWhatItShould(t *testing.T) {
	dir := t.TempDir()
	ca, other := testutil.NewCA(t, "beacon test CA"), testutil.NewCA(t, "another CA")
	srv := tlsServer(t, dir, ca, nil, testutil.CertSpec{})
	if err := try(t, srv.Addr(), trusting(t, dir, ca, nil, "sdk")); err != nil {
		t.Fatalf("SDK over TLS: %v", err)
	}
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: trusting(t, dir, ca, nil, "curl")}}
	resp, err := hc.Get("https://" + srv.Addr() + "/readyz")
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET https://…/readyz = %v, %v", resp, err)
	}
	resp.Body.Close()
	if err := try(t, srv.Addr(), nil); err == nil {
		t.Error("a cleartext client got through a TLS port")
	}
	if err := try(t, srv.Addr(), trusting(t, dir, other, nil, "stranger")); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("a client trusting another CA: %v, want a certificate error", err)
	}
	wrongName := tlsServer(t, t.TempDir(), ca, nil, testutil.CertSpec{Names: []string{"other.example"}})
	if err := try(t, wrongName.Addr(), trusting(t, dir, ca, nil, "sdk2")); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("a certificate for another name: %v, want a certificate error", err)
	}
	expired := tlsServer(t, t.TempDir(), ca, nil, testutil.CertSpec{NotAfter: time.Now().Add(-time.Hour)})
	if err := try(t, expired.Addr(), trusting(t, dir, ca, nil, "sdk3")); err == nil || !strings.Contains(err.Error(), "expired") {
		t.Errorf("an expired certificate: %v, want it named expired", err)
	}
}

// mTLS: a client certificate from the client CA is required; rotating the
// client CA file (no restart) refuses certificates of the old one.
func TestMutualTLSAndClientCARotation(t *testing.T) {
	dir := t.TempDir()
	ca, clientCA, rogue := testutil.NewCA(t, "server CA"), testutil.NewCA(t, "client CA"), testutil.NewCA(t, "rogue CA")
	srv := tlsServer(t, dir, ca, clientCA, testutil.CertSpec{})
	if err := try(t, srv.Addr(), trusting(t, dir, ca, clientCA, "orders")); err != nil {
		t.Fatalf("with a client certificate: %v", err)
	}
	if err := try(t, srv.Addr(), trusting(t, dir, ca, nil, "anonymous")); err == nil {
		t.Error("no client certificate: got through")
	}
	if err := try(t, srv.Addr(), trusting(t, dir, ca, rogue, "rogue")); err == nil {
		t.Error("a client certificate of another CA: got through")
	}
	// Rotate: the client CA file now holds another CA.
	next := testutil.NewCA(t, "next client CA")
	next.WriteCert(t, filepath.Join(dir, "client-ca.pem"))
	old := trusting(t, dir, ca, clientCA, "orders-old")
	renewed := trusting(t, dir, ca, next, "orders-new")
	testutil.Eventually(t, 30*time.Second, "the rotated client CA in force", func() bool {
		return try(t, srv.Addr(), renewed) == nil && try(t, srv.Addr(), old) != nil
	})
}

// A renewed server certificate is served without a restart.
func TestServerCertificateReloads(t *testing.T) {
	dir := t.TempDir()
	ca, next := testutil.NewCA(t, "CA"), testutil.NewCA(t, "next CA")
	srv := tlsServer(t, dir, ca, nil, testutil.CertSpec{})
	if err := try(t, srv.Addr(), trusting(t, dir, ca, nil, "a")); err != nil {
		t.Fatal(err)
	}
	next.Issue(t, dir, "server", testutil.CertSpec{Names: []string{"127.0.0.1"}}) // same files, new issuer
	trustsNext := trusting(t, dir, next, nil, "b")
	testutil.Eventually(t, 30*time.Second, "the renewed certificate served", func() bool {
		return try(t, srv.Addr(), trustsNext) == nil
	})
	if err := try(t, srv.Addr(), trusting(t, dir, ca, nil, "c")); err == nil {
		t.Error("the old certificate is still served")
	}
}

// Half a TLS configuration is refused by name.
func TestTLSFlagsAreChecked(t *testing.T) {
	for _, tc := range []struct {
		cert, key, ca, want string
	}{
		{"c.pem", "", "", "--tls-key"},
		{"", "", "ca.pem", "--tls-client-ca"},
	} {
		cfg := server.NewConfig()
		cfg.TLSCertFile, cfg.TLSKeyFile, cfg.TLSClientCAFile = tc.cert, tc.key, tc.ca
		if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want an error naming %s", tc, err, tc.want)
		}
	}
	if _, err := client.TLSFromFiles("", "cert.pem", ""); err == nil {
		t.Error("a client certificate without its key: accepted")
	}
}

// Beyond loopback the API needs TLS and ACLs, or an explicit --insecure.
func TestNonLoopbackAddressNeedsTLSAndACLsOrInsecure(t *testing.T) {
	cfg := server.NewConfig()
	cfg.Addr = "0.0.0.0:8970"
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "--tls-cert") || !strings.Contains(err.Error(), "--insecure") {
		t.Errorf("0.0.0.0 in the clear: %v, want refused naming --tls-cert and --insecure", err)
	}
	cfg.Insecure = true
	if err := cfg.Validate(); err != nil {
		t.Errorf("0.0.0.0 with --insecure: %v", err)
	}
	cfg.Insecure, cfg.TLSCertFile, cfg.TLSKeyFile = false, "c.pem", "k.pem"
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "--acl") {
		t.Errorf("0.0.0.0 with TLS files, without ACLs: %v, want refused naming --acl", err)
	}
	cfg.ACL = true
	if err := cfg.Validate(); err != nil {
		t.Errorf("0.0.0.0 with TLS files and ACLs: %v", err)
	}
	cfg.TLSCertFile, cfg.TLSKeyFile = "", ""
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "--tls-cert") {
		t.Errorf("0.0.0.0 with ACLs in the clear: %v, want refused naming --tls-cert", err)
	}
	for _, addr := range []string{"127.0.0.1:8970", "localhost:8970", "[::1]:8970"} {
		cfg := server.NewConfig()
		cfg.Addr = addr
		if err := cfg.Validate(); err != nil {
			t.Errorf("%s: %v", addr, err)
		}
	}
}

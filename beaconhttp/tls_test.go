package beaconhttp_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"beacon.dev/beacon/beaconhttp"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
)

// serviceCert is a self-signed certificate for the DNS name service only —
// no IP address, as certificates for services are.
func serviceCert(t *testing.T, service string) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: service}, DNSNames: []string{service},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, pool
}

func TestHTTPSVerifiesTheServiceName(t *testing.T) {
	e := newEnv(t)
	cert, pool := serviceCert(t, "secure")
	var ports []int
	for i := range 2 {
		ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}})
		if err != nil {
			t.Fatal(err)
		}
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "tls-%d %s", i, r.TLS.ServerName)
		})}
		go srv.Serve(ln)
		t.Cleanup(func() { srv.Close() })
		ports = append(ports, ln.Addr().(*net.TCPAddr).Port)
	}
	sub, err := e.cache.Subscribe("secure")
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	for i, p := range ports {
		if _, err := e.c.Register(e.ctx, registry.Instance{Service: "secure", ID: fmt.Sprint(i), Address: "127.0.0.1", Port: p}); err != nil {
			t.Fatal(err)
		}
	}
	testutil.Eventually(t, 20*time.Second, "the cache sees both instances", func() bool {
		set, _ := e.cache.Endpoints("secure")
		return len(set.Endpoints) == 2
	})
	base := beaconhttp.DefaultBase()
	base.TLSClientConfig = &tls.Config{RootCAs: pool}
	hc := newTransport(t, e, beaconhttp.WithBase(base))
	seen := map[string]bool{}
	for range 40 {
		resp, err := hc.Get("https://secure/")
		if err != nil {
			t.Fatalf("GET https://secure/: %v", err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		name, sni, _ := strings.Cut(string(b), " ")
		if sni != "secure" {
			t.Fatalf("the server saw SNI %q, want the service name", sni)
		}
		seen[name] = true
	}
	if len(seen) != 2 {
		t.Errorf("https calls reached %v, want both instances", seen)
	}
	// Without the service name the certificate does not match the address:
	// the same request straight to an instance fails verification.
	plain := &http.Client{Transport: base}
	if _, err := plain.Get(fmt.Sprintf("https://127.0.0.1:%d/", ports[0])); err == nil {
		t.Error("a request to the IP verified against a certificate without it")
	}
}

func TestHTTPSNeedsAnHTTPTransportBase(t *testing.T) {
	e := newEnv(t)
	hc := newTransport(t, e, beaconhttp.WithBase(canned{}))
	_, err := hc.Get("https://secure/")
	if err == nil || !strings.Contains(err.Error(), "WithBase") {
		t.Fatalf("https with a non-*http.Transport base: %v, want an error saying why", err)
	}
}

package server_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"
	"go.uber.org/zap"

	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/server"
	"beacon.dev/beacon/server/servertest"
)

// etcdClient connects to endpoint (tlsCfg nil: no TLS) and closes the
// client when the test ends.
func etcdClient(t *testing.T, endpoint string, tlsCfg *tls.Config) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, TLS: tlsCfg, DialTimeout: 10 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// tlsFiles is a TLS client configuration from PEM files, as etcdctl's
// --cacert, --cert and --key make it.
func tlsFiles(t *testing.T, ca, cert, key string) *tls.Config {
	t.Helper()
	cfg, err := transport.TLSInfo{TrustedCAFile: ca, CertFile: cert, KeyFile: key}.ClientConfig()
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// getVersion asks an etcd listener for /version over HTTPS: the handshake
// is where a client certificate is admitted or refused.
func getVersion(url string, tlsCfg *tls.Config) error {
	// One connection, closed after the answer: nothing left for goleak.
	tr := &http.Transport{TLSClientConfig: tlsCfg, DisableKeepAlives: true}
	hc := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	resp, err := hc.Get(url + "/version")
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET /version: %s", resp.Status)
	}
	return nil
}

// A TCP client listener asked for with client-certificate auth admits
// only clients presenting a certificate of its CA: none, or one of another
// CA, is refused at the handshake. The server itself keeps to its socket.
func TestEtcdClientListenerAdmitsOnlyItsCAsCertificates(t *testing.T) {
	dir := t.TempDir()
	ca, other := testutil.NewCA(t, "etcd clients CA"), testutil.NewCA(t, "another CA")
	caFile := ca.WriteCert(t, filepath.Join(dir, "ca.pem"))
	cfg := servertest.Config(t, "")
	cfg.EtcdClientAddr = testutil.FreeAddr(t)
	cfg.EtcdClientCertFile, cfg.EtcdClientKeyFile = ca.Issue(t, dir, "etcd", testutil.CertSpec{Names: []string{"127.0.0.1"}})
	cfg.EtcdClientCAFile = caFile
	logs := &syncBuffer{}
	cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	srv := servertest.Start(t, cfg)
	url := "https://" + cfg.EtcdClientAddr

	goodCert, goodKey := ca.Issue(t, dir, "operator", testutil.CertSpec{Client: true})
	rogueCert, rogueKey := other.Issue(t, dir, "rogue", testutil.CertSpec{Client: true})
	if err := getVersion(url, tlsFiles(t, caFile, "", "")); err == nil {
		t.Error("a client without a certificate was admitted")
	}
	if err := getVersion(url, tlsFiles(t, caFile, rogueCert, rogueKey)); err == nil {
		t.Error("a client with a certificate of another CA was admitted")
	}
	if err := getVersion(url, tlsFiles(t, caFile, goodCert, goodKey)); err != nil {
		t.Errorf("a client with a certificate of the CA: %v, want admitted", err)
	}
	if err := getVersion("http://"+cfg.EtcdClientAddr, nil); err == nil {
		t.Error("a cleartext client was answered")
	}

	// etcd's own client (etcdctl, beacon operator) with the certificate
	// reads and writes; the server sees its write.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cli := etcdClient(t, url, tlsFiles(t, caFile, goodCert, goodKey))
	if _, err := cli.Put(ctx, "/tls-test", "admitted"); err != nil {
		t.Fatalf("Put with the CA's certificate: %v", err)
	}
	resp, err := srv.EtcdClient().Get(ctx, "/tls-test")
	if err != nil || len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "admitted" {
		t.Errorf("the server's Get of /tls-test = %v, %v; want the value written over TLS", resp, err)
	}
	if got := srv.EtcdClient().Endpoints(); len(got) != 1 || !strings.HasPrefix(got[0], "unix://") {
		t.Errorf("the server's etcd endpoints = %q, want its socket only", got)
	}

	// Another beacon server on it, with the external etcd's TLS flags.
	second := servertest.Config(t, "")
	second.DataDir, second.Name = "", "second"
	second.EtcdEndpoints = []string{url}
	second.EtcdCAFile, second.EtcdCertFile, second.EtcdKeyFile = caFile, goodCert, goodKey
	resp, err = servertest.Start(t, second).EtcdClient().Get(ctx, "/tls-test")
	if err != nil || len(resp.Kvs) != 1 {
		t.Errorf("a second server's Get of /tls-test over TLS = %v, %v; want the value", resp, err)
	}
	if strings.Contains(logs.String(), "local process") {
		t.Errorf("a listener with client-certificate auth was warned about:\n%s", logs)
	}
}

// The openings beacon refuses unless told: each names the flags that close
// it, --insecure lets it through. Half a set of TLS files is refused.
func TestEtcdFlagsAreChecked(t *testing.T) {
	cluster := func(c *server.Config) {
		c.Name, c.EtcdPeerAddr = "n0", "127.0.0.1:8972"
		c.EtcdInitialCluster = "n0=http://127.0.0.1:8972,n1=http://127.0.0.1:9972"
	}
	for _, tc := range []struct {
		name string
		set  func(*server.Config)
		want []string // in the error; nil: valid
	}{
		{"TCP client listener on loopback", func(c *server.Config) { c.EtcdClientAddr = "127.0.0.1:8971" }, nil},
		{"TCP client listener beyond loopback", func(c *server.Config) { c.EtcdClientAddr = "0.0.0.0:8971" },
			[]string{"--etcd-client-cert", "--etcd-client-key", "--etcd-client-ca", "--insecure"}},
		{"TCP client listener beyond loopback, insecure", func(c *server.Config) { c.EtcdClientAddr, c.Insecure = "0.0.0.0:8971", true }, nil},
		{"TCP client listener beyond loopback, TLS", func(c *server.Config) {
			c.EtcdClientAddr, c.EtcdClientCertFile, c.EtcdClientKeyFile, c.EtcdClientCAFile = "0.0.0.0:8971", "c.pem", "k.pem", "ca.pem"
		}, nil},
		{"client TLS without its CA", func(c *server.Config) {
			c.EtcdClientAddr, c.EtcdClientCertFile, c.EtcdClientKeyFile = "0.0.0.0:8971", "c.pem", "k.pem"
		}, []string{"--etcd-client-ca", "all three"}},
		{"client TLS without a listener", func(c *server.Config) {
			c.EtcdClientCertFile, c.EtcdClientKeyFile, c.EtcdClientCAFile = "c.pem", "k.pem", "ca.pem"
		}, []string{"--etcd-client-addr"}},
		{"cluster without peer TLS", cluster, []string{"--etcd-peer-cert", "--etcd-peer-key", "--etcd-peer-ca", "--insecure"}},
		{"cluster without peer TLS, insecure", func(c *server.Config) { cluster(c); c.Insecure = true }, nil},
		{"cluster with peer TLS", func(c *server.Config) {
			cluster(c)
			c.EtcdInitialCluster = strings.ReplaceAll(c.EtcdInitialCluster, "http:", "https:")
			c.EtcdPeerCertFile, c.EtcdPeerKeyFile, c.EtcdPeerCAFile = "p.pem", "pk.pem", "ca.pem"
		}, nil},
		{"cluster with peer TLS, http:// members", func(c *server.Config) {
			cluster(c)
			c.EtcdPeerCertFile, c.EtcdPeerKeyFile, c.EtcdPeerCAFile = "p.pem", "pk.pem", "ca.pem"
		}, []string{"--etcd-initial-cluster", "https://"}},
		{"peer TLS without its key", func(c *server.Config) {
			cluster(c)
			c.EtcdPeerCertFile, c.EtcdPeerCAFile = "p.pem", "ca.pem"
		}, []string{"--etcd-peer-key"}},
		{"peer TLS on a single node", func(c *server.Config) {
			c.EtcdPeerCertFile, c.EtcdPeerKeyFile, c.EtcdPeerCAFile = "p.pem", "pk.pem", "ca.pem"
		}, []string{"--etcd-initial-cluster"}},
		{"external etcd over TLS", func(c *server.Config) {
			c.EtcdEndpoints = []string{"https://10.0.0.1:2379"}
			c.EtcdCAFile, c.EtcdCertFile, c.EtcdKeyFile = "ca.pem", "c.pem", "k.pem"
		}, nil},
		{"external etcd, TLS files for an http:// endpoint", func(c *server.Config) {
			c.EtcdEndpoints = []string{"http://10.0.0.1:2379"}
			c.EtcdCAFile = "ca.pem"
		}, []string{"--etcd-endpoints", "https://"}},
		{"external etcd, a certificate without its key", func(c *server.Config) {
			c.EtcdEndpoints = []string{"https://10.0.0.1:2379"}
			c.EtcdCertFile = "c.pem"
		}, []string{"--etcd-key"}},
		{"external etcd, the embedded etcd's flags", func(c *server.Config) {
			c.EtcdEndpoints, c.EtcdClientAddr = []string{"https://10.0.0.1:2379"}, "127.0.0.1:8971"
		}, []string{"--etcd-client-addr"}},
		{"embedded etcd, the external etcd's flags", func(c *server.Config) { c.EtcdCertFile, c.EtcdKeyFile = "c.pem", "k.pem" },
			[]string{"--etcd-cert", "--etcd-endpoints"}},
	} {
		cfg := server.NewConfig()
		tc.set(cfg)
		err := cfg.Validate()
		if tc.want == nil {
			if err != nil {
				t.Errorf("%s: %v, want valid", tc.name, err)
			}
			continue
		}
		for _, w := range tc.want {
			if err == nil || !strings.Contains(err.Error(), w) {
				t.Errorf("%s: %v, want an error naming %s", tc.name, err, w)
			}
		}
	}
}

// What --insecure or a loopback address lets through is warned about at
// every start: a TCP client listener without client-certificate auth, and
// members that talk in the clear.
func TestInsecureEtcdIsWarnedAboutAtStart(t *testing.T) {
	cfg := servertest.Config(t, "")
	cfg.EtcdClientAddr = testutil.FreeAddr(t)
	cfg.EtcdInitialCluster = cfg.Name + "=http://" + cfg.EtcdPeerAddr // a cluster of one
	cfg.Insecure = true
	logs := &syncBuffer{}
	cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	srv := servertest.Start(t, cfg)
	for _, want := range []string{"any local process can write the registry past the server", "members talk in the clear"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("start-up logs lack %q:\n%s", want, logs)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := etcdClient(t, "http://"+cfg.EtcdClientAddr, nil).Put(ctx, "/loopback-test", "x"); err != nil {
		t.Errorf("Put through the loopback listener: %v", err)
	}
	if _, err := srv.EtcdClient().Get(ctx, "/loopback-test"); err != nil {
		t.Error(err)
	}
}

// A cluster whose members talk TLS with certificates of one CA works; a
// member with a certificate of another CA is refused at the handshake and
// never joins. Three members are configured and the two good ones make a
// quorum; the third is the rogue.
func TestClusterWithPeerTLS(t *testing.T) {
	// A closed member's peer server can hold a connection that served a
	// request for up to etcd's peer read timeout (5 s): its connections
	// set their read deadline anew on every read, which undoes the one
	// net/http sets to stop reading. The other member's end of it waits
	// as long. Wait for them (this runs last), so that the package's leak
	// check sees only real leaks.
	running := goleak.IgnoreCurrent()
	t.Cleanup(func() {
		testutil.Eventually(t, time.Minute, "the members' peer connections to close", func() bool { return goleak.Find(running) == nil })
	})
	dir := t.TempDir()
	ca, other := testutil.NewCA(t, "peers CA"), testutil.NewCA(t, "another CA")
	caFile, otherFile := ca.WriteCert(t, filepath.Join(dir, "ca.pem")), other.WriteCert(t, filepath.Join(dir, "other.pem"))
	var cfgs []*server.Config
	var initial []string
	for i := range 3 {
		cfg := servertest.Config(t, "")
		cfg.Name = fmt.Sprint("n", i)
		issuer, trusted := ca, caFile
		if i == 2 {
			issuer, trusted = other, otherFile
		}
		cfg.EtcdPeerCertFile, cfg.EtcdPeerKeyFile = issuer.Issue(t, dir, cfg.Name, testutil.CertSpec{Names: []string{"127.0.0.1"}, Peer: true})
		cfg.EtcdPeerCAFile = trusted
		initial = append(initial, cfg.Name+"=https://"+cfg.EtcdPeerAddr)
		cfgs = append(cfgs, cfg)
	}
	logs := &syncBuffer{}
	for _, cfg := range cfgs {
		cfg.EtcdInitialCluster = strings.Join(initial, ",")
	}
	cfgs[0].Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelWarn}))

	// The good two start together: each waits for a quorum.
	srvs := make([]*server.Server, 2)
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for i := range srvs {
		wg.Go(func() { srvs[i], errs[i] = servertest.StartErr(cfgs[i]) })
	}
	wg.Wait()
	for i, srv := range srvs {
		if srv != nil {
			t.Cleanup(func() { srv.Close() })
		}
		if errs[i] != nil {
			t.Fatalf("member n%d: %v", i, errs[i])
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := srvs[0].EtcdClient().Put(ctx, "/cluster-test", "replicated"); err != nil {
		t.Fatalf("Put on n0: %v", err)
	}
	if resp, err := srvs[1].EtcdClient().Get(ctx, "/cluster-test"); err != nil || len(resp.Kvs) != 1 {
		t.Errorf("Get on n1 = %v, %v; want the value put on n0", resp, err)
	}

	// The peer port itself: the handshake wants a certificate of the CA.
	peerURL := "https://" + cfgs[0].EtcdPeerAddr
	if err := getVersion(peerURL, tlsFiles(t, caFile, "", "")); err == nil {
		t.Error("n0's peer port admitted a client without a certificate")
	}
	rogueTrustingCA := tlsFiles(t, caFile, cfgs[2].EtcdPeerCertFile, cfgs[2].EtcdPeerKeyFile)
	if err := getVersion(peerURL, rogueTrustingCA); err == nil {
		t.Error("n0's peer port admitted a certificate of another CA")
	}
	if err := getVersion(peerURL, tlsFiles(t, caFile, cfgs[1].EtcdPeerCertFile, cfgs[1].EtcdPeerKeyFile)); err != nil {
		t.Errorf("n0's peer port with n1's certificate: %v, want admitted", err)
	}

	// The rogue member tries to join: n0 refuses its connections, and it
	// never becomes ready.
	rctx, rcancel := context.WithCancel(ctx)
	defer rcancel()
	rogue := make(chan error, 1)
	go func() {
		srv, err := server.Start(rctx, cfgs[2])
		if err == nil { // it should not have: said below
			srv.Close()
		}
		rogue <- err
	}()
	testutil.Eventually(t, time.Minute, "n0 to refuse the rogue member's connection", func() bool {
		return strings.Contains(logs.String(), "rejected connection on peer endpoint")
	})
	rcancel()
	if err := <-rogue; err == nil {
		t.Error("the member with a certificate of another CA started")
	}
	if _, err := srvs[0].EtcdClient().Put(ctx, "/cluster-test", "still"); err != nil {
		t.Errorf("Put on n0 after the rogue's attempt: %v", err)
	}
}

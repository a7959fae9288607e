package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"beacon.dev/beacon/internal/testutil"
)

// xdsACLRefusal is what grpc-go's xDS client reports, inside every failed
// call's status, when beacon's ACL check refuses its ADS stream: the
// server's own words, so the stream got past TLS to the ACL check.
const xdsACLRefusal = `code = PermissionDenied desc = xds: permission denied: needs service:read on "default/orders"`

// beacon's xDS control plane over mutual TLS with ACLs, as an operator
// sets it up, with real processes only: `beacon server --acl --tls-cert
// --tls-key --tls-client-ca --xds-addr`, certificates from `beacon dev
// certs`, the management token from `beacon acl bootstrap`, a policy
// reading orders and a role named like the common name of the client
// certificate that may use it, three echo processes registered as orders
// with `beacon register --persistent`, bootstrap files from `beacon xds
// bootstrap --xds-ca-cert --xds-client-cert --xds-client-key`, and
// grpc-go's own xDS client (e2e/internal/xdsclient) on each bootstrap.
//
// The client whose certificate names the role reaches all three
// instances, and not one of its calls fails. Every call of a client whose
// certificate names no role fails with the server's PERMISSION_DENIED
// naming orders (its stream passed the TLS handshake: the ACL refused
// it). Every call of a client with no certificate, or with one of another
// CA (naming the role), fails at the TLS handshake, before any ACL. And
// the server audits the ACL refusal (docs/security.md, "Audit log").
func TestXDSOverMTLSWithACLs(t *testing.T) {
	dir := t.TempDir()
	certs := filepath.Join(dir, "certs")
	if out, err := run(t, nil, "dev", "certs", "--dir", certs, "--clients", "admin,orders-reader,stranger"); err != nil {
		t.Fatalf("beacon dev certs: %v\n%s", err, out)
	}
	ca := filepath.Join(certs, "ca.pem")
	cert := func(name string) (string, string) {
		return filepath.Join(certs, "client-"+name+".pem"), filepath.Join(certs, "client-"+name+"-key.pem")
	}
	// The same common name as the role, signed by a CA the server does
	// not trust.
	foreignCert, foreignKey := testutil.NewCA(t, "another CA").Issue(t, t.TempDir(), "orders-reader", testutil.CertSpec{Client: true})

	xdsAddr := testutil.FreeAddr(t)
	auditLog := filepath.Join(dir, "audit", "audit.log")
	srv := newServerProc(t, "--acl", "--audit-log", auditLog,
		"--tls-cert", filepath.Join(certs, "server.pem"), "--tls-key", filepath.Join(certs, "server-key.pem"),
		"--tls-client-ca", ca, "--xds-addr", xdsAddr)

	// The operator: the admin certificate (mTLS wants one on every call;
	// no role is named admin) and, once bootstrapped, the management
	// token.
	adminCert, adminKey := cert("admin")
	env := []string{"BEACON_ADDR=" + srv.addr, "BEACON_CACERT=" + ca, "BEACON_CLIENT_CERT=" + adminCert, "BEACON_CLIENT_KEY=" + adminKey}
	var boot struct {
		SecretID string `json:"secretId"`
	}
	if out := cliOutput(t, env, "acl", "bootstrap", "-o", "json"); json.Unmarshal([]byte(out), &boot) != nil || boot.SecretID == "" {
		t.Fatalf("beacon acl bootstrap -o json printed %q", out)
	}
	env = append(env, "BEACON_TOKEN="+boot.SecretID)
	cliOutput(t, env, "acl", "policy", "create", "--name", "orders-read", "--rules", "read service default/orders")
	cliOutput(t, env, "acl", "role", "create", "--name", "orders-reader", "--policy", "orders-read")

	// What each certificate is, without a token (the API's view of it).
	readerCert, readerKey := cert("orders-reader")
	strangerCert, strangerKey := cert("stranger")
	for _, w := range []struct{ cert, key, want string }{
		{readerCert, readerKey, "AccessorID:         role:orders-reader\n"},
		{strangerCert, strangerKey, "AccessorID:         anonymous\n"},
	} {
		out := cliOutput(t, []string{"BEACON_ADDR=" + srv.addr, "BEACON_CACERT=" + ca, "BEACON_CLIENT_CERT=" + w.cert, "BEACON_CLIENT_KEY=" + w.key},
			"acl", "whoami")
		if !strings.Contains(out, w.want) {
			t.Fatalf("beacon acl whoami with %s: want %q in\n%s", filepath.Base(w.cert), w.want, out)
		}
	}

	// Three instances of orders. The echo service's SDK speaks neither TLS
	// nor tokens, so each serves unregistered (its registry address leads
	// nowhere) and the operator registers it.
	nowhere := testutil.FreeAddr(t)
	ids := []string{"o1", "o2", "o3"}
	for _, id := range ids {
		host, port := startPlainEcho(t, nowhere, id)
		cliOutput(t, env, "register", "--persistent", "--service", "orders", "--id", id, "--address", host, "--port", port)
	}
	reg := start(t, "watch", "--server", srv.addr, "--ca-cert", ca, "--client-cert", adminCert, "--client-key", adminKey,
		"--token", boot.SecretID, "orders")
	reg.waitLine(30*time.Second, "default/orders routable=3 total=3")

	bootstrap := func(extra ...string) string {
		out := cliOutput(t, nil, append([]string{"xds", "bootstrap", "--service", "client", "--xds-server", xdsAddr}, extra...)...)
		file := filepath.Join(t.TempDir(), "xds-bootstrap.json")
		if err := os.WriteFile(file, []byte(out), 0o600); err != nil {
			t.Fatal(err)
		}
		return file
	}
	// The refused clients give up on a call after 2 s (a refused call
	// waits for its whole timeout): a call's error then says why.
	reader := startXDSClient(t, "orders-reader", bootstrap("--xds-ca-cert", ca, "--xds-client-cert", readerCert, "--xds-client-key", readerKey))
	stranger := startXDSClient(t, "stranger", bootstrap("--xds-ca-cert", ca, "--xds-client-cert", strangerCert, "--xds-client-key", strangerKey),
		"-timeout", "2s")
	noCert := startXDSClient(t, "no certificate", bootstrap("--xds-ca-cert", ca), "-timeout", "2s")
	foreign := startXDSClient(t, "another CA's certificate", bootstrap("--xds-ca-cert", ca, "--xds-client-cert", foreignCert, "--xds-client-key", foreignKey),
		"-timeout", "2s")

	step := func(name string, f func(t *testing.T)) {
		if !t.Run(name, f) {
			t.FailNow()
		}
	}

	step("the role's certificate reaches every instance", func(t *testing.T) {
		eventually(t, reader, 200, "calls on all three instances", func(c xdsTally) bool {
			return c.failed == 0 && c.by["o1"] > 0 && c.by["o2"] > 0 && c.by["o3"] > 0 && c.by["o1"]+c.by["o2"]+c.by["o3"] == c.n
		})
	})

	atTLS := func(err string) bool { return strings.Contains(err, "tls: ") || strings.Contains(err, "handshake") }
	atACL := func(err string) bool {
		return strings.Contains(err, "PermissionDenied") || strings.Contains(err, "permission denied")
	}

	step("a certificate without a role is refused by the ACL", func(t *testing.T) {
		refused(t, stranger, 8, "the ACL's refusal", func(err string) bool { return strings.Contains(err, xdsACLRefusal) }, "a TLS failure", atTLS)
	})

	// A certificate of another CA is not even offered: Go's TLS client
	// presents only a certificate of a CA the server's request names, so
	// the server sees none, as with no certificate at all.
	for _, c := range []*xdsClientProc{noCert, foreign} {
		step("a client with "+c.name+" is refused at the TLS handshake", func(t *testing.T) {
			refused(t, c, 4, "a TLS refusal", func(err string) bool { return strings.Contains(err, "remote error: tls: certificate required") }, "the ACL's refusal", atACL)
		})
	}

	step("over the whole test, no call of the role's client failed and none of the others succeeded", func(t *testing.T) {
		if all := tally(reader.since(0)); all.failed > 0 || all.n == 0 {
			t.Errorf("client %s: %d of %d calls failed: %v", reader.name, all.failed, all.n, all.errs)
		}
		for _, c := range []*xdsClientProc{stranger, noCert, foreign} {
			if all := tally(c.since(0)); all.failed < all.n {
				t.Errorf("client %s: %d of %d calls succeeded (per instance %v), want none", c.name, all.n-all.failed, all.n, all.by)
			}
		}
	})

	// The server's side of the refusal: the audit log writes "every call
	// refused for its token (denied or unauthenticated)"
	// (docs/security.md, "Audit log"); an ADS stream the ACL refused is
	// one.
	t.Run("the server audits the ACL's refusal", func(t *testing.T) {
		var lines []string
		defer func() {
			if t.Failed() {
				t.Logf("the audit log's denied lines:\n%s", strings.Join(lines, "\n"))
			}
		}()
		testutil.Eventually(t, 30*time.Second, "a denied xDS stream in the audit log", func() bool {
			lines = deniedAuditLines(t, auditLog)
			for _, l := range lines {
				if strings.Contains(l, "AggregatedDiscoveryService") && strings.Contains(l, "default/orders") {
					return true
				}
			}
			return false
		})
	})
}

// cliOutput runs the beacon CLI and returns its standard output; it fails
// the test unless the command succeeds.
func cliOutput(t *testing.T, env []string, args ...string) string {
	t.Helper()
	cmd := exec.Command(beaconBin, args...)
	dieWithTest(cmd)
	cmd.Env = append(cmd.Environ(), env...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("beacon %s: %v\n%s%s", strings.Join(args, " "), err, out, stderr.String())
	}
	return string(out)
}

// startPlainEcho runs an echo service of orders whose gRPC server serves
// at once, registered nowhere (registry leads nowhere: it serves
// unregistered, retrying), and returns its gRPC address.
func startPlainEcho(t *testing.T, registry, id string) (host, port string) {
	t.Helper()
	p := startBin(t, echoBin, "--registry", registry, "--service", "orders", "--id", id)
	line := p.waitLine(30*time.Second, "echo: serving ")
	var addrs map[string]string
	if err := json.Unmarshal([]byte(line[strings.Index(line, "{"):]), &addrs); err != nil {
		t.Fatalf("echo printed %q: %v", line, err)
	}
	host, port, err := net.SplitHostPort(addrs["grpc"])
	if err != nil {
		t.Fatalf("echo printed %q: %v", line, err)
	}
	return host, port
}

// refused waits until n of the client's calls have failed as want says,
// reporting them as what. Every call it ever made must have failed, and
// none as reject says (named other).
func refused(t *testing.T, c *xdsClientProc, n int, what string, want func(err string) bool, other string, reject func(err string) bool) {
	t.Helper()
	var all xdsTally
	testutil.Eventually(t, 60*time.Second, fmt.Sprintf("%d calls of client %s failing with %s", n, c.name, what), func() bool {
		select {
		case <-c.done:
			t.Fatalf("xdsclient %s exited", c.name)
		default:
		}
		calls := c.since(0)
		all = tally(calls)
		if all.failed < all.n {
			t.Fatalf("client %s: %d of its %d calls succeeded (per instance %v), want none", c.name, all.n-all.failed, all.n, all.by)
		}
		matched := 0
		for _, call := range calls {
			if reject(call.err) {
				t.Fatalf("client %s: a call failed with %s, want %s: %s", c.name, other, what, call.err)
			}
			if want(call.err) {
				matched++
			}
		}
		return matched >= n
	})
	t.Logf("client %s: %d calls, all failed: %v", c.name, all.n, all.errs)
}

// deniedAuditLines returns the audit log's lines whose outcome is denied.
func deniedAuditLines(t *testing.T, file string) []string {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var denied []string
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var e struct{ Outcome string }
		if json.Unmarshal(sc.Bytes(), &e) == nil && e.Outcome == "denied" {
			denied = append(denied, sc.Text())
		}
	}
	return denied
}

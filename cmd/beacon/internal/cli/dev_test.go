package cli_test

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"beacon.dev/beacon/server/servertest"
)

func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := pem.Decode(data)
	if b == nil || b.Type != "CERTIFICATE" {
		t.Fatalf("%s: no PEM certificate", path)
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return c
}

// printedArgs returns the words after prefix on the line of out that
// starts with it.
func printedArgs(t *testing.T, out, prefix string) []string {
	t.Helper()
	for line := range strings.Lines(out) {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(line), prefix); ok {
			return strings.Fields(rest)
		}
	}
	t.Fatalf("no line starting %q in:\n%s", prefix, out)
	return nil
}

// beacon dev certs makes what a server with mTLS and a client need: the
// commands it prints start such a server and call it.
func TestDevCertsServeMutualTLS(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "certs")
	code, out, errs := run("dev", "certs", "--dir", dir)
	if code != 0 {
		t.Fatalf("dev certs = %d %q %q", code, out, errs)
	}
	t.Logf("dev certs:\n%s", out)

	// The files, their modes.
	if st, err := os.Stat(dir); err != nil || st.Mode() != os.ModeDir|0o700 {
		t.Errorf("%s: %v (%v), want a directory 0700", dir, st.Mode(), err)
	}
	for _, name := range []string{"ca", "server", "client-admin"} {
		if st, err := os.Stat(filepath.Join(dir, name+"-key.pem")); err != nil || st.Mode() != 0o600 {
			t.Errorf("%s-key.pem: mode %v (%v), want 0600", name, st.Mode(), err)
		}
		if st, err := os.Stat(filepath.Join(dir, name+".pem")); err != nil || st.Mode()&0o022 != 0 {
			t.Errorf("%s.pem: mode %v (%v), want writable by its owner only", name, st.Mode(), err)
		}
	}

	// What the certificates say.
	ca, srvCert, cli := readCert(t, filepath.Join(dir, "ca.pem")), readCert(t, filepath.Join(dir, "server.pem")), readCert(t, filepath.Join(dir, "client-admin.pem"))
	if !ca.IsCA || ca.NotAfter.Sub(ca.NotBefore) != 365*24*time.Hour+time.Hour {
		t.Errorf("CA: IsCA %v, valid %v; want a CA valid 365 days (and an hour before)", ca.IsCA, ca.NotAfter.Sub(ca.NotBefore))
	}
	if got := srvCert.DNSNames; len(got) != 1 || got[0] != "localhost" || len(srvCert.IPAddresses) != 2 || srvCert.IPAddresses[0].String() != "127.0.0.1" || srvCert.IPAddresses[1].String() != "::1" {
		t.Errorf("server SANs: DNS %v, IP %v; want localhost, 127.0.0.1 and ::1", got, srvCert.IPAddresses)
	}
	if cli.Subject.CommonName != "admin" || len(cli.URIs) != 1 || cli.URIs[0].String() != "spiffe://beacon/client/admin" || !cli.NotAfter.Equal(ca.NotAfter) {
		t.Errorf("client: CN %q, URIs %v, until %v; want admin, spiffe://beacon/client/admin, until the CA's %v", cli.Subject.CommonName, cli.URIs, cli.NotAfter, ca.NotAfter)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	if _, err := cli.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("the client certificate does not verify for client auth: %v", err)
	}

	// The server as printed: beacon server --tls-cert … --tls-key … --tls-client-ca ….
	flags := map[string]string{}
	args := printedArgs(t, out, "beacon server ")
	for i := 0; i+1 < len(args); i += 2 {
		flags[args[i]] = args[i+1]
	}
	cfg := servertest.Config(t, "")
	cfg.TLSCertFile, cfg.TLSKeyFile, cfg.TLSClientCAFile = flags["--tls-cert"], flags["--tls-key"], flags["--tls-client-ca"]
	if cfg.TLSCertFile != filepath.Join(dir, "server.pem") || cfg.TLSKeyFile != filepath.Join(dir, "server-key.pem") || cfg.TLSClientCAFile != filepath.Join(dir, "ca.pem") {
		t.Fatalf("printed server flags %v", flags)
	}
	srv := servertest.Start(t, cfg)

	// The client as printed: export BEACON_CACERT=… BEACON_CLIENT_CERT=… BEACON_CLIENT_KEY=….
	env := printedArgs(t, out, "export ")
	if len(env) != 3 {
		t.Fatalf("printed environment %v, want 3 variables", env)
	}
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		t.Setenv(k, v)
	}
	s := "--server=" + srv.Addr()
	if code, out, errs := run(s, "register", "--persistent", "--service", "web", "--id", "w-1", "--address", "127.0.0.1", "--port", "8080"); code != 0 {
		t.Fatalf("register with the client certificate = %d %q %q", code, out, errs)
	}
	if code, out, errs := run(s, "instances", "web"); code != 0 || !strings.Contains(out, "w-1") {
		t.Errorf("instances with the client certificate = %d %q %q", code, out, errs)
	}
	if code, _, _ := run(s, "--client-cert", "", "--client-key", "", "services"); code == 0 {
		t.Error("services without a client certificate: got through")
	}
}

// Existing files are left alone unless --force; --force replaces them
// all, keys still 0600.
func TestDevCertsRefusesToOverwrite(t *testing.T) {
	dir := t.TempDir() // exists already: that is fine
	if code, out, errs := run("dev", "certs", "--dir", dir, "--clients", "admin,orders"); code != 0 {
		t.Fatalf("dev certs = %d %q %q", code, out, errs)
	}
	before, _ := os.ReadFile(filepath.Join(dir, "ca.pem"))
	code, out, errs := run("dev", "certs", "--dir", dir, "--clients", "ops")
	if code != 1 || !strings.Contains(errs, "refusing to overwrite ca.pem, ca-key.pem, server.pem, server-key.pem in "+dir) || !strings.Contains(errs, "--force") || out != "" {
		t.Errorf("dev certs again = %d, stdout %q, stderr %q; want 1 naming the files and --force", code, out, errs)
	}
	if _, err := os.Stat(filepath.Join(dir, "client-ops.pem")); err == nil {
		t.Error("the refused run wrote client-ops.pem")
	}
	if after, _ := os.ReadFile(filepath.Join(dir, "ca.pem")); !bytes.Equal(before, after) {
		t.Error("the refused run changed ca.pem")
	}

	os.Chmod(filepath.Join(dir, "ca-key.pem"), 0o644) // to see --force set it back
	if code, out, errs := run("dev", "certs", "--dir", dir, "--force"); code != 0 {
		t.Fatalf("dev certs --force = %d %q %q", code, out, errs)
	}
	if after, _ := os.ReadFile(filepath.Join(dir, "ca.pem")); bytes.Equal(before, after) {
		t.Error("--force left ca.pem as it was")
	}
	for _, name := range []string{"ca-key.pem", "server-key.pem", "client-admin-key.pem"} {
		if st, err := os.Stat(filepath.Join(dir, name)); err != nil || st.Mode() != 0o600 {
			t.Errorf("%s after --force: %v (%v), want 0600", name, st.Mode(), err)
		}
	}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ".") {
			t.Errorf("--force left %s behind", e.Name())
		}
	}
}

// --valid takes days or a Go duration; the flags are checked.
func TestDevCertsFlags(t *testing.T) {
	for _, tc := range []struct {
		valid string
		want  time.Duration
	}{
		{"30d", 30 * 24 * time.Hour},
		{"36h", 36 * time.Hour},
		{"1d12h0m0s", 0}, // days are a whole number on their own
	} {
		dir := t.TempDir()
		code, _, errs := run("dev", "certs", "--dir", dir, "--valid", tc.valid)
		if tc.want == 0 {
			if code != 1 || !strings.Contains(errs, `invalid argument "`+tc.valid+`" for "--valid"`) {
				t.Errorf("--valid %s = %d %q, want refused", tc.valid, code, errs)
			}
			continue
		}
		if code != 0 {
			t.Fatalf("--valid %s = %d %q", tc.valid, code, errs)
		}
		c := readCert(t, filepath.Join(dir, "client-admin.pem"))
		if got := c.NotAfter.Sub(c.NotBefore); got != tc.want+time.Hour {
			t.Errorf("--valid %s: valid %v, want %v (and the hour before)", tc.valid, got, tc.want)
		}
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--valid", "0d"}, "must be positive"},
		{[]string{"--valid", "-5h"}, "must be positive"},
		{[]string{"--valid", "1.5d"}, "want a number of days"},
		{[]string{"--valid", "soon"}, "want a number of days"},
		{[]string{"--valid", "36501d"}, "at most 36500d"},
		{[]string{"--valid", "9999999999999999d"}, "at most 36500d"},
		{[]string{"--clients", "a/b"}, `invalid --clients name "a/b"`},
		{[]string{"--clients", "admin,admin"}, `"admin" twice`},
		{[]string{"--hosts", "bad host"}, `invalid --hosts entry "bad host"`},
		{[]string{"--hosts", ""}, "invalid --hosts"},
	} {
		dir := t.TempDir()
		code, _, errs := run(append([]string{"dev", "certs", "--dir", dir}, tc.args...)...)
		if code != 1 || !strings.Contains(errs, tc.want) {
			t.Errorf("dev certs %v = %d %q, want 1 saying %q", tc.args, code, errs, tc.want)
		}
		if entries, _ := os.ReadDir(dir); len(entries) != 0 {
			t.Errorf("dev certs %v wrote files though refused", tc.args)
		}
	}
}

package cli

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"
)

func newDevCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "dev",
		Short: "Helpers for development and trials: certificates",
	}
	hideClientFlags(cmd)
	cmd.AddCommand(newDevCertsCmd(g))
	return cmd
}

// devCerts are the flags of beacon dev certs.
type devCerts struct {
	dir     string
	hosts   []string
	clients []string
	valid   days
	force   bool
}

func newDevCertsCmd(g *globals) *cobra.Command {
	dc := &devCerts{valid: days(365 * 24 * time.Hour)}
	cmd := &cobra.Command{
		Use:   "certs",
		Short: "Make a CA, a server certificate and client certificates for TLS and mTLS",
		Long: `certs makes, in --dir, a CA (ca.pem, ca-key.pem), a certificate for the
server (server.pem, server-key.pem) naming --hosts, and a client
certificate for each of --clients (client-NAME.pem, client-NAME-key.pem,
with CN=NAME and the URI spiffe://beacon/client/NAME). Keys are ECDSA
P-256, written 0600; the directory is made 0700. Every certificate is
valid for --valid. It prints the commands that use them.

It is for trials and development: the CA key sits beside the
certificates. In production, use your own CA. See docs/security.md.`,
		Example: `  beacon dev certs
  beacon dev certs --dir /etc/beacon/tls --hosts 10.0.0.5,beacon.internal --clients admin,orders --valid 90d`,
		Args: cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error { return dc.run(g) },
	}
	f := cmd.Flags()
	f.StringVar(&dc.dir, "dir", "./beacon-certs", "directory to write the files into (made 0700 if missing)")
	f.StringSliceVar(&dc.hosts, "hosts", []string{"127.0.0.1", "localhost", "::1"}, "the server's addresses: IP addresses and DNS names, comma-separated")
	f.StringSliceVar(&dc.clients, "clients", []string{"admin"}, "names of the client certificates to make, comma-separated")
	f.Var(&dc.valid, "valid", `how long the certificates are valid: days ("365d") or a Go duration ("720h")`)
	f.BoolVar(&dc.force, "force", false, "replace files already in --dir")
	return cmd
}

// days is a duration flag that takes days ("365d"), how certificates are
// reckoned, besides what the other duration flags take ("720h").
type days time.Duration

// maxValid: a dev certificate for more than a century is a typo.
const maxValid = 100 * 365 * 24 * time.Hour

func (d *days) Set(s string) error {
	var v time.Duration
	if n, ok := strings.CutSuffix(s, "d"); ok {
		i, err := strconv.ParseInt(n, 10, 64)
		if err != nil {
			return fmt.Errorf("want a number of days (365d) or a Go duration (720h)")
		}
		if i > int64(maxValid/(24*time.Hour)) {
			return fmt.Errorf("at most %dd", maxValid/(24*time.Hour))
		}
		v = time.Duration(i) * 24 * time.Hour
	} else {
		var err error
		if v, err = time.ParseDuration(s); err != nil {
			return fmt.Errorf("want a number of days (365d) or a Go duration (720h)")
		}
	}
	switch {
	case v <= 0:
		return errors.New("must be positive")
	case v > maxValid:
		return fmt.Errorf("at most %dd", maxValid/(24*time.Hour))
	}
	*d = days(v)
	return nil
}

func (d *days) String() string {
	v := time.Duration(*d)
	if v%(24*time.Hour) == 0 {
		return fmt.Sprintf("%dd", v/(24*time.Hour))
	}
	return v.String()
}

func (d *days) Type() string { return "duration" }

var (
	clientName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)
	dnsName    = regexp.MustCompile(`^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*\.?$`)
)

// pemFile is one file to write.
type pemFile struct {
	name string
	kind string // PEM block type
	der  []byte
	mode os.FileMode
}

func (dc *devCerts) run(g *globals) error {
	var ips []net.IP
	var names, hosts []string
	for _, h := range dc.hosts {
		h = strings.Trim(strings.TrimSpace(h), "[]")
		hosts = append(hosts, h)
		if ip := net.ParseIP(h); ip != nil {
			ips = append(ips, ip)
		} else if len(h) <= 253 && dnsName.MatchString(h) {
			names = append(names, h)
		} else {
			return fmt.Errorf("invalid --hosts entry %q: want an IP address or a DNS name", h)
		}
	}
	if len(ips)+len(names) == 0 {
		return errors.New("invalid --hosts: name at least one address or DNS name")
	}
	seen := map[string]bool{}
	for _, c := range dc.clients {
		if !clientName.MatchString(c) {
			return fmt.Errorf("invalid --clients name %q: want letters, digits, '.', '_' or '-', at most 64, starting with a letter or digit", c)
		}
		if seen[c] {
			return fmt.Errorf("invalid --clients: %q twice", c)
		}
		seen[c] = true
	}

	// Certificates carry whole seconds: from a whole second, each one's
	// validity is exactly --valid (and an hour of clock skew before).
	now := time.Now().Truncate(time.Second)
	notBefore, notAfter := now.Add(-time.Hour), now.Add(time.Duration(dc.valid))
	caKey, caKeyDER, err := newKey()
	if err != nil {
		return err
	}
	caTmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: "beacon dev CA", Organization: []string{"beacon dev certs"}},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := sign(caTmpl, caTmpl, caKey, caKey)
	if err != nil {
		return err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return fmt.Errorf("dev certs: %w", err)
	}
	files := []pemFile{
		{"ca.pem", "CERTIFICATE", caDER, 0o644},
		{"ca-key.pem", "PRIVATE KEY", caKeyDER, 0o600},
	}
	leaf := func(name string, tmpl *x509.Certificate) error {
		key, keyDER, err := newKey()
		if err != nil {
			return err
		}
		tmpl.NotBefore, tmpl.NotAfter = notBefore, notAfter
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature
		der, err := sign(tmpl, ca, key, caKey)
		if err != nil {
			return err
		}
		files = append(files, pemFile{name + ".pem", "CERTIFICATE", der, 0o644}, pemFile{name + "-key.pem", "PRIVATE KEY", keyDER, 0o600})
		return nil
	}
	if err := leaf("server", &x509.Certificate{
		Subject: pkix.Name{CommonName: "beacon server"},
		// Client auth too: in cluster mode the same certificate is each
		// member's etcd peer certificate, which it presents as a client.
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IPAddresses: ips, DNSNames: names,
	}); err != nil {
		return err
	}
	for _, c := range dc.clients {
		if err := leaf("client-"+c, &x509.Certificate{
			Subject:     pkix.Name{CommonName: c},
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
			URIs:        []*url.URL{{Scheme: "spiffe", Host: "beacon", Path: "/client/" + c}},
		}); err != nil {
			return err
		}
	}

	dir, err := filepath.Abs(dc.dir)
	if err != nil {
		return fmt.Errorf("dev certs: %w", err)
	}
	var existing []string
	for _, f := range files {
		if _, err := os.Lstat(filepath.Join(dir, f.name)); err == nil {
			existing = append(existing, f.name)
		}
	}
	if len(existing) > 0 && !dc.force {
		return fmt.Errorf("dev certs: refusing to overwrite %s in %s: give --force to replace them all (with a new CA: certificates it signed before are no longer trusted)", strings.Join(existing, ", "), dir)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("dev certs: %w", err)
	}
	for _, f := range files {
		if err := writeNew(filepath.Join(dir, f.name), pem.EncodeToMemory(&pem.Block{Type: f.kind, Bytes: f.der}), f.mode, dc.force); err != nil {
			return fmt.Errorf("dev certs: %w", err)
		}
	}
	dc.print(g, dir, hosts, notAfter)
	return nil
}

func newKey() (*ecdsa.PrivateKey, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("dev certs: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("dev certs: %w", err)
	}
	return key, der, nil
}

// sign makes tmpl a certificate for key's public key, signed by parent's
// key, with a random 128-bit serial number.
func sign(tmpl, parent *x509.Certificate, key, parentKey *ecdsa.PrivateKey) ([]byte, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, fmt.Errorf("dev certs: %w", err)
	}
	tmpl.SerialNumber = serial
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		return nil, fmt.Errorf("dev certs: %s: %w", tmpl.Subject.CommonName, err)
	}
	return der, nil
}

// writeNew writes a file with mode. Without replace it fails if the file
// exists; with it, the file is replaced whole (a temporary file renamed),
// so that it gets mode and a reader never sees half of it.
func writeNew(path string, data []byte, mode os.FileMode, replace bool) error {
	if !replace {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
		if err != nil {
			return err
		}
		_, err = f.Write(data)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(path), ".beacon-dev-certs-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name()) // fails harmlessly after the rename
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(mode)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if st, err := os.Lstat(path); err == nil && st.IsDir() {
		return fmt.Errorf("%s is a directory", path)
	} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return os.Rename(f.Name(), path)
}

func (dc *devCerts) print(g *globals, dir string, hosts []string, notAfter time.Time) {
	p := func(name string) string { return shellQuote(filepath.Join(dir, name)) }
	w := g.stdout
	fmt.Fprintf(w, "wrote to %s, valid until %s:\n", dir, notAfter.UTC().Format("2006-01-02 15:04 MST"))
	fmt.Fprintf(w, "  ca.pem, ca-key.pem: the CA (ca-key.pem signs certificates: keep it secret)\n")
	fmt.Fprintf(w, "  server.pem, server-key.pem: the server, for %s\n", strings.Join(hosts, ", "))
	for _, c := range dc.clients {
		fmt.Fprintf(w, "  client-%s.pem, client-%s-key.pem: client %s (spiffe://beacon/client/%s)\n", c, c, c, c)
	}

	// A host beyond loopback: the server must listen there, and the
	// clients dial it.
	addr := ""
	for _, h := range hosts {
		if ip := net.ParseIP(h); (ip != nil && !ip.IsLoopback()) || (ip == nil && h != "localhost") {
			addr = net.JoinHostPort(strings.TrimSuffix(h, "."), defaultPort)
			break
		}
	}
	fmt.Fprintf(w, "\nServe the API over TLS, requiring client certificates of this CA (mTLS):\n  beacon server")
	if addr != "" {
		fmt.Fprintf(w, " --addr %s", shellQuote(addr))
	}
	fmt.Fprintf(w, " --tls-cert %s --tls-key %s --tls-client-ca %s\n", p("server.pem"), p("server-key.pem"), p("ca.pem"))
	if len(dc.clients) == 0 {
		fmt.Fprintf(w, "\nClients trust the server with:\n  export BEACON_CACERT=%s\n", p("ca.pem"))
		return
	}
	c := dc.clients[0]
	fmt.Fprintf(w, "\nCall it as %s (the CLI and client.TLSFromFiles read the same files):\n", c)
	fmt.Fprintf(w, "  export BEACON_CACERT=%s BEACON_CLIENT_CERT=%s BEACON_CLIENT_KEY=%s\n", p("ca.pem"), p("client-"+c+".pem"), p("client-"+c+"-key.pem"))
	if addr != "" {
		fmt.Fprintf(w, "  beacon --server %s services\n", shellQuote(addr))
	} else {
		fmt.Fprintf(w, "  beacon services\n")
	}
}

// shellQuote quotes s for a POSIX shell when it needs it.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789@%+=:,./_-") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

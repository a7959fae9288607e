package server

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"
)

// certFiles serves the API port's certificate, and the CAs client
// certificates must chain to, from files read again whenever they change
// (checked at most once a second): a renewed certificate takes effect on
// the next handshake, without a restart. A file that cannot be read or
// parsed leaves the last good one in use.
type certFiles struct {
	certFile, keyFile, clientCAFile string
	log                             *slog.Logger

	mu        sync.Mutex
	checked   time.Time        // guarded by mu
	stamp     string           // guarded by mu: the files' sizes and times last loaded
	cert      *tls.Certificate // guarded by mu
	clientCAs *x509.CertPool   // guarded by mu
	lastErr   string           // guarded by mu: the last reload's failure, logged once
}

func newCertFiles(certFile, keyFile, clientCAFile string, log *slog.Logger) (*certFiles, error) {
	cf := &certFiles{certFile: certFile, keyFile: keyFile, clientCAFile: clientCAFile, log: log}
	if err := cf.reload(); err != nil {
		return nil, err
	}
	return cf, nil
}

func (cf *certFiles) files() []string {
	out := []string{cf.certFile, cf.keyFile}
	if cf.clientCAFile != "" {
		out = append(out, cf.clientCAFile)
	}
	return out
}

func stampOf(files []string) (string, error) {
	stamp := ""
	for _, f := range files {
		st, err := os.Stat(f)
		if err != nil {
			return "", err
		}
		stamp += fmt.Sprintf("%s:%d:%d;", f, st.Size(), st.ModTime().UnixNano())
	}
	return stamp, nil
}

// reload reads the files if they changed since the last load.
func (cf *certFiles) reload() error {
	stamp, err := stampOf(cf.files())
	if err != nil {
		return fmt.Errorf("server: TLS files: %w", err)
	}
	cf.mu.Lock()
	same := stamp == cf.stamp
	cf.mu.Unlock()
	if same {
		return nil
	}
	cert, err := tls.LoadX509KeyPair(cf.certFile, cf.keyFile)
	if err != nil {
		return fmt.Errorf("server: --tls-cert %s / --tls-key %s: %w", cf.certFile, cf.keyFile, err)
	}
	var pool *x509.CertPool
	if cf.clientCAFile != "" {
		pem, err := os.ReadFile(cf.clientCAFile)
		if err != nil {
			return fmt.Errorf("server: --tls-client-ca: %w", err)
		}
		pool = x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("server: --tls-client-ca %s: no PEM certificate in it", cf.clientCAFile)
		}
	}
	cf.mu.Lock()
	cf.cert, cf.clientCAs, cf.stamp = &cert, pool, stamp
	cf.mu.Unlock()
	return nil
}

// current reloads at most once a second and returns what is in force.
func (cf *certFiles) current() (*tls.Certificate, *x509.CertPool) {
	cf.mu.Lock()
	due := time.Since(cf.checked) >= time.Second
	if due {
		cf.checked = time.Now()
	}
	cf.mu.Unlock()
	if due {
		// A renewal written badly keeps the last good files in force; say
		// so once, not at every handshake.
		msg := ""
		if err := cf.reload(); err != nil {
			msg = err.Error()
		}
		cf.mu.Lock()
		changed := msg != cf.lastErr
		cf.lastErr = msg
		cf.mu.Unlock()
		if changed && msg != "" {
			cf.log.Warn("TLS files could not be reloaded; the last good certificate stays in use", "err", msg)
		}
	}
	cf.mu.Lock()
	defer cf.mu.Unlock()
	return cf.cert, cf.clientCAs
}

// config is the listener's TLS configuration: HTTP/2 and HTTP/1.1, the
// current certificate at every handshake and, with a client CA, a
// verified client certificate required.
func (cf *certFiles) config() *tls.Config {
	base := &tls.Config{MinVersion: tls.VersionTLS12, NextProtos: []string{"h2", "http/1.1"}}
	base.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		cert, cas := cf.current()
		if cert == nil {
			return nil, errors.New("server: no TLS certificate loaded")
		}
		c := &tls.Config{MinVersion: tls.VersionTLS12, NextProtos: base.NextProtos, Certificates: []tls.Certificate{*cert}}
		if cas != nil {
			c.ClientCAs, c.ClientAuth = cas, tls.RequireAndVerifyClientCert
		}
		return c, nil
	}
	return base
}

package client

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
)

// TLSFromFiles builds the TLS configuration WithTLS takes from PEM files,
// as the CLI does from BEACON_CACERT, BEACON_CLIENT_CERT and
// BEACON_CLIENT_KEY: caFile, the CAs that signed the servers'
// certificates ("": the system's); certFile and keyFile, the client's own
// certificate for servers that require one (both or neither).
func TLSFromFiles(caFile, certFile, keyFile string) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("beacon: CA certificate: %w", err)
		}
		cfg.RootCAs = x509.NewCertPool()
		if !cfg.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("beacon: CA certificate %s: no PEM certificate in it", caFile)
		}
	}
	switch {
	case certFile != "" && keyFile != "":
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("beacon: client certificate: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	case certFile != "" || keyFile != "":
		return nil, errors.New("beacon: a client certificate needs both its certificate and its key")
	}
	return cfg, nil
}

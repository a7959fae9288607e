package testutil

import (
	"context"
	"crypto/tls"
	"net"

	"golang.org/x/net/http2"
)

// H2CTransport makes every call of a client share one HTTP/2 connection
// without TLS (h2c), as the SDK's gRPC-protocol calls do.
func H2CTransport() *http2.Transport {
	return &http2.Transport{
		AllowHTTP: true,
		DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		},
	}
}

package beacon_test

import (
	"context"
	"net/http"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	"go.uber.org/goleak"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/backend"
	"beacon.dev/beacon/backend/backendtest"
	"beacon.dev/beacon/backend/beacon"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m, testutil.LeakOptions()...) }

// servers and proxies remember each conformance backend's server (for
// Expire) and the proxy its client goes through (for Freeze).
var servers, proxies sync.Map // backend.Backend → address, *testutil.Proxy

func TestConformance(t *testing.T) {
	backendtest.Run(t, backendtest.Harness{
		New: func(t *testing.T) backend.Backend {
			srv := testutil.StartBeacon(t)
			proxy := testutil.NewProxy(t, srv.Addr())
			c, err := client.New([]string{proxy.Addr()})
			if err != nil {
				t.Fatal(err)
			}
			b := beacon.New(c)
			servers.Store(b, srv.Addr())
			proxies.Store(b, proxy)
			return b
		},
		TTL: 2 * time.Second,
		Expire: func(t *testing.T, b backend.Backend, id int64) {
			addr, _ := servers.Load(b)
			raw := beaconv1connect.NewRegistryServiceClient(&http.Client{Transport: testutil.H2CTransport()}, "http://"+addr.(string), connect.WithGRPC())
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if _, err := raw.CloseSession(ctx, connect.NewRequest(&beaconv1.CloseSessionRequest{SessionId: id})); err != nil {
				t.Fatal(err)
			}
		},
		Freeze: func(t *testing.T, b backend.Backend) func() {
			p, _ := proxies.Load(b)
			p.(*testutil.Proxy).Freeze(true)
			return func() { p.(*testutil.Proxy).Freeze(false) }
		},
	})
}

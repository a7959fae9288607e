package beacon_test

import (
	"testing"
	"time"

	"go.uber.org/goleak"

	"beacon.dev/beacon/backend"
	"beacon.dev/beacon/backend/backendtest"
	"beacon.dev/beacon/backend/beacon"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m, testutil.LeakOptions()...) }

func TestConformance(t *testing.T) {
	backendtest.Run(t, backendtest.Harness{
		New: func(t *testing.T) backend.Backend {
			srv := testutil.StartServer(t, testutil.ServerConfig(t, ""))
			c, err := client.New([]string{srv.Addr()})
			if err != nil {
				t.Fatal(err)
			}
			return beacon.New(c)
		},
		TTL: 2 * time.Second,
	})
}

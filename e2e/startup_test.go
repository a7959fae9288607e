package e2e

import (
	"net/http"
	"syscall"
	"testing"
	"time"

	"beacon.dev/beacon/internal/testutil"
)

// Finding 11: every phase of start-up honours SIGTERM. A member of a
// three-node cluster whose peers never come waits for a quorum; meanwhile
// its port answers (/livez 200, /readyz 503), and SIGTERM ends it.
func TestStartingServerAnswersAndStopsOnSIGTERM(t *testing.T) {
	nd := testutil.NewCluster(t, beaconBin, 3)[0]
	nd.Start(t)
	hc := &http.Client{Timeout: 10 * time.Second}
	status := func(path string) int {
		resp, err := hc.Get("http://" + nd.API + path)
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	testutil.Eventually(t, 60*time.Second, "/livez 200 while etcd waits for a quorum", func() bool {
		return status("/livez") == http.StatusOK
	})
	if got := status("/readyz"); got != http.StatusServiceUnavailable {
		t.Errorf("GET /readyz while etcd waits for a quorum = %d, want 503", got)
	}
	select {
	case <-nd.Signal(syscall.SIGTERM):
	case <-time.After(60 * time.Second):
		t.Fatalf("the server ignored SIGTERM while starting; output:\n%s", nd.Output())
	}
}

package server_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/server/servertest"
)

// Finding 6: --max-services and --max-instances-per-service refuse a new
// service or instance with 429 naming the flag; an existing instance may
// always register again.
func TestServiceAndInstanceQuotas(t *testing.T) {
	cfg := servertest.Config(t, "")
	cfg.Limits.MaxServices = 2
	cfg.Limits.MaxInstancesPerService = 2
	srv := servertest.Start(t, cfg)
	register := func(service, id string) (int, string) {
		return post(t, srv, "Register", fmt.Sprintf(`{"instance":{"service":%q,"id":%q,"address":"127.0.0.1","port":9001}}`, service, id))
	}
	for _, r := range [][2]string{{"a", "a-1"}, {"a", "a-2"}, {"b", "b-1"}} {
		if code, body := register(r[0], r[1]); code != 200 {
			t.Fatalf("Register %s/%s under the limits = %d %s", r[0], r[1], code, body)
		}
	}
	testutil.Eventually(t, 30*time.Second, "the view to hold 3 instances", func() bool {
		return metricOr0(t, srv, "beacon_instances") == 3
	})
	for _, tc := range []struct{ service, id, flag string }{
		{"a", "a-3", "--max-instances-per-service"},
		{"c", "c-1", "--max-services"},
	} {
		code, body := register(tc.service, tc.id)
		if code != 429 || !strings.Contains(body, tc.flag) {
			t.Errorf("Register %s/%s = %d %s, want 429 naming %s", tc.service, tc.id, code, body, tc.flag)
		}
	}
	if code, body := register("a", "a-2"); code != 200 {
		t.Errorf("registering an existing instance again at the limit = %d %s, want 200", code, body)
	}
}

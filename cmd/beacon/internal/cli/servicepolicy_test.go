package cli_test

import (
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protojson"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/server/servertest"
)

// beacon service-config shows a service's settings and sets its policies
// part by part; bad flags are refused naming the field and its limit, and
// change nothing.
func TestServiceConfigCommand(t *testing.T) {
	srv := servertest.Start(t, servertest.Config(t, ""))
	at := "--server=" + srv.Addr()
	must := func(want string, args ...string) string {
		t.Helper()
		code, out, errs := run(append(args, at)...)
		if code != 0 || !strings.Contains(out, want) {
			t.Fatalf("beacon %s = %d, stdout %q, stderr %q; want %q", strings.Join(args, " "), code, out, errs, want)
		}
		return out
	}
	refused := func(want string, args ...string) {
		t.Helper()
		code, out, errs := run(append(args, at)...)
		if code == 0 || !strings.Contains(errs, want) {
			t.Errorf("beacon %s = %d, stdout %q, stderr %q; want a failure saying %q", strings.Join(args, " "), code, out, errs, want)
		}
	}
	out := must("load balancing        round_robin", "service-config", "orders")
	if !strings.Contains(out, "retries               none") || !strings.Contains(out, "(the server's default)") {
		t.Errorf("a new service's settings:\n%s", out)
	}
	must("ring_hash on header x-user, ring of 1024 to 4096", "service-config", "orders", "--lb", "ring_hash", "--hash-header", "x-user", "--max-ring-size", "4096")
	// Another part: the load balancing stays.
	out = must("on deadline-exceeded,unavailable: at most 2, backoff 10ms to 100ms", "service-config", "orders", "--retry-on", "UNAVAILABLE,deadline_exceeded", "--num-retries", "2", "--retry-base-backoff", "10ms")
	if !strings.Contains(out, "ring_hash on header x-user") {
		t.Errorf("setting the retries changed the load balancing:\n%s", out)
	}
	must("failure percentage over 50% (judged with 3 instances of 50 calls)", "service-config", "orders", "--outlier-failure-percentage", "50", "--outlier-minimum-hosts", "3", "--outlier-interval", "5s")
	must("protection threshold 0.5", "protect", "orders", "0.5")

	before := must("RING_HASH", "service-config", "orders", "-o", "json")
	var cfg beaconv1.ServiceConfig
	if err := protojson.Unmarshal([]byte(before), &cfg); err != nil {
		t.Fatalf("service-config -o json: %v\n%s", err, before)
	}
	if cfg.GetProtectionThreshold() != 0.5 || cfg.GetLoadBalancing().GetHashHeader() != "x-user" || cfg.GetRetryPolicy().GetNumRetries() != 2 ||
		cfg.GetOutlierDetection().GetFailurePercentageThreshold() != 50 || cfg.GetOutlierDetection().GetInterval().AsDuration().String() != "5s" {
		t.Errorf("service-config -o json = %v", &cfg)
	}

	refused("invalid --lb", "service-config", "orders", "--lb", "random")
	refused("load_balancing.choice_count", "service-config", "orders", "--lb", "least_request", "--choice-count", "11")
	refused("load_balancing.hash_header", "service-config", "orders", "--lb", "ring_hash")
	refused("retry_policy.retry_on", "service-config", "orders", "--retry-on", "not-found")
	refused("retry_policy.num_retries", "service-config", "orders", "--retry-on", "unavailable", "--num-retries", "5")
	refused("outlier_detection.interval", "service-config", "orders", "--outlier-interval", "1ms")
	refused("invalid --reset lb", "service-config", "orders", "--reset", "lb", "--lb", "least_request")
	refused("invalid --reset", "service-config", "orders", "--reset", "everything")
	if after := must("RING_HASH", "service-config", "orders", "-o", "json"); after != before {
		t.Errorf("refused commands changed the settings:\nbefore %s\nafter  %s", before, after)
	}

	out = must("load balancing        round_robin", "service-config", "orders", "--reset", "lb,retry")
	if !strings.Contains(out, "retries               none") || !strings.Contains(out, "failure percentage over 50%") || !strings.Contains(out, "protection threshold  0.5\n") {
		t.Errorf("after --reset lb,retry:\n%s", out)
	}
}

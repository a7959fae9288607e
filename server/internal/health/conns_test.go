package health_test

import (
	"context"
	"fmt"
	"net"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/internal/testutil/blackhole"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/servertest"
)

// fdSlack absorbs the descriptors the rest of the process opens and closes
// meanwhile (etcd, the API's connections, the metrics scrapes).
const fdSlack = 32

// dropTest runs HTTP, TCP and gRPC checks at 100 ms against a host that
// drops SYNs, on a server whose probe connections are capped at maxConns,
// until each HTTP check has failed a few times, and returns the server,
// the baseline descriptor count, the highest count seen meanwhile and a
// function that removes the instances.
func dropTest(t *testing.T, ctx context.Context, instances, maxConns int) (srv interface{ Addr() string }, base, peak int, remove func()) {
	t.Helper()
	addr := blackhole.Listener(t)
	host, portStr, _ := net.SplitHostPort(addr)
	port, _ := net.LookupPort("tcp", portStr)
	cfg := servertest.Config(t, "")
	cfg.CheckMaxConns = maxConns
	s := servertest.Start(t, cfg)
	c, err := client.New([]string{s.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	testutil.Metric(t, s.Addr(), "beacon_checks_owned") // the scrape's connection counts in the baseline
	base = blackhole.OpenFDs(t)

	var checks []registry.Check
	for i := range 6 {
		checks = append(checks, registry.Check{Name: fmt.Sprint("http-", i), Kind: registry.CheckHTTP, Interval: 100 * time.Millisecond, Timeout: 100 * time.Millisecond})
	}
	checks = append(checks,
		registry.Check{Name: "tcp", Kind: registry.CheckTCP, Interval: 100 * time.Millisecond, Timeout: 100 * time.Millisecond},
		registry.Check{Name: "grpc", Kind: registry.CheckGRPC, Interval: 100 * time.Millisecond, Timeout: 100 * time.Millisecond})
	for i := range instances {
		in := registry.Instance{Service: "drop", ID: fmt.Sprint("d-", i), Address: host, Port: port, Checks: registry.CloneChecks(checks)}
		if _, err := c.Register(ctx, in); err != nil {
			t.Fatal(err)
		}
	}
	// Count probes, not seconds: each HTTP check fails ten times (without
	// the bound, each failure left a dial behind for two minutes).
	want := float64(instances * 6 * 10)
	peak = base
	testutil.Eventually(t, 60*time.Second, fmt.Sprintf("%v failed HTTP probes", want), func() bool {
		peak = max(peak, blackhole.OpenFDs(t))
		v, _ := testutil.Metric(t, s.Addr(), `beacon_check_probes_total{kind="HTTP",result="fail"}`)
		return v >= want
	})
	remove = func() {
		for i := range instances {
			if _, err := c.Deregister(ctx, "drop", fmt.Sprint("d-", i)); err != nil {
				t.Fatal(err)
			}
		}
		testutil.Eventually(t, 30*time.Second, "no check owned", func() bool {
			v, _ := testutil.Metric(t, s.Addr(), "beacon_checks_owned")
			return v == 0
		})
	}
	return s, base, peak, remove
}

// Probes of a host that drops SYNs cannot run the process out of file
// descriptors: their connections, open or dialing, stay within
// --check-max-conns, the probes refused at the limit are counted, and the
// descriptors come back once the checks are gone.
func TestProbeConnsCappedAgainstDroppingHost(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	const maxConns = 16
	srv, base, peak, remove := dropTest(t, ctx, 10, maxConns)
	t.Logf("descriptors: %d before, at most %d with 80 checks at a dropping host (cap %d)", base, peak, maxConns)
	if peak > base+maxConns+fdSlack {
		t.Errorf("descriptors peaked at %d, want at most %d (baseline) + %d (--check-max-conns) + %d", peak, base, maxConns, fdSlack)
	}
	if v, _ := testutil.Metric(t, srv.Addr(), "beacon_check_probes_refused_total"); v == 0 {
		t.Errorf("beacon_check_probes_refused_total = %v, want > 0 (80 checks, 16 connections)", v)
	}
	waitReleased(t, srv, base, remove)
}

// Under the cap, the check's timeout bounds the whole probe, dial
// included: each check has its running probe's dial and the one just cut
// — not one per failure, as when a cut dial went on with the kernel's two
// minutes of SYN retries —, no probe is refused, and nothing is left once
// the checks are gone.
func TestProbeDialBoundedByTimeout(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	const instances = 2 // 16 checks
	srv, base, peak, remove := dropTest(t, ctx, instances, 0)
	limit := base + 2*instances*8 + fdSlack
	t.Logf("descriptors: %d before, at most %d with %d checks at a dropping host", base, peak, instances*8)
	// A loaded machine may close a cut dial late, so the peak may pass the
	// bound for a moment; dials left behind instead pile up, one more per
	// failure (120 after the ten failures of each HTTP check), for minutes:
	// the count never comes back under it while the checks go on failing.
	testutil.Eventually(t, 30*time.Second, fmt.Sprintf("at most %d descriptors while the checks fail (dials do not outlive their probes)", limit), func() bool {
		return blackhole.OpenFDs(t) <= limit
	})
	if v, _ := testutil.Metric(t, srv.Addr(), "beacon_check_probes_refused_total"); v != 0 {
		t.Errorf("beacon_check_probes_refused_total = %v, want 0 under the default cap", v)
	}
	waitReleased(t, srv, base, remove)
}

// waitReleased removes the checks and waits until their connections and
// descriptors are gone.
func waitReleased(t *testing.T, srv interface{ Addr() string }, base int, remove func()) {
	t.Helper()
	remove()
	testutil.Eventually(t, 30*time.Second, "no probe connection open or dialing", func() bool {
		v, ok := testutil.Metric(t, srv.Addr(), "beacon_check_conns")
		return ok && v == 0
	})
	testutil.Eventually(t, 30*time.Second, "descriptors back near the baseline", func() bool {
		return blackhole.OpenFDs(t) <= base+fdSlack/4
	})
}

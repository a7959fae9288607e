package main

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/goleak"

	"beacon.dev/beacon/examples/shop/shopkit"
	"beacon.dev/beacon/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m, testutil.LeakOptions()...) }

// The scorecard at small scale: every scenario with the beacon client. The
// test asserts what is state — every scenario ran, made calls, wrote its
// chart, and no idempotent call failed (the goal every scenario but "slow"
// has) — and logs the scorecard. The timing goals (p99, the slow
// instance's share, the new instances' share by the end of the run) are
// figures for a quiet machine: the full run (make chaos) reports them,
// the test does not assert them.
func TestScorecardShort(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	mod, err := shopkit.ModuleDir()
	if err != nil {
		t.Fatal(err)
	}
	work := t.TempDir()
	shopBin, beaconBin, err := shopkit.Build(ctx, mod, work)
	if err != nil {
		t.Fatal(err)
	}
	cfg := shortConfig()
	cfg.ShopBin, cfg.BeaconBin, cfg.Dir, cfg.Rate = shopBin, beaconBin, work, 50
	cfg.Scenarios, cfg.Clients = allScenarios, []string{"beacon"}
	cfg.Log = t.Logf
	out := filepath.Join(work, "results")
	card, err := Run(ctx, cfg, out)
	if err != nil {
		t.Fatal(err)
	}
	md, err := os.ReadFile(filepath.Join(out, "scorecard.md"))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("scorecard (all goals met: %v):\n%s", card.AllMet, md)
	for _, sc := range allScenarios {
		if len(card.Runs[sc]) != 1 || len(card.Runs[sc][0].Calls) == 0 {
			t.Errorf("%s: no calls recorded", sc)
			continue
		}
		if _, err := os.Stat(filepath.Join(out, sc+".svg")); err != nil {
			t.Errorf("%s: no chart: %v", sc, err)
		}
		r := card.Runs[sc][0]
		if sc == "slow" { // slow, not failing: no goal on failures (as in goals)
			continue
		}
		if s := summarize(r); s.Failures > 0 {
			t.Errorf("%s: %d of %d calls failed; %s", sc, s.Failures, s.Requests, errorSummary(r))
		}
	}
}

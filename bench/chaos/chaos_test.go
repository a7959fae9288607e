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

// The scorecard at small scale: every scenario with the beacon client, its
// goals asserted. The full run, with the plain client beside it, is the
// benchmark (make chaos).
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
	for _, sc := range allScenarios {
		if len(card.Runs[sc]) != 1 || len(card.Runs[sc][0].Calls) == 0 {
			t.Errorf("%s: no calls recorded", sc)
		}
		if _, err := os.Stat(filepath.Join(out, sc+".svg")); err != nil {
			t.Errorf("%s: no chart: %v", sc, err)
		}
	}
	if !card.AllMet {
		t.Errorf("goals not met:\n%s", md)
	}
}

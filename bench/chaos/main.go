// Command chaos is the chaos scorecard: it runs the demo shop (examples/shop)
// as real processes on 127.0.0.1, sends PlaceOrder to its orders service
// at a fixed rate, injects one fault per scenario, and compares the beacon
// client with plain grpc-go round_robin over the same instances. Every
// scenario is bounded in time; the run stops by itself.
//
//	go run ./bench/chaos                       # the full run (about 10 minutes)
//	go run ./bench/chaos -short -out /tmp/c    # a quick one
//
// It writes scorecard.md and one SVG chart per scenario to -out.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"beacon.dev/beacon/examples/shop/shopkit"
)

func main() {
	out := flag.String("out", "bench/chaos/results", "directory for scorecard.md and the charts")
	short := flag.Bool("short", false, "short durations (as in the test suite)")
	rate := flag.Int("rate", 100, "requests per second")
	only := flag.String("scenarios", strings.Join(allScenarios, ","), "scenarios to run")
	clients := flag.String("clients", "beacon,plain", "clients to compare")
	raw := flag.Bool("raw", false, "also write every call and attempt as CSV")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := mainErr(ctx, *out, *short, *raw, *rate, strings.Split(*only, ","), strings.Split(*clients, ",")); err != nil {
		fmt.Fprintln(os.Stderr, "chaos:", err)
		os.Exit(1)
	}
}

func mainErr(ctx context.Context, out string, short, raw bool, rate int, scenarios, clients []string) error {
	if rate < 1 || rate > 2000 {
		return fmt.Errorf("-rate must be between 1 and 2000, is %d", rate)
	}
	work, err := os.MkdirTemp("", "beacon-chaos-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	mod, err := shopkit.ModuleDir()
	if err != nil {
		return err
	}
	shopBin, beaconBin, err := shopkit.Build(ctx, mod, work)
	if err != nil {
		return err
	}
	cfg := fullConfig()
	if short {
		cfg = shortConfig()
	}
	cfg.ShopBin, cfg.BeaconBin, cfg.Dir, cfg.Rate, cfg.Scenarios, cfg.Clients, cfg.Raw = shopBin, beaconBin, work, rate, scenarios, clients, raw
	cfg.Log = func(format string, args ...any) { fmt.Printf(format+"\n", args...) }
	card, err := Run(ctx, cfg, out)
	if err != nil {
		return err
	}
	fmt.Printf("scorecard: %s (all goals met: %v)\n", filepath.Join(out, "scorecard.md"), card.AllMet)
	return nil
}

func fullConfig() Config {
	return Config{Warm: 5 * time.Second, Fault: 10 * time.Second, RegistryDown: 60 * time.Second, After: 10 * time.Second}
}

func shortConfig() Config {
	return Config{Warm: 2 * time.Second, Fault: 3 * time.Second, RegistryDown: 4 * time.Second, After: 3 * time.Second}
}

package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"
)

// Scorecard is a whole run.
type Scorecard struct {
	Runs   map[string][]*run // by scenario, in client order
	AllMet bool
}

var titles = map[string]string{
	"kill":            "1. SIGKILL one of three instances (restarted on its port after the fault)",
	"hang":            "2. SIGSTOP one instance (hang), SIGCONT after the fault",
	"slow":            "3. One instance slow (+200 ms per request)",
	"rolling-restart": "4. Rolling restart of all three (SIGTERM, back on the same port)",
	"registry-down":   "5. Registry down (the beacon server stopped), the client restarted during the outage",
	"scale-out":       "6. Scale out from three instances to five under load",
}

// Run runs the scenarios with each client and writes scorecard.md and the
// charts to out.
func Run(ctx context.Context, cfg Config, out string) (*Scorecard, error) {
	if err := os.MkdirAll(out, 0o755); err != nil {
		return nil, err
	}
	card := &Scorecard{Runs: map[string][]*run{}, AllMet: true}
	var md strings.Builder
	fmt.Fprintf(&md, "# Chaos scorecard\n\n%s\n\n", describe(cfg))
	for _, sc := range cfg.Scenarios {
		for _, cl := range cfg.Clients {
			if cfg.Log != nil {
				cfg.Log("chaos: %s with the %s client …", sc, cl)
			}
			r, err := runScenario(ctx, cfg, sc, cl)
			if err != nil {
				return nil, fmt.Errorf("%s (%s client): %w", sc, cl, err)
			}
			card.Runs[sc] = append(card.Runs[sc], r)
			if cfg.Raw {
				if err := writeRaw(filepath.Join(out, sc+"-"+cl), r); err != nil {
					return nil, err
				}
			}
		}
		runs := card.Runs[sc]
		if !writeScenario(&md, titles[sc], runs) {
			card.AllMet = false
		}
		f, err := os.Create(filepath.Join(out, sc+".svg"))
		if err != nil {
			return nil, err
		}
		chart(f, titles[sc], runs)
		if err := f.Close(); err != nil {
			return nil, err
		}
	}
	verdict := "All goals met."
	if !card.AllMet {
		verdict = "Some goals are **not met** (see above)."
	}
	fmt.Fprintf(&md, "%s\n", verdict)
	if err := os.WriteFile(filepath.Join(out, "scorecard.md"), []byte(md.String()), 0o644); err != nil {
		return nil, err
	}
	return card, nil
}

func describe(cfg Config) string {
	host, _ := os.Hostname()
	cpu := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if name, ok := strings.CutPrefix(l, "model name"); ok {
				cpu = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(name), ":"))
				break
			}
		}
	}
	return fmt.Sprintf(`Run %s on %s: %d CPUs (%s), %s, %s/%s; every process on 127.0.0.1.

The shop (examples/shop) as processes: a beacon server (embedded etcd), the
shop's database (its own etcd), inventory ×2, payments ×2, orders ×3. The
load generator sends PlaceOrder to orders at %d requests/s (open loop;
each order reserves stock in inventory over gRPC and charges payments over
HTTP, both through the SDK). The fault hits the first orders instance.
Phases: %v warm-up, the fault (%v; registry down %v), %v after.

- **beacon client**: shopkit.Peers — the beacon resolver and P2C balancer,
  discovery cache kept on disk, %v per try, a hedge after %v, 3 attempts
  with a retry budget, %v deadline.
- **plain client**: grpc-go with %sround_robin%s over the three addresses
  known at start (a static list), the same %v deadline, grpc-go's defaults
  otherwise.

"Attempts" counts what reached the wire below retries and hedges. "Time to
eject": fault start → the start of the last attempt sent to the faulty
instance during the fault ("—": none was). "Time to recover": fault start →
the end of the last failed call (0: none failed).`,
		time.Now().UTC().Format(time.DateOnly), host, runtime.NumCPU(), cpu, runtime.Version(), runtime.GOOS, runtime.GOARCH,
		cfg.Rate, cfg.Warm, cfg.Fault, cfg.RegistryDown, cfg.After, perTry, hedge, deadline, "`", "`", deadline)
}

// writeRaw writes a run's calls and attempts as CSV (start and latency in
// milliseconds, the instance, the error) for a closer look.
func writeRaw(prefix string, r *run) error {
	for suffix, calls := range map[string][]call{"-calls.csv": r.Calls, "-attempts.csv": r.Attempts} {
		var b strings.Builder
		b.WriteString("start_ms,latency_ms,peer,error\n")
		for _, c := range calls {
			msg := ""
			if c.err != nil {
				msg = strings.ReplaceAll(c.err.Error(), `"`, `'`)
			}
			fmt.Fprintf(&b, "%.1f,%.1f,%s,\"%s\"\n", float64(c.start)/1e6, float64(c.latency)/1e6, c.peer, msg)
		}
		if err := os.WriteFile(prefix+suffix, []byte(b.String()), 0o644); err != nil {
			return err
		}
	}
	return nil
}

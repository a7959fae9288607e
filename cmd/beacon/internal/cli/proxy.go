package cli

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"beacon.dev/beacon/proxy"
)

func newProxyCmd(g *globals) *cobra.Command {
	var (
		file     string
		interval time.Duration
		check    bool
		otlp     string
	)
	cmd := &cobra.Command{
		Use:   "proxy --config FILE",
		Short: "Run the sidecar / edge proxy: HTTP, h2c and TCP to beacon services (docs/proxy.md)",
		Long: `Serves the listeners, routes and sidecar of a YAML or JSON file, every request
through the SDK's data plane (P2C, outlier ejection, zones, budgeted retries,
hedging, circuit breaking). The routes are reloaded when the file changes
(checked every --reload-interval) or on SIGHUP; a file that is invalid, or
that changes more than the routes, is refused and the running routes kept.
On SIGTERM or SIGINT a sidecar drains its instance, then the proxy stops.`,
		Example: "  beacon proxy --config /etc/beacon/proxy.yaml\n  beacon proxy --config proxy.yaml --check",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if file == "" {
				return fmt.Errorf("--config FILE is required (docs/proxy.md has an example)")
			}
			cfg, err := proxy.LoadConfig(file)
			if err != nil {
				return err
			}
			if check {
				fmt.Fprintf(g.stdout, "%s: valid (%d listeners, %d routes, %d tcp, sidecar %v)\n", file, len(cfg.Listeners), len(cfg.Routes), len(cfg.TCP), cfg.Sidecar != nil)
				return nil
			}
			return runProxy(cmd.Context(), g, file, cfg, interval, otlp)
		},
	}
	f := cmd.Flags()
	f.StringVar(&file, "config", "", "the proxy's configuration file (YAML or JSON)")
	f.DurationVar(&interval, "reload-interval", 2*time.Second, "how often to check the file for changes (0: only on SIGHUP)")
	f.BoolVar(&check, "check", false, "validate the file and exit")
	f.StringVar(&otlp, "otlp-endpoint", "", "export a span per routed request, with beacon's call and attempt spans, over OTLP/gRPC to this collector (host:port, plaintext)")
	hideClientFlags(cmd)
	return cmd
}

func runProxy(ctx context.Context, g *globals, file string, cfg *proxy.Config, interval time.Duration, otlp string) error {
	log := slog.New(slog.NewTextHandler(g.stderr, nil))
	opts := []proxy.Option{proxy.WithLogger(log)}
	if otlp != "" {
		host, _ := os.Hostname()
		tp, stop, err := otlpTracing(ctx, otlp, "beacon-proxy", fmt.Sprintf("%s/%d", host, os.Getpid()))
		if err != nil {
			return err
		}
		defer stop()
		opts = append(opts, proxy.WithTracerProvider(tp))
	}
	p, err := proxy.New(cfg, opts...)
	if err != nil {
		return err
	}
	defer p.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // owned here: ends with ctx
		defer wg.Done()
		watchConfig(ctx, p, file, interval, log)
	}()
	log.Info("beacon proxy: running", "config", file, "listeners", len(cfg.Listeners), "routes", len(cfg.Routes), "sidecar", cfg.Sidecar != nil)
	err = p.Run(ctx)
	cancel()
	wg.Wait()
	if err == nil {
		log.Info("beacon proxy: stopped")
	}
	return err
}

// watchConfig reloads the routes when the file's content changes (polled)
// or on SIGHUP. A refused file is logged once per content.
func watchConfig(ctx context.Context, p *proxy.Proxy, file string, interval time.Duration, log *slog.Logger) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	sum := func() []byte {
		b, err := os.ReadFile(file)
		if err != nil {
			return nil
		}
		h := sha256.Sum256(b)
		return h[:]
	}
	last := sum()
	var tick <-chan time.Time
	if interval > 0 {
		t := time.NewTicker(interval)
		defer t.Stop()
		tick = t.C
	}
	for {
		forced := false
		select {
		case <-ctx.Done():
			return
		case <-hup:
			forced = true
		case <-tick:
		}
		cur := sum()
		if cur == nil || (!forced && bytes.Equal(cur, last)) {
			continue
		}
		last = cur
		if err := p.ReloadFile(file); err != nil {
			log.Error("beacon proxy: new configuration refused; the running routes stay", "config", file, "err", err)
			continue
		}
		log.Info("beacon proxy: configuration reloaded", "config", file, "routes", len(p.Config().Routes))
	}
}

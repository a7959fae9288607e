package cli

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/spf13/cobra"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"beacon.dev/beacon/server"
)

func newServerCmd(g *globals) *cobra.Command {
	cfg := server.NewConfig()
	cfg.ConsoleAddr = server.ConsoleAuto
	var logLevel, otlpEndpoint string
	cmd := &cobra.Command{
		Use:   "server",
		Short: "Run a beacon server (embedded single-node etcd unless --etcd-endpoints is set)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var level slog.Level
			if err := level.UnmarshalText([]byte(logLevel)); err != nil {
				return fmt.Errorf("invalid --log-level %q: want debug, info, warn or error", logLevel)
			}
			cfg.Logger = slog.New(slog.NewTextHandler(g.stderr, &slog.HandlerOptions{Level: level}))
			ctx := cmd.Context()
			if otlpEndpoint != "" {
				stop, err := serverTracing(ctx, cfg, otlpEndpoint)
				if err != nil {
					return err
				}
				defer stop()
			}
			start := time.Now()
			srv, err := server.Start(ctx, cfg)
			if err != nil {
				return err
			}
			defer srv.Close()
			select {
			case <-srv.Ready():
				socket, _ := server.EtcdSocket(cfg.DataDir) // Start checked it
				mode := fmt.Sprintf("embedded etcd in %s; etcdctl --endpoints unix://%s", cfg.DataDir, socket)
				if cfg.EtcdClientAddr != "" {
					scheme := "http"
					if cfg.EtcdClientCertFile != "" {
						scheme = "https"
					}
					mode += fmt.Sprintf(" or %s://%s", scheme, cfg.EtcdClientAddr)
				}
				if !cfg.Embedded() {
					mode = fmt.Sprintf("etcd at %v", cfg.EtcdEndpoints)
				}
				fmt.Fprintf(g.stdout, "beacon server ready on %s (%s) in %s\n", srv.Addr(), mode, time.Since(start).Round(time.Millisecond))
				if url := srv.ConsoleURL(); url != "" {
					fmt.Fprintf(g.stdout, "web console: %s\n", url)
				}
			case err := <-srv.Err():
				return err
			case <-ctx.Done():
				return nil
			}
			select {
			case err := <-srv.Err():
				return err
			case <-ctx.Done():
				fmt.Fprintln(g.stdout, "beacon server stopping")
				return srv.Close()
			}
		},
	}
	// The client commands' global flags mean nothing to a server: keep them
	// out of its help.
	hideClientFlags(cmd)
	cfg.BindFlags(cmd.Flags())
	cmd.Flags().StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn, error")
	cmd.Flags().StringVar(&otlpEndpoint, "otlp-endpoint", "", "export a span per API request over OTLP/gRPC to this collector (host:port, plaintext)")
	return cmd
}

// serverTracing sets cfg's tracer provider up: spans exported over
// OTLP/gRPC, marked service.name beacon-server and the server's name.
// stop flushes them at exit.
func serverTracing(ctx context.Context, cfg *server.Config, endpoint string) (stop func(), err error) {
	tp, stop, err := otlpTracing(ctx, endpoint, "beacon-server", cfg.Name)
	if err != nil {
		return nil, err
	}
	cfg.TracerProvider = tp
	return stop, nil
}

// otlpTracing is a tracer provider exporting over OTLP/gRPC (plaintext)
// to endpoint, with the process's service.name and instance; stop
// flushes the spans at exit.
func otlpTracing(ctx context.Context, endpoint, service, instance string) (tp *sdktrace.TracerProvider, stop func(), err error) {
	exp, err := otlptracegrpc.New(ctx, otlptracegrpc.WithEndpoint(endpoint), otlptracegrpc.WithInsecure())
	if err != nil {
		return nil, nil, fmt.Errorf("--otlp-endpoint %s: %w", endpoint, err)
	}
	tp = sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(resource.NewSchemaless(
		attribute.String("service.name", service), attribute.String("service.instance.id", instance))))
	return tp, func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = tp.Shutdown(sctx)
	}, nil
}

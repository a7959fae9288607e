package cli

import (
	"fmt"
	"log/slog"
	"time"

	"github.com/spf13/cobra"

	"beacon.dev/beacon/server"
)

func newServerCmd(g *globals) *cobra.Command {
	cfg := server.NewConfig()
	var logLevel string
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
	return cmd
}

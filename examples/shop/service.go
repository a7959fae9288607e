package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"

	"beacon.dev/beacon/beaconhttp"
	"beacon.dev/beacon/examples/shop/shopkit"
	"beacon.dev/beacon/lifecycle"
	"beacon.dev/beacon/registry"
)

// common are the flags every service has.
type common struct {
	registry, listen, id, snapshotDir string
	ttl                               time.Duration
	otlp                              string               // OTLP/gRPC endpoint; "": no tracing
	tp                                trace.TracerProvider // set by startTracing
}

func (c *common) bind(fs *flag.FlagSet, listen string) {
	fs.StringVar(&c.registry, "registry", "127.0.0.1:7070", "beacon server address(es), comma-separated")
	fs.StringVar(&c.listen, "listen", listen, "listen address")
	fs.StringVar(&c.id, "id", "", "instance ID (default: derived from the address)")
	fs.StringVar(&c.snapshotDir, "snapshot-dir", "", "keep the discovery cache on disk here (survives a registry outage across restarts)")
	fs.DurationVar(&c.ttl, "ttl", 3*time.Second, "session TTL")
	fs.StringVar(&c.otlp, "otlp", "", "export traces over OTLP/gRPC to this collector (host:port, plaintext)")
}

// startTracing sets up the process's tracing (nothing without --otlp);
// the returned function flushes the spans at exit.
func (c *common) startTracing(service string) (func(), error) {
	tp, stop, err := shopkit.StartTracing(context.Background(), c.otlp, service)
	if err != nil {
		return nil, err
	}
	c.tp = tp
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = stop(ctx)
	}, nil
}

// grpcServer is a gRPC server, traced with --otlp.
func (c *common) grpcServer() *grpc.Server {
	if c.tp == nil {
		return grpc.NewServer()
	}
	return grpc.NewServer(grpc.StatsHandler(otelgrpc.NewServerHandler(otelgrpc.WithTracerProvider(c.tp), otelgrpc.WithPropagators(shopkit.Propagator))))
}

func (c *common) registryAddrs() []string { return strings.Split(c.registry, ",") }

func (c *common) peers(log *slog.Logger, services ...string) (*shopkit.Peers, error) {
	return shopkit.NewPeers(shopkit.PeersConfig{Registry: c.registryAddrs(), Services: services, SnapshotDir: c.snapshotDir, Logger: log, TracerProvider: c.tp})
}

func logger(role string) *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})).With("role", role)
}

// serve runs one service under lifecycle.Run until SIGTERM/SIGINT, with
// either a gRPC server (register it in setup) or an HTTP handler. It
// prints "shop: serving {...}" once registered — the supervisor waits for
// that line. setID learns the instance ID before anything is served;
// workers run beside it (lifecycle.Config.Workers).
func serve(c *common, service string, peers *shopkit.Peers, log *slog.Logger, gs *grpc.Server, handler http.Handler, setID func(string), workers ...func(context.Context) error) error {
	ln, err := net.Listen("tcp", c.listen)
	if err != nil {
		return err
	}
	id := c.id
	if id == "" {
		id = service + "-" + ln.Addr().(*net.TCPAddr).AddrPort().String()
		id = strings.NewReplacer(":", "-", "[", "", "]", "").Replace(id)
	}
	setID(id)
	cfg := lifecycle.Config{Client: peers.Client, Instance: registry.Instance{Service: service, ID: id},
		SessionTTL: c.ttl, Logger: log, Workers: workers}
	if gs != nil {
		cfg.GRPC, cfg.GRPCListener = gs, ln
	} else {
		cfg.HTTPHealth = new(beaconhttp.Health)
		mux := http.NewServeMux()
		mux.Handle("/livez", cfg.HTTPHealth.Handler())
		mux.Handle("/readyz", cfg.HTTPHealth.Handler())
		if c.tp != nil {
			handler = otelhttp.NewHandler(handler, service, otelhttp.WithTracerProvider(c.tp), otelhttp.WithPropagators(shopkit.Propagator))
		}
		mux.Handle("/", cfg.HTTPHealth.Middleware(handler))
		cfg.HTTP, cfg.HTTPListener = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}, ln
		cfg.HTTPService = service
	}
	info, _ := json.Marshal(map[string]string{"service": service, "id": id, "addr": ln.Addr().String(), "pid": fmt.Sprint(os.Getpid())})
	cfg.OnState = func(s beaconhttp.State) {
		if s == beaconhttp.Serving {
			fmt.Printf("shop: serving %s\n", info)
		}
	}
	rep, err := lifecycle.Run(context.Background(), cfg)
	fmt.Printf("shop: stopped %s clean=%v stopping=%v\n", id, rep.StopClean, rep.Stopping.Round(time.Millisecond))
	return err
}

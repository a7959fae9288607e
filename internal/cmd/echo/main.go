// Command echo is a small service run by lifecycle.Run, used by the tests
// and benchmarks as a real child process: gRPC (grpc.testing.TestService,
// whose UnaryCall answers with the instance ID in server_id) and/or HTTP
// (GET /echo answers with the instance ID), registered with beacon.
//
// It prints "echo: stopped" with the stop report as JSON and exits 0 after
// a clean drain.
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
	"time"

	"google.golang.org/grpc"
	testpb "google.golang.org/grpc/interop/grpc_testing"

	"beacon.dev/beacon/beaconhttp"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/lifecycle"
	"beacon.dev/beacon/registry"
)

type echoServer struct {
	testpb.UnimplementedTestServiceServer
	id   string
	work time.Duration
}

func (s *echoServer) UnaryCall(ctx context.Context, req *testpb.SimpleRequest) (*testpb.SimpleResponse, error) {
	if err := s.pause(ctx); err != nil {
		return nil, err
	}
	return &testpb.SimpleResponse{ServerId: s.id, Payload: req.GetPayload()}, nil
}

func (s *echoServer) EmptyCall(ctx context.Context, _ *testpb.Empty) (*testpb.Empty, error) {
	return &testpb.Empty{}, s.pause(ctx)
}

// pause stands for the request's work.
func (s *echoServer) pause(ctx context.Context) error {
	if s.work <= 0 {
		return nil
	}
	t := time.NewTimer(s.work)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func main() {
	var (
		registryAddr = flag.String("registry", "127.0.0.1:7070", "beacon server address(es), comma-separated")
		service      = flag.String("service", "echo", "service to register")
		id           = flag.String("id", "", "instance id (default: address-port)")
		zone         = flag.String("zone", "", "the instance's zone")
		weight       = flag.Int("weight", 0, "the instance's load-balancing weight (0: the registry's default)")
		grpcAddr     = flag.String("grpc", "127.0.0.1:0", "gRPC listen address; empty for none")
		httpAddr     = flag.String("http", "", "HTTP listen address; empty for none")
		ttl          = flag.Duration("ttl", 3*time.Second, "session TTL")
		ackTimeout   = flag.Duration("ack-timeout", lifecycle.DefaultAckTimeout, "bound on the wait for watchers to apply DRAINING")
		stopTimeout  = flag.Duration("stop-timeout", lifecycle.DefaultStopTimeout, "bound on in-flight requests at stop")
		work         = flag.Duration("work", 0, "time each request takes")
		readyAfter   = flag.Duration("ready-after", 0, "readiness checks fail until this much time has passed")
		readyFile    = flag.String("ready-file", "", "readiness checks fail until this file exists (a test's switch)")
	)
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	in := registry.Instance{Service: *service, ID: *id, Zone: *zone, Weight: *weight}
	if err := run(log, *registryAddr, in, *grpcAddr, *httpAddr, *ttl, *ackTimeout, *stopTimeout, *work, *readyAfter, *readyFile); err != nil {
		log.Error("echo: " + err.Error())
		os.Exit(1)
	}
}

func run(log *slog.Logger, registryAddr string, in registry.Instance, grpcAddr, httpAddr string, ttl, ackTimeout, stopTimeout, work, readyAfter time.Duration, readyFile string) error {
	c, err := client.New([]string{registryAddr}, client.WithLogger(log))
	if err != nil {
		return err
	}
	defer c.Close()
	cfg := lifecycle.Config{
		Client: c, Instance: in,
		SessionTTL: ttl, AckTimeout: ackTimeout, StopTimeout: stopTimeout, Logger: log,
		HTTPHealth: new(beaconhttp.Health),
	}
	if readyAfter > 0 || readyFile != "" {
		readyAt := time.Now().Add(readyAfter)
		cfg.Ready = func(context.Context) error {
			if time.Now().Before(readyAt) {
				return fmt.Errorf("warming up for %v more", time.Until(readyAt).Round(time.Millisecond))
			}
			if readyFile != "" {
				if _, err := os.Stat(readyFile); err != nil {
					return fmt.Errorf("waiting for %s: %w", readyFile, err)
				}
			}
			return nil
		}
	}
	id := in.ID
	if grpcAddr != "" {
		ln, err := net.Listen("tcp", grpcAddr)
		if err != nil {
			return err
		}
		cfg.GRPC, cfg.GRPCListener = grpc.NewServer(), ln
		if id == "" {
			id = ln.Addr().String()
		}
		testpb.RegisterTestServiceServer(cfg.GRPC, &echoServer{id: id, work: work})
	}
	if httpAddr != "" {
		ln, err := net.Listen("tcp", httpAddr)
		if err != nil {
			return err
		}
		if id == "" {
			id = ln.Addr().String()
		}
		es := &echoServer{id: id, work: work}
		mux := http.NewServeMux()
		mux.Handle("/livez", cfg.HTTPHealth.Handler())
		mux.Handle("/readyz", cfg.HTTPHealth.Handler())
		mux.Handle("/healthz", cfg.HTTPHealth.Handler())
		mux.Handle("/echo", cfg.HTTPHealth.Middleware(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if err := es.pause(r.Context()); err != nil {
				return
			}
			fmt.Fprint(w, id)
		})))
		cfg.HTTP, cfg.HTTPListener = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}, ln
	}
	cfg.Instance.ID = id
	addrs := map[string]string{}
	if cfg.GRPCListener != nil {
		addrs["grpc"] = cfg.GRPCListener.Addr().String()
	}
	if cfg.HTTPListener != nil {
		addrs["http"] = cfg.HTTPListener.Addr().String()
	}
	listening, _ := json.Marshal(addrs)
	fmt.Printf("echo: listening %s\n", listening)
	cfg.OnState = func(s beaconhttp.State) {
		if s == beaconhttp.Serving {
			fmt.Printf("echo: serving %s\n", listening)
		}
	}
	rep, err := lifecycle.Run(context.Background(), cfg)
	b, _ := json.Marshal(map[string]any{
		"stopping_ms": float64(rep.Stopping.Microseconds()) / 1000, "ack_wait_ms": float64(rep.AckWait.Microseconds()) / 1000,
		"watchers": rep.Acks.Watchers, "acknowledged": rep.Acks.Acknowledged, "gone": rep.Acks.Gone, "unreachable": rep.Acks.Unreachable,
		"clean": rep.StopClean, "drain_err": fmt.Sprint(rep.DrainErr),
	})
	fmt.Printf("echo: stopped %s\n", b)
	return err
}

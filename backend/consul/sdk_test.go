package consul_test

import (
	"context"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"beacon.dev/beacon/backend/consul"
	"beacon.dev/beacon/backend/consul/consultest"
	"beacon.dev/beacon/beacongrpc"
	"beacon.dev/beacon/discovery"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/lifecycle"
	"beacon.dev/beacon/registry"
)

// The SDK unchanged on Consul: two gRPC servers run by lifecycle.Run
// register through the agent, a client balances over them through the
// beacon resolver, and a stopped one leaves the catalog.
func TestSDKRunsOnConsul(t *testing.T) {
	srv := testServer(t, consultest.Options{})
	b := newBackend(t, srv.Addr(), consul.Config{WaitTime: 5 * time.Second})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	type running struct {
		stop context.CancelFunc
		done chan error
	}
	var servers []running
	for range 2 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		runCtx, stop := context.WithCancel(ctx)
		r := running{stop: stop, done: make(chan error, 1)}
		go func() {
			_, err := lifecycle.Run(runCtx, lifecycle.Config{Backend: b, Instance: registry.Instance{Service: "orders"},
				// A TTL no loaded machine can outrun: a lapsed session's
				// instance turns critical and leaves the cache mid-test.
				GRPC: grpc.NewServer(), GRPCListener: ln, SessionTTL: 30 * time.Second, DrainDelay: 100 * time.Millisecond})
			r.done <- err
		}()
		servers = append(servers, r)
	}
	defer func() {
		for _, r := range servers {
			r.stop()
			<-r.done
		}
	}()
	cache, err := discovery.New(b, discovery.Config{}, "orders")
	if err != nil {
		t.Fatal(err)
	}
	defer cache.Close()
	conn, err := beacongrpc.NewClient(cache, "orders")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	testutil.Eventually(t, 30*time.Second, "both instances discovered", func() bool {
		set, ok := cache.Endpoints("orders")
		return ok && len(set.Endpoints) == 2
	})
	hc := healthpb.NewHealthClient(conn)
	for range 20 {
		if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
			t.Fatal(err)
		}
	}
	servers[0].stop()
	if err := <-servers[0].done; err != nil {
		t.Fatal(err)
	}
	servers = servers[1:]
	snap, err := b.Instances(ctx, "orders")
	if err != nil || len(snap.Instances) != 1 {
		t.Fatalf("after one stopped: %v, %v", snap, err)
	}
	for range 20 {
		if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
			t.Fatalf("a call after the graceful stop: %v", err)
		}
	}
}

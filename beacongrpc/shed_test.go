package beacongrpc_test

import (
	"context"
	"net"
	"testing"
	"time"

	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"beacon.dev/beacon/beacongrpc"
	"beacon.dev/beacon/internal/testutil"
)

// blockingHealth holds every Check until release is closed.
type blockingHealth struct {
	*health.Server
	entered chan struct{}
	release chan struct{}
}

func (b *blockingHealth) Check(ctx context.Context, req *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	b.entered <- struct{}{}
	<-b.release
	return b.Server.Check(ctx, req)
}

func serveWith(t *testing.T, s *beacongrpc.Shedder, hs healthpb.HealthServer) healthpb.HealthClient {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.UnaryInterceptor(s.UnaryServerInterceptor()), grpc.StreamInterceptor(s.StreamServerInterceptor()))
	healthpb.RegisterHealthServer(srv, hs)
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	cc, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return healthpb.NewHealthClient(cc)
}

func TestShedderBoundsConcurrency(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	bh := &blockingHealth{Server: health.NewServer(), entered: make(chan struct{}, 2), release: make(chan struct{})}
	s := &beacongrpc.Shedder{MaxInflight: 2}
	hc := serveWith(t, s, bh)
	done := make(chan error, 2)
	for range 2 {
		go func() { _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}); done <- err }()
	}
	<-bh.entered
	<-bh.entered
	if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}); status.Code(err) != codes.Unavailable {
		t.Errorf("third concurrent call = %v, want UNAVAILABLE", err)
	}
	close(bh.release)
	for range 2 {
		if err := <-done; err != nil {
			t.Errorf("admitted call = %v", err)
		}
	}
	if s.Shed() != 1 {
		t.Errorf("Shed() = %d, want 1", s.Shed())
	}
}

func TestShedderRateLimits(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s := &beacongrpc.Shedder{Limiter: rate.NewLimiter(rate.Every(time.Hour), 3)}
	hc := serveWith(t, s, health.NewServer())
	for i := range 3 {
		if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
			t.Fatalf("call %d = %v", i, err)
		}
	}
	if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("fourth call = %v, want RESOURCE_EXHAUSTED", err)
	}
}

func TestShedderHoldsASlotPerStream(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	s := &beacongrpc.Shedder{MaxInflight: 1}
	hc := serveWith(t, s, health.NewServer())
	wctx, stopWatch := context.WithCancel(ctx)
	w, err := hc.Watch(wctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Recv(); err != nil { // the stream is open and holds the slot
		t.Fatal(err)
	}
	if _, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}); status.Code(err) != codes.Unavailable {
		t.Errorf("call while a stream holds the only slot = %v, want UNAVAILABLE", err)
	}
	stopWatch()
	// The slot comes back once the server sees the stream end, which it
	// learns asynchronously: liveness, not latency, is the property.
	testutil.Eventually(t, 30*time.Second, "the stream's slot comes back", func() bool {
		_, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
		return err == nil
	})
}

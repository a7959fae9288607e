package beacongrpc

import (
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// Health serves grpc.health.v1 for a server, so that grpc-health-probe
// and Kubernetes gRPC probes work. Its overall status ("") and the named
// services move together.
type Health struct {
	srv      *health.Server
	services []string
}

// RegisterHealth registers the health service on s, NOT_SERVING until
// SetServing(true).
func RegisterHealth(s *grpc.Server, services ...string) *Health {
	h := &Health{srv: health.NewServer(), services: append([]string{""}, services...)}
	healthpb.RegisterHealthServer(s, h.srv)
	h.SetServing(false)
	return h
}

// SetServing reports the server ready (SERVING) or not (NOT_SERVING).
func (h *Health) SetServing(serving bool) {
	st := healthpb.HealthCheckResponse_NOT_SERVING
	if serving {
		st = healthpb.HealthCheckResponse_SERVING
	}
	for _, name := range h.services {
		h.srv.SetServingStatus(name, st)
	}
}

// GracefulStop stops s within timeout: health turns NOT_SERVING for good,
// then s stops accepting and lets calls finish; calls still running after
// timeout — typically health Watch streams, which never end on their own
// and would hold GracefulStop forever — are cut by Stop. It reports
// whether everything finished in time.
func GracefulStop(s *grpc.Server, h *Health, timeout time.Duration) bool {
	if h != nil {
		h.srv.Shutdown()
	}
	done := make(chan struct{})
	go func() { // ends when GracefulStop returns, which Stop below forces
		s.GracefulStop()
		close(done)
	}()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		s.Stop()
		<-done
		return false
	}
}

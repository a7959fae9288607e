package beacongrpc

import (
	"context"
	"sync/atomic"

	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Shedder protects a server: at most MaxInflight unary calls at once and,
// with a Limiter, at most its rate. Excess calls are refused at once —
// RESOURCE_EXHAUSTED for the rate, UNAVAILABLE for concurrency, so that
// beacon clients retry them elsewhere — rather than queued behind work the
// server cannot finish. Safe for concurrent use.
type Shedder struct {
	MaxInflight int64         // 0: no bound
	Limiter     *rate.Limiter // nil: no rate limit

	inflight atomic.Int64
	shed     atomic.Int64
}

// Shed returns the number of calls refused so far.
func (s *Shedder) Shed() int64 { return s.shed.Load() }

// UnaryServerInterceptor applies the shedder to unary calls.
func (s *Shedder) UnaryServerInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if s.Limiter != nil && !s.Limiter.Allow() {
			s.shed.Add(1)
			return nil, status.Error(codes.ResourceExhausted, "beacongrpc: rate limit exceeded")
		}
		if n := s.inflight.Add(1); s.MaxInflight > 0 && n > s.MaxInflight {
			s.inflight.Add(-1)
			s.shed.Add(1)
			return nil, status.Error(codes.Unavailable, "beacongrpc: server overloaded")
		}
		defer s.inflight.Add(-1)
		return handler(ctx, req)
	}
}

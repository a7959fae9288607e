package beacongrpc

import (
	"context"
	"sync/atomic"

	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Shedder protects a server: at most MaxInflight calls at once and,
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

// admit takes a slot or says why not; release the slot when admitted.
func (s *Shedder) admit() error {
	if s.Limiter != nil && !s.Limiter.Allow() {
		s.shed.Add(1)
		return status.Error(codes.ResourceExhausted, "beacongrpc: rate limit exceeded")
	}
	if n := s.inflight.Add(1); s.MaxInflight > 0 && n > s.MaxInflight {
		s.inflight.Add(-1)
		s.shed.Add(1)
		return status.Error(codes.Unavailable, "beacongrpc: server overloaded")
	}
	return nil
}

// UnaryServerInterceptor applies the shedder to unary calls.
func (s *Shedder) UnaryServerInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if err := s.admit(); err != nil {
			return nil, err
		}
		defer s.inflight.Add(-1)
		return handler(ctx, req)
	}
}

// StreamServerInterceptor applies the shedder to streams: a stream holds
// its slot until it ends, and the rate counts streams opened.
func (s *Shedder) StreamServerInterceptor() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if err := s.admit(); err != nil {
			return err
		}
		defer s.inflight.Add(-1)
		return handler(srv, ss)
	}
}

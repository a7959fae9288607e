package beacongrpc

import (
	"context"
	"errors"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"beacon.dev/beacon/policy"
)

// RetryableCode is the default retry rule for gRPC: UNAVAILABLE, which
// gRPC returns when no connection could carry the call or the server went
// away. Other codes are the server's answer.
func RetryableCode(err error) bool {
	if policy.IsRetryable(err) { // marked errors, per-try timeouts
		return true
	}
	return status.Code(err) == codes.Unavailable
}

// IsFailure is the breaker's rule for gRPC: server-side trouble counts
// (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, UNKNOWN, RESOURCE_EXHAUSTED,
// DATA_LOSS); errors that describe the request (INVALID_ARGUMENT,
// NOT_FOUND, …) and the caller's cancellation do not.
func IsFailure(err error) bool {
	if err == nil || policy.IsRejection(err) || errors.Is(err, context.Canceled) {
		return false
	}
	switch status.Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded, codes.Internal, codes.Unknown, codes.ResourceExhausted, codes.DataLoss:
		return true
	}
	return false
}

// UnaryClientInterceptor runs every unary call through exec. Calls to
// methods for which idempotent returns true (full names such as
// "/pkg.Svc/Get") may be retried on any retryable error; others only when
// gRPC reports the request was never sent — which it does not, so they are
// not retried. Give exec's retry RetryOn: RetryableCode.
func UnaryClientInterceptor(exec *policy.Executor, idempotent func(method string) bool) grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		kind := policy.NotIdempotent
		if idempotent != nil && idempotent(method) {
			kind = policy.Idempotent
		}
		return exec.Do(ctx, kind, func(ctx context.Context) error {
			return invoker(ctx, method, req, reply, cc, opts...)
		})
	}
}

// StatusOf returns the gRPC status of an error that went through the
// policies: a RetryError unwraps to the last attempt's status, and the
// policies' own rejections map to UNAVAILABLE (breaker open, bulkhead
// full) and RESOURCE_EXHAUSTED (rate limited).
func StatusOf(err error) *status.Status {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, policy.ErrRateLimited):
		return status.New(codes.ResourceExhausted, err.Error())
	case errors.Is(err, policy.ErrOpen), errors.Is(err, policy.ErrBulkheadFull):
		return status.New(codes.Unavailable, err.Error())
	}
	var se interface{ GRPCStatus() *status.Status }
	if errors.As(err, &se) {
		return se.GRPCStatus()
	}
	return status.New(codes.Unknown, err.Error())
}

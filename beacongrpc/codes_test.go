package beacongrpc_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"beacon.dev/beacon/beacongrpc"
	"beacon.dev/beacon/policy"
)

// An invoker that answers UNAVAILABLE until its n-th call.
func flaky(n int, calls *int) grpc.UnaryInvoker {
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, opts ...grpc.CallOption) error {
		*calls++
		if *calls < n {
			return status.Error(codes.Unavailable, "instance went away")
		}
		return nil
	}
}

// UNAVAILABLE is retried with an executor left at its defaults, and what
// the interceptor returns is always a gRPC status that still matches the
// policies' errors.
func TestInterceptorSpeaksGRPC(t *testing.T) {
	ctx := context.Background()
	always := func(string) bool { return true }

	exec, err := policy.New(policy.WithRetry(policy.RetryConfig{MaxAttempts: 3, BaseBackoff: time.Millisecond}))
	if err != nil {
		t.Fatal(err)
	}
	calls := 0
	if err := beacongrpc.UnaryClientInterceptor(exec, always)(ctx, "/s/M", nil, nil, nil, flaky(3, &calls)); err != nil || calls != 3 {
		t.Errorf("UNAVAILABLE twice then OK: err %v after %d calls, want success after 3", err, calls)
	}

	calls = 0
	err = beacongrpc.UnaryClientInterceptor(exec, always)(ctx, "/s/M", nil, nil, nil, flaky(10, &calls))
	if status.Code(err) != codes.Unavailable || !errors.Is(err, policy.ErrRetriesExhausted) {
		t.Errorf("UNAVAILABLE every time: %v (code %v), want UNAVAILABLE matching ErrRetriesExhausted", err, status.Code(err))
	}

	br, err := policy.NewBreaker(policy.BreakerConfig{WindowSize: 1, MinCalls: 1, FailureRate: 1, OpenFor: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	broken, err := policy.New(policy.WithBreaker(br), policy.WithRetry(policy.RetryConfig{MaxAttempts: 1}))
	if err != nil {
		t.Fatal(err)
	}
	calls = 0
	_ = beacongrpc.UnaryClientInterceptor(broken, always)(ctx, "/s/M", nil, nil, nil, flaky(10, &calls)) // opens it
	err = beacongrpc.UnaryClientInterceptor(broken, always)(ctx, "/s/M", nil, nil, nil, flaky(10, &calls))
	if status.Code(err) != codes.Unavailable || !errors.Is(err, policy.ErrOpen) {
		t.Errorf("breaker open: %v (code %v), want UNAVAILABLE matching ErrOpen", err, status.Code(err))
	}

	limited, err := policy.New(policy.WithRateLimit(rate.NewLimiter(rate.Every(time.Hour), 1)))
	if err != nil {
		t.Fatal(err)
	}
	calls = 0
	ok := func(context.Context, string, any, any, *grpc.ClientConn, ...grpc.CallOption) error { return nil }
	_ = beacongrpc.UnaryClientInterceptor(limited, always)(ctx, "/s/M", nil, nil, nil, ok)
	err = beacongrpc.UnaryClientInterceptor(limited, always)(ctx, "/s/M", nil, nil, nil, ok)
	if status.Code(err) != codes.ResourceExhausted || !errors.Is(err, policy.ErrRateLimited) {
		t.Errorf("rate limited: %v (code %v), want RESOURCE_EXHAUSTED matching ErrRateLimited", err, status.Code(err))
	}

	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	err = beacongrpc.UnaryClientInterceptor(exec, always)(cancelled, "/s/M", nil, nil, nil, func(ctx context.Context, _ string, _, _ any, _ *grpc.ClientConn, _ ...grpc.CallOption) error {
		return ctx.Err()
	})
	if status.Code(err) != codes.Canceled {
		t.Errorf("cancelled call: %v (code %v), want CANCELED", err, status.Code(err))
	}
}

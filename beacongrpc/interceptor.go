package beacongrpc

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"beacon.dev/beacon/policy"
	"beacon.dev/beacon/tracing"
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

// InterceptorOption configures UnaryClientInterceptor.
type InterceptorOption func(*interceptor)

type interceptor struct {
	exec       *policy.Executor
	idempotent func(string) bool
	hedger     *policy.Hedger
	tracer     trace.Tracer // nil: no tracing
	config     *tracing.ConfigChanges
}

// WithHedging hedges idempotent calls with h: while no attempt has
// answered, another starts after h's delay (the LB policy sends it to
// another instance, which has fewer calls in flight), the first answer
// wins and the others are cancelled. Each attempt runs through the
// executor; give the hedger and the executor's retry the same Budget.
func WithHedging(h *policy.Hedger) InterceptorOption {
	return func(i *interceptor) { i.hedger = h }
}

// UnaryClientInterceptor runs every unary call through exec. Calls to
// methods for which idempotent returns true (full names such as
// "/pkg.Svc/Get") may be retried, and hedged, on any retryable error —
// UNAVAILABLE is one whatever exec's RetryOn says; others only when gRPC
// reports the request was never sent — which it does not, so they are not
// retried. The error returned is always a gRPC status (StatusOf): the
// policies' refusals are UNAVAILABLE (breaker open, bulkhead full) or
// RESOURCE_EXHAUSTED (rate limited), and status.Code works on every error.
func UnaryClientInterceptor(exec *policy.Executor, idempotent func(method string) bool, opts ...InterceptorOption) grpc.UnaryClientInterceptor {
	ic := &interceptor{exec: exec, idempotent: idempotent}
	for _, o := range opts {
		o(ic)
	}
	return ic.intercept
}

func (ic *interceptor) intercept(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	return asStatus(ic.call(ctx, method, req, reply, cc, invoker, opts...))
}

// asStatus returns err as a gRPC status error (status.Code and
// status.FromError see its code) that still unwraps to the policies'
// errors (errors.Is(err, policy.ErrOpen)).
func asStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := err.(interface{ GRPCStatus() *status.Status }); ok {
		return err // the server's answer, as it came
	}
	return &statusError{st: StatusOf(err), err: err}
}

type statusError struct {
	st  *status.Status
	err error
}

func (e *statusError) Error() string              { return e.st.Err().Error() }
func (e *statusError) GRPCStatus() *status.Status { return e.st }
func (e *statusError) Unwrap() error              { return e.err }

// attempt runs one attempt and marks UNAVAILABLE retryable, so that
// gRPC's retryable code is retried whatever the executor's RetryOn.
func attempt(err error) error {
	if err != nil && status.Code(err) == codes.Unavailable {
		return policy.Retryable(err)
	}
	return err
}

func (ic *interceptor) call(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) (err error) {
	kind := policy.NotIdempotent
	if ic.idempotent != nil && ic.idempotent(method) {
		kind = policy.Idempotent
	}
	var n *atomic.Int32 // attempts, numbered for their spans
	if ic.tracer != nil {
		var span trace.Span
		ctx, span = ic.startCall(ctx, method, kind)
		defer func() { endCall(span, err) }()
		ic.config.Record(span)
		n = new(atomic.Int32)
	}
	// Retries and hedges tell the picker which endpoint to avoid.
	ctx = context.WithValue(ctx, attemptsKey{}, new(attempts))
	msg, isProto := reply.(proto.Message)
	if ic.hedger == nil || kind != policy.Idempotent || !isProto {
		return ic.exec.Do(ctx, kind, func(ctx context.Context) error {
			return ic.traced(ctx, n, 0, func(ctx context.Context) error {
				return attempt(invoker(ctx, method, req, reply, cc, opts...))
			})
		})
	}
	// Every attempt decodes into its own message; the first to succeed
	// copies it into reply, and any later success waits for that copy so
	// that reply is complete when the hedger returns.
	var (
		won    atomic.Bool
		copied = make(chan struct{})
		// Taken once, before any attempt: a later attempt must not touch
		// msg while the winner resets and fills it.
		replyType = msg.ProtoReflect().Type()
	)
	return ic.hedger.Do(ctx, func(ctx context.Context, hedge int) error {
		own := replyType.New().Interface()
		ownOpts, publish := attemptOptions(opts)
		err := ic.exec.Do(ctx, kind, func(ctx context.Context) error {
			return ic.traced(ctx, n, hedge, func(ctx context.Context) error {
				return attempt(invoker(ctx, method, req, own, cc, ownOpts...))
			})
		})
		if err != nil {
			return err
		}
		if won.CompareAndSwap(false, true) {
			proto.Reset(msg)
			proto.Merge(msg, own)
			publish()
			close(copied)
		} else {
			<-copied
		}
		return nil
	})
}

// StreamClientInterceptor opens every stream through exec.Open: opening
// is retried on retryable errors (nothing has reached the application
// yet, so any method may be), passes the breaker, bulkhead and rate limit,
// and a retry avoids the endpoint that just failed. Once open, a stream is
// the caller's: messages are not replayed and exec's timeouts do not apply
// (bound the stream with its context). Of the options, WithTracing
// applies: the opening is a call span with its attempts.
func StreamClientInterceptor(exec *policy.Executor, opts ...InterceptorOption) grpc.StreamClientInterceptor {
	ic := &interceptor{exec: exec}
	for _, o := range opts {
		o(ic)
	}
	return func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (cs grpc.ClientStream, err error) {
		var n *atomic.Int32 // attempts, numbered for their spans
		if ic.tracer != nil {
			// The call's span covers the opening: what the policies and the
			// balancer decided. The stream then runs in its last attempt's
			// context, so otelgrpc's span of the stream nests under it.
			var span trace.Span
			ctx, span = tracing.StartCall(ctx, ic.tracer, true, attribute.String("rpc.method", method), attribute.Bool("rpc.stream", true))
			defer func() { endCall(span, err) }()
			ic.config.Record(span)
			n = new(atomic.Int32)
		}
		ctx = context.WithValue(ctx, attemptsKey{}, new(attempts))
		err = exec.Open(ctx, func(ctx context.Context) error {
			return ic.traced(ctx, n, 0, func(ctx context.Context) error {
				s, err := streamer(ctx, desc, cc, method, opts...)
				cs = s
				return attempt(err)
			})
		})
		if err != nil {
			return nil, asStatus(err)
		}
		return cs, nil
	}
}

// attemptOptions gives a hedged attempt its own copies of the call
// options gRPC writes results into (peer, header, trailer), and returns
// them with a function that publishes the winner's into the caller's.
func attemptOptions(opts []grpc.CallOption) ([]grpc.CallOption, func()) {
	out := make([]grpc.CallOption, len(opts))
	var publish []func()
	for i, o := range opts {
		switch o := o.(type) {
		case grpc.PeerCallOption:
			own := new(peer.Peer)
			out[i] = grpc.Peer(own)
			publish = append(publish, func() { *o.PeerAddr = *own })
		case grpc.HeaderCallOption:
			own := new(metadata.MD)
			out[i] = grpc.Header(own)
			publish = append(publish, func() { *o.HeaderAddr = *own })
		case grpc.TrailerCallOption:
			own := new(metadata.MD)
			out[i] = grpc.Trailer(own)
			publish = append(publish, func() { *o.TrailerAddr = *own })
		default:
			out[i] = o
		}
	}
	return out, func() {
		for _, f := range publish {
			f()
		}
	}
}

// attempts records the endpoints a call's attempts were sent to, so that
// a retry or a hedge avoids the last one (PickInfo.Avoid).
type attempts struct {
	mu   sync.Mutex
	last string // guarded by mu
}

type attemptsKey struct{}

// attemptsOf returns the call's record, nil outside the interceptor.
func attemptsOf(ctx context.Context) *attempts {
	a, _ := ctx.Value(attemptsKey{}).(*attempts)
	return a
}

func (a *attempts) avoid() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.last
}

func (a *attempts) picked(id string) {
	a.mu.Lock()
	a.last = id
	a.mu.Unlock()
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
	if st, ok := status.FromError(err); ok {
		return st
	}
	var se interface{ GRPCStatus() *status.Status }
	if errors.As(err, &se) {
		return se.GRPCStatus()
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return status.FromContextError(err)
	}
	return status.New(codes.Unknown, err.Error())
}

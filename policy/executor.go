package policy

import (
	"context"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/jonboulle/clockwork"
	"golang.org/x/sync/semaphore"
	"golang.org/x/time/rate"

	"beacon.dev/beacon/internal/mono"
)

// Idempotency says whether a call may safely run more than once.
type Idempotency uint8

const (
	// NotIdempotent calls are retried only when the error proves the
	// request was never sent (IsUnsent).
	NotIdempotent Idempotency = iota
	// Idempotent calls (reads, PUTs, calls with idempotency keys) are
	// retried on any retryable error.
	Idempotent
)

// RetryConfig tunes retries. Zero fields take DefaultRetry's values.
type RetryConfig struct {
	MaxAttempts int // including the first (default 3)
	// Backoff before attempt n+1 is min(MaxBackoff, BaseBackoff × 2^(n-1)),
	// randomised by ±Jitter (a fraction, default 0.2).
	BaseBackoff time.Duration
	MaxBackoff  time.Duration
	Jitter      float64
	// RetryOn classifies errors (default IsRetryable).
	RetryOn func(error) bool
	// Budget caps retries across calls; nil means no cap.
	Budget *Budget
}

// DefaultRetry holds the defaults (Envoy's backoff: 25 ms base, 250 ms cap).
var DefaultRetry = RetryConfig{MaxAttempts: 3, BaseBackoff: 25 * time.Millisecond, MaxBackoff: 250 * time.Millisecond, Jitter: 0.2}

// Option configures an Executor.
type Option func(*Executor) error

// WithTimeout bounds the whole call, retries included.
func WithTimeout(d time.Duration) Option {
	return func(e *Executor) error {
		if d <= 0 {
			return fmt.Errorf("policy: timeout %v must be positive", d)
		}
		e.timeout = d
		return nil
	}
}

// WithPerTryTimeout bounds each attempt; an attempt that runs out is
// retryable.
func WithPerTryTimeout(d time.Duration) Option {
	return func(e *Executor) error {
		if d <= 0 {
			return fmt.Errorf("policy: per-try timeout %v must be positive", d)
		}
		e.perTry = d
		return nil
	}
}

// WithRetry retries failed attempts.
func WithRetry(cfg RetryConfig) Option {
	return func(e *Executor) error {
		d := DefaultRetry
		if cfg.MaxAttempts == 0 {
			cfg.MaxAttempts = d.MaxAttempts
		}
		if cfg.BaseBackoff == 0 {
			cfg.BaseBackoff = d.BaseBackoff
		}
		if cfg.MaxBackoff == 0 {
			cfg.MaxBackoff = max(d.MaxBackoff, cfg.BaseBackoff)
		}
		if cfg.Jitter == 0 {
			cfg.Jitter = d.Jitter
		}
		if cfg.RetryOn == nil {
			cfg.RetryOn = IsRetryable
		}
		switch {
		case cfg.MaxAttempts < 1 || cfg.MaxAttempts > 100:
			return fmt.Errorf("policy: retry max attempts %d must be in [1, 100]", cfg.MaxAttempts)
		case cfg.BaseBackoff < 0 || cfg.MaxBackoff < cfg.BaseBackoff:
			return fmt.Errorf("policy: retry backoff %v..%v must be positive and ordered", cfg.BaseBackoff, cfg.MaxBackoff)
		case cfg.Jitter < 0 || cfg.Jitter > 1:
			return fmt.Errorf("policy: retry jitter %v must be in [0, 1]", cfg.Jitter)
		}
		e.retry = &cfg
		return nil
	}
}

// WithBreaker guards attempts with a circuit breaker (share it per service).
func WithBreaker(b *Breaker) Option {
	return func(e *Executor) error { e.breaker = b; return nil }
}

// WithBulkhead limits attempts in flight to max; an attempt waits up to
// maxWait for room (0: fails at once with ErrBulkheadFull).
func WithBulkhead(max int, maxWait time.Duration) Option {
	return func(e *Executor) error {
		if max < 1 {
			return fmt.Errorf("policy: bulkhead max %d must be at least 1", max)
		}
		if maxWait < 0 {
			return fmt.Errorf("policy: bulkhead max wait %v must not be negative", maxWait)
		}
		e.bulkhead, e.bulkheadWait = semaphore.NewWeighted(int64(max)), maxWait
		return nil
	}
}

// WithRateLimit admits attempts through a token bucket: an attempt that
// finds it empty fails at once with ErrRateLimited.
func WithRateLimit(l *rate.Limiter) Option {
	return func(e *Executor) error { e.limiter, e.limiterWait = l, false; return nil }
}

// WithRateLimitWait is WithRateLimit where an attempt waits for a token,
// within its deadline, instead of failing.
func WithRateLimitWait(l *rate.Limiter) Option {
	return func(e *Executor) error { e.limiter, e.limiterWait = l, true; return nil }
}

// WithFallback answers calls that failed after every other policy: f gets
// the final error and returns the call's result.
func WithFallback(f func(ctx context.Context, err error) error) Option {
	return func(e *Executor) error { e.fallback = f; return nil }
}

// WithClock replaces the clock (tests). Without it, backoff timers use the
// wall clock and budgets the process's monotonic clock.
func WithClock(c clockwork.Clock) Option {
	return func(e *Executor) error { e.clock, e.now = clocks(c); return nil }
}

func unixNanos(c clockwork.Clock) func() int64 { return func() int64 { return c.Now().UnixNano() } }

// clocks returns the clock for timers and the one for counting windows:
// the real clock and the cheap monotonic one, or c for both in tests.
func clocks(c clockwork.Clock) (clockwork.Clock, func() int64) {
	if c == nil {
		return clockwork.NewRealClock(), mono.Now
	}
	return c, unixNanos(c)
}

// Executor runs calls through the configured policies.
type Executor struct {
	timeout, perTry time.Duration
	retry           *RetryConfig
	breaker         *Breaker
	bulkhead        *semaphore.Weighted
	bulkheadWait    time.Duration
	limiter         *rate.Limiter
	limiterWait     bool
	fallback        func(context.Context, error) error
	clock           clockwork.Clock
	now             func() int64 // budget time; cheap on the call path
}

// New returns an Executor; with no options it just calls.
func New(opts ...Option) (*Executor, error) {
	e := &Executor{}
	e.clock, e.now = clocks(nil)
	for _, o := range opts {
		if err := o(e); err != nil {
			return nil, err
		}
	}
	return e, nil
}

// Do runs fn under the policies. fn must honour ctx. When Do returns, the
// attempts' contexts are cancelled: fn must be done with what it got
// through ctx (for what outlives the call, use DoHold).
func (e *Executor) Do(ctx context.Context, kind Idempotency, fn func(ctx context.Context) error) error {
	release, err := e.run(ctx, kind, fn)
	release()
	if err != nil && e.fallback != nil {
		return e.fallback(ctx, err)
	}
	return err
}

// DoHold is Do for calls whose result is used after fn returns — an HTTP
// response whose body is read after the call. The context of the attempt
// whose outcome DoHold returns is not cancelled on return: its timeouts
// (WithTimeout, WithPerTryTimeout) keep running while the result is read,
// as http.Client.Timeout does for a body, and release cancels it. release
// is never nil; call it once done with the result, whatever the error
// (for a response, when its body is read to the end or closed). Attempts
// that were retried are cancelled before the next one starts, as in Do.
func (e *Executor) DoHold(ctx context.Context, kind Idempotency, fn func(ctx context.Context) error) (release context.CancelFunc, err error) {
	release, err = e.run(ctx, kind, fn)
	if err != nil && e.fallback != nil {
		err = e.fallback(ctx, err)
	}
	return release, err
}

// Open runs fn, which opens something that outlives it — a stream —
// through retry, breaker, bulkhead and rate limit, but without the
// timeouts (they would cancel what fn opened; bound the stream with its
// own context) and without the fallback. A failed open has sent nothing
// the server acted on, so fn is retried as idempotent. The breaker sees
// whether the open succeeded; the bulkhead bounds concurrent opens.
func (e *Executor) Open(ctx context.Context, fn func(ctx context.Context) error) error {
	c := *e
	c.timeout, c.perTry = 0, 0
	release, err := c.run(ctx, Idempotent, fn)
	release() // no timeouts: nothing held
	return err
}

// run returns the outcome of the last attempt and release, which cancels
// that attempt's contexts (the per-try one and the call's): the caller
// decides when, since the attempt's result may still be in use. Attempts
// that are retried are cancelled here, before the next one starts.
func (e *Executor) run(ctx context.Context, kind Idempotency, fn func(ctx context.Context) error) (release context.CancelFunc, err error) {
	var callCancel context.CancelFunc
	if e.timeout > 0 {
		ctx, callCancel = context.WithTimeout(ctx, e.timeout)
	}
	if e.retry == nil {
		tryCancel, err := e.attempt(ctx, fn)
		return join(tryCancel, callCancel), err
	}
	var budget *Budget = e.retry.Budget
	if budget != nil {
		budget.record(e.now)
	}
	for n := 1; ; n++ {
		tryCancel, err := e.attempt(ctx, fn)
		if err == nil {
			return join(tryCancel, callCancel), nil
		}
		if ctx.Err() != nil { // the caller's deadline or cancellation: stop
			return join(tryCancel, callCancel), err
		}
		if !e.retry.RetryOn(err) || (kind == NotIdempotent && !IsUnsent(err)) {
			if n == 1 {
				return join(tryCancel, callCancel), err
			}
			return join(tryCancel, callCancel), &RetryError{Attempts: n, Reason: "not retryable", Last: err}
		}
		if n >= e.retry.MaxAttempts {
			return join(tryCancel, callCancel), &RetryError{Attempts: n, Reason: "max attempts", Last: err}
		}
		wait := e.backoff(n)
		if dl, ok := ctx.Deadline(); ok && !e.clock.Now().Add(wait).Before(dl) {
			return join(tryCancel, callCancel), &RetryError{Attempts: n, Reason: "deadline", Last: err}
		}
		if budget != nil && !budget.TryRetry(e.now()) {
			return join(tryCancel, callCancel), &RetryError{Attempts: n, Reason: "retry budget", Last: err}
		}
		if serr := e.sleep(ctx, wait); serr != nil {
			return join(tryCancel, callCancel), err
		}
		if tryCancel != nil {
			tryCancel() // this attempt lost: the next one replaces it
		}
	}
}

// join returns a func that runs the non-nil ones of a and b. It allocates
// only when both are set, which already cost a context each.
func join(a, b context.CancelFunc) context.CancelFunc {
	switch {
	case a == nil && b == nil:
		return noop
	case a == nil:
		return b
	case b == nil:
		return a
	}
	return func() { a(); b() }
}

func noop() {}

// backoff returns the wait before attempt n+1.
func (e *Executor) backoff(n int) time.Duration {
	d := e.retry.BaseBackoff << min(n-1, 30)
	if d <= 0 || d > e.retry.MaxBackoff {
		d = e.retry.MaxBackoff
	}
	j := 1 + e.retry.Jitter*(2*rand.Float64()-1)
	return time.Duration(float64(d) * j)
}

func (e *Executor) sleep(ctx context.Context, d time.Duration) error {
	t := e.clock.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.Chan():
		return nil
	}
}

// attempt runs one try: breaker → bulkhead → rate limit → per-try timeout.
// It returns what cancels the try's own context (nil without a per-try
// timeout) uncalled: the try's result may outlive it.
func (e *Executor) attempt(ctx context.Context, fn func(ctx context.Context) error) (context.CancelFunc, error) {
	var permit Permit
	if e.breaker != nil {
		var err error
		if permit, err = e.breaker.Allow(); err != nil {
			return nil, err
		}
	}
	if err := e.admit(ctx); err != nil {
		if e.breaker != nil {
			e.breaker.Abandon(permit)
		}
		return nil, err
	}
	var cancel context.CancelFunc
	var err error
	if e.perTry > 0 {
		cancel, err = e.callWithTimeout(ctx, fn)
	} else {
		err = fn(ctx)
	}
	if e.bulkhead != nil {
		e.bulkhead.Release(1)
	}
	if e.breaker != nil {
		e.breaker.Done(permit, err)
	}
	return cancel, err
}

// callWithTimeout runs fn under the per-try timeout and returns, uncalled,
// what cancels it.
func (e *Executor) callWithTimeout(ctx context.Context, fn func(ctx context.Context) error) (context.CancelFunc, error) {
	tctx, cancel := context.WithTimeout(ctx, e.perTry)
	err := fn(tctx)
	if err != nil && ctx.Err() == nil && tctx.Err() != nil {
		return cancel, Retryable(err) // this try ran out of time, the call has not
	}
	return cancel, err
}

// admit takes a bulkhead slot and a rate token, or says why not.
func (e *Executor) admit(ctx context.Context) error {
	if e.bulkhead != nil {
		if !e.bulkhead.TryAcquire(1) {
			if e.bulkheadWait == 0 {
				return ErrBulkheadFull
			}
			wctx, cancel := context.WithTimeout(ctx, e.bulkheadWait)
			err := e.bulkhead.Acquire(wctx, 1)
			cancel()
			if err != nil {
				return ErrBulkheadFull
			}
		}
	}
	if e.limiter != nil {
		var err error
		if e.limiterWait {
			if werr := e.limiter.Wait(ctx); werr != nil {
				err = fmt.Errorf("%w: %v", ErrRateLimited, werr)
			}
		} else if !e.limiter.Allow() {
			err = ErrRateLimited
		}
		if err != nil {
			if e.bulkhead != nil {
				e.bulkhead.Release(1)
			}
			return err
		}
	}
	return nil
}

package policy_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"go.uber.org/goleak"
	"golang.org/x/time/rate"

	"beacon.dev/beacon/policy"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func mustNew(t *testing.T, opts ...policy.Option) *policy.Executor {
	t.Helper()
	e, err := policy.New(opts...)
	if err != nil {
		t.Fatalf("policy.New() error = %v", err)
	}
	return e
}

var fastRetry = policy.RetryConfig{MaxAttempts: 3, BaseBackoff: time.Millisecond, MaxBackoff: 2 * time.Millisecond}

// failing returns fn that fails with the given errors in turn, then
// succeeds, counting calls.
func failing(calls *int, errs ...error) func(context.Context) error {
	return func(context.Context) error {
		*calls++
		if *calls <= len(errs) {
			return errs[*calls-1]
		}
		return nil
	}
}

var errReset = fmt.Errorf("read: %w", syscall.ECONNRESET)

func TestRetry(t *testing.T) {
	ctx := testCtx(t)
	e := mustNew(t, policy.WithRetry(fastRetry))

	calls := 0
	if err := e.Do(ctx, policy.Idempotent, failing(&calls, errReset, errReset)); err != nil || calls != 3 {
		t.Errorf("Do(two retryable failures) = %v after %d calls, want nil after 3", err, calls)
	}

	calls = 0
	err := e.Do(ctx, policy.Idempotent, failing(&calls, errReset, errReset, errReset))
	var re *policy.RetryError
	if !errors.Is(err, policy.ErrRetriesExhausted) || !errors.Is(err, syscall.ECONNRESET) || !errors.As(err, &re) || re.Attempts != 3 || re.Reason != "max attempts" {
		t.Errorf("Do(three failures) = %v, want RetryError{3, max attempts} wrapping ECONNRESET", err)
	}

	// Not idempotent: a reset connection may have delivered the request.
	calls = 0
	if err := e.Do(ctx, policy.NotIdempotent, failing(&calls, errReset)); !errors.Is(err, syscall.ECONNRESET) || calls != 1 {
		t.Errorf("Do(non-idempotent, reset) = %v after %d calls, want the error after 1", err, calls)
	}
	// ... but a refused connection proves it was not sent.
	calls = 0
	refused := fmt.Errorf("dial: %w", syscall.ECONNREFUSED)
	if err := e.Do(ctx, policy.NotIdempotent, failing(&calls, refused)); err != nil || calls != 2 {
		t.Errorf("Do(non-idempotent, refused) = %v after %d calls, want nil after 2", err, calls)
	}

	// Permanent errors stop at once.
	calls = 0
	perm := policy.Permanent(errors.New("bad request"))
	if err := e.Do(ctx, policy.Idempotent, failing(&calls, perm)); err != perm || calls != 1 {
		t.Errorf("Do(permanent) = %v after %d calls, want it unchanged after 1", err, calls)
	}
}

func TestRetryStopsAtTheCallersDeadline(t *testing.T) {
	e := mustNew(t, policy.WithRetry(policy.RetryConfig{MaxAttempts: 5, BaseBackoff: time.Hour, MaxBackoff: time.Hour}))
	ctx, cancel := context.WithTimeout(testCtx(t), time.Minute)
	defer cancel()
	calls := 0
	err := e.Do(ctx, policy.Idempotent, failing(&calls, errReset, errReset))
	var re *policy.RetryError
	if !errors.As(err, &re) || re.Reason != "deadline" || calls != 1 {
		t.Errorf("Do() = %v after %d calls, want a deadline RetryError after 1 (the backoff outlasts the deadline)", err, calls)
	}
}

func TestRetryBudget(t *testing.T) {
	// An hour's window: the 20 calls always fall within it, however slowly
	// they run (a 1 s window let a loaded machine age requests out).
	budget, err := policy.NewBudget(policy.BudgetConfig{Ratio: 0.5, MinPerSecond: -1, Window: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	cfg := fastRetry
	cfg.Budget = budget
	e := mustNew(t, policy.WithRetry(cfg))
	ctx := testCtx(t)
	// Every call fails once. Half the calls may retry.
	retried, refused := 0, 0
	for range 20 {
		calls := 0
		err := e.Do(ctx, policy.Idempotent, failing(&calls, errReset))
		var re *policy.RetryError
		switch {
		case err == nil:
			retried++
		case errors.As(err, &re) && re.Reason == "retry budget":
			refused++
		default:
			t.Fatalf("Do() = %v", err)
		}
	}
	if retried != 10 || refused != 10 {
		t.Errorf("20 calls failing once: %d retried, %d refused by the budget; want 10 and 10", retried, refused)
	}
}

func TestBudgetWindow(t *testing.T) {
	b, err := policy.NewBudget(policy.BudgetConfig{Ratio: 0.2, MinPerSecond: 1, Window: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	now := int64(1000 * time.Second)
	for range 40 {
		b.Request(now)
	}
	b.RequestN(now, 60) // counts as 60 Requests
	// 10 reserved (1/s × 10 s) + 20% of 100.
	got := 0
	for b.TryRetry(now) {
		got++
	}
	if got != 30 {
		t.Errorf("retries allowed = %d, want 30", got)
	}
	// After a whole window everything has aged out but the reserve.
	now += int64(10 * time.Second)
	got = 0
	for b.TryRetry(now) {
		got++
	}
	if got != 10 {
		t.Errorf("retries allowed a window later = %d, want 10", got)
	}
}

func TestPerTryTimeout(t *testing.T) {
	e := mustNew(t, policy.WithPerTryTimeout(20*time.Millisecond), policy.WithRetry(policy.RetryConfig{MaxAttempts: 2, BaseBackoff: time.Millisecond}))
	calls := 0
	err := e.Do(testCtx(t), policy.Idempotent, func(ctx context.Context) error {
		calls++
		<-ctx.Done()
		return ctx.Err()
	})
	var re *policy.RetryError
	if !errors.As(err, &re) || re.Attempts != 2 || !errors.Is(err, context.DeadlineExceeded) || calls != 2 {
		t.Errorf("Do(hanging) = %v after %d calls, want RetryError after 2 wrapping DeadlineExceeded", err, calls)
	}
}

type transitions struct {
	mu sync.Mutex
	s  []string
}

func (tr *transitions) add(from, to policy.State) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	tr.s = append(tr.s, from.String()+"→"+to.String())
}

func (tr *transitions) String() string {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return strings.Join(tr.s, " ")
}

func TestBreaker(t *testing.T) {
	for _, window := range []string{"count", "time"} {
		t.Run(window, func(t *testing.T) {
			clock := clockwork.NewFakeClock()
			tr := &transitions{}
			cfg := policy.BreakerConfig{WindowSize: 10, FailureRate: 0.5, MinCalls: 4, OpenFor: 5 * time.Second,
				HalfOpenProbes: 2, Clock: clock, OnStateChange: tr.add}
			if window == "time" {
				cfg.WindowDuration = 10 * time.Second
			}
			b, err := policy.NewBreaker(cfg)
			if err != nil {
				t.Fatal(err)
			}
			e := mustNew(t, policy.WithBreaker(b))
			ctx := testCtx(t)
			boom := errors.New("boom")
			do := func(err error) error { return e.Do(ctx, policy.Idempotent, func(context.Context) error { return err }) }

			// 2 failures of 3 calls: below the minimum volume.
			do(nil)
			do(boom)
			do(boom)
			if b.State() != policy.Closed {
				t.Fatalf("State() = %v after 3 calls, want closed (min calls 4)", b.State())
			}
			do(boom) // 3 of 4 failed
			if b.State() != policy.Open {
				t.Fatalf("State() = %v, want open", b.State())
			}
			calls := 0
			if err := e.Do(ctx, policy.Idempotent, failing(&calls)); !errors.Is(err, policy.ErrOpen) || calls != 0 {
				t.Fatalf("Do() while open = %v after %d calls, want ErrOpen without calling", err, calls)
			}
			clock.Advance(5 * time.Second)
			// Half-open: 2 probes; a failure re-opens.
			if err := do(boom); !errors.Is(err, boom) {
				t.Fatalf("probe = %v, want boom", err)
			}
			if b.State() != policy.Open {
				t.Fatalf("State() after a failed probe = %v, want open", b.State())
			}
			clock.Advance(5 * time.Second)
			do(nil)
			do(nil)
			if b.State() != policy.Closed {
				t.Fatalf("State() after 2 good probes = %v, want closed", b.State())
			}
			if got, want := tr.String(), "closed→open open→half-open half-open→open open→half-open half-open→closed"; got != want {
				t.Errorf("transitions = %q, want %q", got, want)
			}
		})
	}
}

func TestBreakerLimitsProbes(t *testing.T) {
	clock := clockwork.NewFakeClock()
	b, _ := policy.NewBreaker(policy.BreakerConfig{MinCalls: 1, OpenFor: time.Second, HalfOpenProbes: 2, Clock: clock})
	p, _ := b.Allow()
	b.Done(p, errors.New("x"))
	clock.Advance(time.Second)
	p1, err1 := b.Allow()
	_, err2 := b.Allow()
	_, err3 := b.Allow()
	if err1 != nil || err2 != nil || !errors.Is(err3, policy.ErrOpen) {
		t.Fatalf("half-open Allow ×3 = %v, %v, %v; want two permits then ErrOpen", err1, err2, err3)
	}
	b.Abandon(p1) // a probe not made frees its permit
	if _, err := b.Allow(); err != nil {
		t.Errorf("Allow() after Abandon = %v, want a permit", err)
	}
}

func TestBulkhead(t *testing.T) {
	ctx := testCtx(t)
	e := mustNew(t, policy.WithBulkhead(1, 0))
	release, inside := make(chan struct{}), make(chan struct{})
	done := make(chan error)
	go func() {
		done <- e.Do(ctx, policy.Idempotent, func(context.Context) error { close(inside); <-release; return nil })
	}()
	<-inside
	if err := e.Do(ctx, policy.Idempotent, func(context.Context) error { return nil }); !errors.Is(err, policy.ErrBulkheadFull) {
		t.Errorf("Do() with the bulkhead full = %v, want ErrBulkheadFull", err)
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := e.Do(ctx, policy.Idempotent, func(context.Context) error { return nil }); err != nil {
		t.Errorf("Do() after release = %v", err)
	}
}

func TestRateLimit(t *testing.T) {
	e := mustNew(t, policy.WithRateLimit(rate.NewLimiter(rate.Every(time.Hour), 2)))
	ctx := testCtx(t)
	ok := func(context.Context) error { return nil }
	for i := range 2 {
		if err := e.Do(ctx, policy.Idempotent, ok); err != nil {
			t.Fatalf("call %d = %v", i, err)
		}
	}
	if err := e.Do(ctx, policy.Idempotent, ok); !errors.Is(err, policy.ErrRateLimited) {
		t.Errorf("third call = %v, want ErrRateLimited", err)
	}
}

func TestHedging(t *testing.T) {
	h, err := policy.NewHedger(policy.HedgeConfig{Delay: 10 * time.Millisecond, MaxExtra: 1})
	if err != nil {
		t.Fatal(err)
	}
	loserCancelled := make(chan struct{})
	var attempts []int
	var mu sync.Mutex
	err = h.Do(testCtx(t), func(ctx context.Context, attempt int) error {
		mu.Lock()
		attempts = append(attempts, attempt)
		mu.Unlock()
		if attempt == 0 { // hangs until cancelled
			<-ctx.Done()
			close(loserCancelled)
			return ctx.Err()
		}
		return nil
	})
	if err != nil {
		t.Fatalf("Do() = %v, want the hedge's success", err)
	}
	select {
	case <-loserCancelled:
	case <-time.After(30 * time.Second): // liveness, not latency
		t.Fatal("the losing attempt was not cancelled")
	}
	if len(attempts) != 2 {
		t.Errorf("attempts = %v, want 2", attempts)
	}
}

// DoHold cancels the loser (cause ErrHedgeLost) when it returns but keeps
// the winner's context alive until release: its result (a response body)
// is still being read.
func TestHedgingDoHoldKeepsTheWinnersContext(t *testing.T) {
	h, err := policy.NewHedger(policy.HedgeConfig{Delay: time.Millisecond, MaxExtra: 1})
	if err != nil {
		t.Fatal(err)
	}
	ctxs := make([]context.Context, 2)
	var mu sync.Mutex
	loserDone := make(chan struct{})
	release, err := h.DoHold(testCtx(t), func(ctx context.Context, attempt int) error {
		mu.Lock()
		ctxs[attempt] = ctx
		mu.Unlock()
		if attempt == 0 { // hangs until cancelled
			<-ctx.Done()
			close(loserDone)
			return ctx.Err()
		}
		return nil
	})
	if err != nil {
		t.Fatalf("DoHold() = %v, want the hedge's success", err)
	}
	<-loserDone
	mu.Lock()
	loser, winner := ctxs[0], ctxs[1]
	mu.Unlock()
	if cause := context.Cause(loser); !errors.Is(cause, policy.ErrHedgeLost) {
		t.Errorf("the loser's cause = %v, want ErrHedgeLost", cause)
	}
	if winner.Err() != nil {
		t.Fatalf("the winner's context ended with DoHold: %v", winner.Err())
	}
	release()
	if winner.Err() == nil {
		t.Error("release left the winner's context running")
	}
	// Do is DoHold released at once.
	var held context.Context
	if err := h.Do(testCtx(t), func(ctx context.Context, _ int) error { held = ctx; return nil }); err != nil || held.Err() == nil {
		t.Errorf("Do() = %v with the winner's context %v after it, want nil and ended", err, held.Err())
	}
}

// An attempt that returns ErrHedgeLost because another answered (the
// proxy's losers do) is not a failure, even when its result arrives
// before the winner's.
func TestHedgingLoserReportedFirstIsNoFailure(t *testing.T) {
	h, err := policy.NewHedger(policy.HedgeConfig{Delay: time.Millisecond, MaxExtra: 1})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 200 {
		lost := make(chan struct{})
		err := h.Do(testCtx(t), func(ctx context.Context, attempt int) error {
			if attempt == 1 {
				defer close(lost) // just before its result is sent
				return policy.ErrHedgeLost
			}
			<-lost // the winner's nil comes after the loser's error
			return nil
		})
		if err != nil {
			t.Fatalf("run %d: Do() = %v, want the winner's success", i, err)
		}
	}
}

func TestHedgingDrawsOnTheBudget(t *testing.T) {
	budget, _ := policy.NewBudget(policy.BudgetConfig{Ratio: 0.0001, MinPerSecond: -1})
	h, _ := policy.NewHedger(policy.HedgeConfig{Delay: time.Millisecond, Budget: budget})
	calls := 0
	var mu sync.Mutex
	err := h.Do(testCtx(t), func(ctx context.Context, attempt int) error {
		mu.Lock()
		calls++
		mu.Unlock()
		select {
		case <-time.After(30 * time.Millisecond):
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	if err != nil || calls != 1 {
		t.Errorf("Do() with an empty budget = %v after %d attempts, want success after 1", err, calls)
	}
}

func TestHedgingFailsOverAtOnce(t *testing.T) {
	h, _ := policy.NewHedger(policy.HedgeConfig{Delay: time.Hour, MaxExtra: 2})
	err := h.Do(testCtx(t), func(ctx context.Context, attempt int) error {
		if attempt < 2 {
			return errReset
		}
		return nil
	})
	if err != nil {
		t.Errorf("Do() = %v, want the third attempt's success without waiting for the delay", err)
	}
}

func TestIsRetryable(t *testing.T) {
	timeout := &net.OpError{Op: "read", Err: &timeoutErr{}}
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{nil, false},
		{errors.New("plain"), false},
		{policy.Retryable(errors.New("x")), true},
		{policy.Permanent(errReset), false},
		{policy.Unsent(errors.New("x")), true},
		{errReset, true},
		{fmt.Errorf("dial: %w", syscall.ECONNREFUSED), true},
		{io.ErrUnexpectedEOF, true},
		{timeout, true},
		{context.Canceled, false},
		{policy.ErrOpen, false},
		{fmt.Errorf("x: %w", policy.ErrBulkheadFull), false},
		{policy.ErrRateLimited, false},
	} {
		if got := policy.IsRetryable(tc.err); got != tc.want {
			t.Errorf("IsRetryable(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
	if !policy.IsUnsent(fmt.Errorf("dial: %w", syscall.ECONNREFUSED)) || policy.IsUnsent(errReset) {
		t.Error("IsUnsent: refused must count as unsent, reset must not")
	}
}

type timeoutErr struct{}

func (*timeoutErr) Error() string   { return "i/o timeout" }
func (*timeoutErr) Timeout() bool   { return true }
func (*timeoutErr) Temporary() bool { return true }

func TestOptionErrors(t *testing.T) {
	for _, tc := range []struct {
		opt  policy.Option
		want string
	}{
		{policy.WithTimeout(0), "timeout 0s"},
		{policy.WithPerTryTimeout(-1), "per-try timeout -1ns"},
		{policy.WithRetry(policy.RetryConfig{MaxAttempts: 101}), "max attempts 101"},
		{policy.WithRetry(policy.RetryConfig{Jitter: 2}), "jitter 2"},
		{policy.WithBulkhead(0, 0), "bulkhead max 0"},
	} {
		if _, err := policy.New(tc.opt); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("New() = %v, want an error naming %q", err, tc.want)
		}
	}
	if _, err := policy.NewBreaker(policy.BreakerConfig{FailureRate: 2}); err == nil || !strings.Contains(err.Error(), "failure rate 2") {
		t.Errorf("NewBreaker(rate 2) = %v", err)
	}
	if _, err := policy.NewHedger(policy.HedgeConfig{}); err == nil || !strings.Contains(err.Error(), "hedge delay 0s") {
		t.Errorf("NewHedger(no delay) = %v", err)
	}
	if _, err := policy.NewBudget(policy.BudgetConfig{Ratio: 3}); err == nil || !strings.Contains(err.Error(), "budget ratio 3") {
		t.Errorf("NewBudget(ratio 3) = %v", err)
	}
}

func TestOpenRetriesWithoutTimeouts(t *testing.T) {
	e, err := policy.New(policy.WithTimeout(50*time.Millisecond), policy.WithPerTryTimeout(10*time.Millisecond),
		policy.WithRetry(policy.RetryConfig{MaxAttempts: 3, BaseBackoff: time.Millisecond}))
	if err != nil {
		t.Fatal(err)
	}
	calls := 0
	var opened context.Context
	err = e.Open(context.Background(), func(ctx context.Context) error {
		calls++
		if calls < 3 {
			return policy.Retryable(errors.New("connection refused"))
		}
		opened = ctx
		return nil
	})
	if err != nil || calls != 3 {
		t.Fatalf("Open = %v after %d calls, want success on the 3rd", err, calls)
	}
	time.Sleep(80 * time.Millisecond) // past both timeouts
	if opened.Err() != nil {
		t.Fatalf("what Open opened was cancelled: %v", opened.Err())
	}
	// The executor's own calls keep their timeouts.
	err = e.Do(context.Background(), policy.Idempotent, func(ctx context.Context) error {
		<-ctx.Done()
		return ctx.Err()
	})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Do after Open = %v, want the timeouts still in force", err)
	}
}

// DoHold leaves the context of the attempt it returns alive, timeouts
// running, until release; attempts that were retried are cancelled
// before the next one starts. Do cancels on return, as before.
func TestDoHoldKeepsTheLastAttemptAlive(t *testing.T) {
	for _, tc := range []struct {
		name   string
		opts   []policy.Option
		perTry bool // attempts get contexts of their own
	}{
		{"none", nil, false},
		{"per-try", []policy.Option{policy.WithPerTryTimeout(30 * time.Second)}, true},
		{"overall", []policy.Option{policy.WithTimeout(30 * time.Second)}, false},
		{"both", []policy.Option{policy.WithTimeout(30 * time.Second), policy.WithPerTryTimeout(30 * time.Second)}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := mustNew(t, append(tc.opts, policy.WithRetry(fastRetry))...)
			var ctxs []context.Context
			release, err := e.DoHold(testCtx(t), policy.Idempotent, func(ctx context.Context) error {
				ctxs = append(ctxs, ctx)
				if len(ctxs) == 1 {
					return errReset
				}
				return nil
			})
			if err != nil || len(ctxs) != 2 {
				t.Fatalf("DoHold = %v after %d attempts, want success on the 2nd", err, len(ctxs))
			}
			if tc.perTry && ctxs[0].Err() == nil {
				t.Error("the retried attempt's context is alive, want it cancelled")
			}
			if err := ctxs[1].Err(); err != nil {
				t.Fatalf("the returned attempt's context after DoHold: %v, want alive until release", err)
			}
			release()
			release() // idempotent
			if len(tc.opts) > 0 && ctxs[1].Err() == nil {
				t.Error("the returned attempt's context is alive after release, want cancelled")
			}

			var done context.Context
			if err := e.Do(testCtx(t), policy.Idempotent, func(ctx context.Context) error { done = ctx; return nil }); err != nil {
				t.Fatal(err)
			}
			if len(tc.opts) > 0 && done.Err() == nil {
				t.Error("Do left the attempt's context alive, want it cancelled on return")
			}
		})
	}
}

// The timeouts keep running for what DoHold returns, as http.Client's
// Timeout does for a body: a held context that is never released still
// ends at its deadline.
func TestDoHoldTimeoutsKeepRunning(t *testing.T) {
	for _, opt := range []policy.Option{policy.WithTimeout(time.Millisecond), policy.WithPerTryTimeout(time.Millisecond)} {
		e := mustNew(t, opt)
		var held context.Context
		release, err := e.DoHold(testCtx(t), policy.Idempotent, func(ctx context.Context) error { held = ctx; return nil })
		if err != nil {
			t.Fatal(err)
		}
		select {
		case <-held.Done():
		case <-testCtx(t).Done():
			t.Fatal("the held context outlived its timeout")
		}
		if !errors.Is(held.Err(), context.DeadlineExceeded) {
			t.Errorf("held context ended with %v, want DeadlineExceeded", held.Err())
		}
		release()
	}
}

// A failed DoHold holds too: the caller may still read the last
// attempt's result (an HTTP 503 handed back after the last retry).
func TestDoHoldHoldsTheLastFailure(t *testing.T) {
	e := mustNew(t, policy.WithTimeout(30*time.Second), policy.WithPerTryTimeout(30*time.Second), policy.WithRetry(fastRetry))
	var last context.Context
	release, err := e.DoHold(testCtx(t), policy.Idempotent, func(ctx context.Context) error { last = ctx; return errReset })
	if !errors.Is(err, policy.ErrRetriesExhausted) {
		t.Fatalf("DoHold(always failing) = %v, want ErrRetriesExhausted", err)
	}
	if last.Err() != nil {
		t.Errorf("the last attempt's context after DoHold: %v, want alive until release", last.Err())
	}
	release()
	if last.Err() == nil {
		t.Error("the last attempt's context is alive after release")
	}
}

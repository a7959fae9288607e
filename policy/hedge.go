package policy

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jonboulle/clockwork"
)

// HedgeConfig tunes hedging.
type HedgeConfig struct {
	// Delay before each extra attempt while none has answered (for example
	// the service's p95 latency).
	Delay time.Duration
	// MaxExtra attempts beyond the first (default 1).
	MaxExtra int
	// Budget, shared with retries, pays for each extra attempt; nil: no cap.
	Budget *Budget
	// RetryOn: a failed attempt starts the next one at once if this allows
	// (default IsRetryable); otherwise its error is the call's.
	RetryOn func(error) bool
	// Clock replaces the clock (tests); budgets then use it too.
	Clock clockwork.Clock
}

// Hedger sends extra attempts to cut tail latency: the first success wins
// and the others are cancelled. Only hedge idempotent calls.
type Hedger struct {
	cfg HedgeConfig
	now func() int64
}

// NewHedger validates cfg.
func NewHedger(cfg HedgeConfig) (*Hedger, error) {
	if cfg.MaxExtra == 0 {
		cfg.MaxExtra = 1
	}
	if cfg.RetryOn == nil {
		cfg.RetryOn = IsRetryable
	}
	var now func() int64
	cfg.Clock, now = clocks(cfg.Clock)
	switch {
	case cfg.Delay <= 0:
		return nil, fmt.Errorf("policy: hedge delay %v must be positive", cfg.Delay)
	case cfg.MaxExtra < 0 || cfg.MaxExtra > 10:
		return nil, fmt.Errorf("policy: hedge max extra %d must be in [0, 10]", cfg.MaxExtra)
	}
	return &Hedger{cfg: cfg, now: now}, nil
}

// ErrHedgeLost is the cause (context.Cause) of the cancellation of the
// attempts still running when a hedged call returns. Load balancers can
// count it against the endpoint: an attempt that lost to a hedge started
// later was slow there.
var ErrHedgeLost = errors.New("policy: another hedged attempt answered first")

// errHedgeOver cancels the attempts still running when a hedged call
// failed without an answer.
var errHedgeOver = errors.New("policy: the hedged call failed; its other attempts are no longer needed")

type hedgeResult struct {
	attempt int
	err     error
}

// Do runs fn(ctx, 0) and, while no attempt has succeeded, fn(ctx, 1), … up
// to MaxExtra more after each Delay (or at once after a retryable
// failure). Attempt numbers let fn choose another endpoint. When Do returns,
// every attempt's context is cancelled; fn must honour its context so the
// losers end promptly. Use DoHold when the winner's result is read after
// fn returns.
func (h *Hedger) Do(ctx context.Context, fn func(ctx context.Context, attempt int) error) error {
	release, err := h.DoHold(ctx, fn)
	release()
	return err
}

// DoHold is Do for results used after fn returns — an HTTP response whose
// body is read later. When DoHold returns, the attempts still running are
// cancelled — with cause ErrHedgeLost when another answered, the caller's
// cause when the caller gave up, errHedgeOver when the call failed —
// but the context of the attempt that succeeded lives on until release, which is never nil: call it once done
// with the result (for a response, when its body is closed).
func (h *Hedger) DoHold(ctx context.Context, fn func(ctx context.Context, attempt int) error) (release context.CancelFunc, err error) {
	parent := ctx
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(ErrHedgeLost)
	// Each attempt's context is the caller's own child, so the winner's
	// can outlive DoHold; the losers are cancelled when it returns.
	winner := -1
	cancels := make([]context.CancelCauseFunc, 0, 1+h.cfg.MaxExtra)
	defer func() {
		// Losers lost to a winner; without one nothing was lost to
		// anyone (an outlier detector counts only lost hedges against an
		// endpoint): the caller's reason, or the call's failure.
		cause := ErrHedgeLost
		switch {
		case winner >= 0:
		case parent.Err() != nil:
			cause = context.Cause(parent)
		default:
			cause = errHedgeOver
		}
		for i, c := range cancels {
			if i != winner {
				c(cause)
			}
		}
		if winner >= 0 {
			c := cancels[winner]
			release = func() { c(context.Canceled) }
		} else {
			release = func() {}
		}
	}()
	results := make(chan hedgeResult, 1+h.cfg.MaxExtra) // never blocks a loser
	launch := func(n int) {
		actx, acancel := context.WithCancelCause(parent)
		cancels = append(cancels, acancel)
		go func() { results <- hedgeResult{n, fn(actx, n)} }()
	}
	launch(0)
	launched, pending := 1, 1
	timer := h.cfg.Clock.NewTimer(h.cfg.Delay)
	defer timer.Stop()
	mayLaunch := func() bool {
		return launched <= h.cfg.MaxExtra && (h.cfg.Budget == nil || h.cfg.Budget.TryRetry(h.now()))
	}
	var lastErr error
	for {
		select {
		case r := <-results:
			pending--
			if r.err == nil {
				winner = r.attempt
				return nil, nil
			}
			if errors.Is(r.err, ErrHedgeLost) && pending > 0 {
				// fn says another attempt answered: its nil is on its
				// way (two attempts finishing at once may arrive in
				// either order).
				continue
			}
			lastErr = r.err
			if !h.cfg.RetryOn(r.err) || ctx.Err() != nil {
				return nil, r.err
			}
			if mayLaunch() {
				launch(launched)
				launched++
				pending++
			} else if pending == 0 {
				return nil, lastErr
			}
		case <-timer.Chan():
			if mayLaunch() {
				launch(launched)
				launched++
				pending++
				timer.Reset(h.cfg.Delay)
			}
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

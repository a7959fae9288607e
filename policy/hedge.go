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

type hedgeResult struct {
	attempt int
	err     error
}

// Do runs fn(ctx, 0) and, while no attempt has succeeded, fn(ctx, 1), … up
// to MaxExtra more after each Delay (or at once after a retryable
// failure). Attempt numbers let fn choose another endpoint. When Do returns,
// the remaining attempts' contexts are cancelled; fn must honour its context
// so they end promptly.
func (h *Hedger) Do(ctx context.Context, fn func(ctx context.Context, attempt int) error) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(ErrHedgeLost)
	results := make(chan hedgeResult, 1+h.cfg.MaxExtra) // never blocks a loser
	launch := func(n int) {
		go func() { results <- hedgeResult{n, fn(ctx, n)} }()
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
				return nil
			}
			lastErr = r.err
			if !h.cfg.RetryOn(r.err) || ctx.Err() != nil {
				return r.err
			}
			if mayLaunch() {
				launch(launched)
				launched++
				pending++
			} else if pending == 0 {
				return lastErr
			}
		case <-timer.Chan():
			if mayLaunch() {
				launch(launched)
				launched++
				pending++
				timer.Reset(h.cfg.Delay)
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

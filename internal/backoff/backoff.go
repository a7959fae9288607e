// Package backoff is the SDK's one retry delay: exponential, capped, and
// always jittered, so that clients cut off together do not come back
// together. A Backoff is not safe for concurrent use; each retry loop owns
// one.
package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// Config shapes the delays: Base, then ×Multiplier per failure up to Max,
// each spread uniformly by ±Jitter (a fraction).
type Config struct {
	Base       time.Duration
	Max        time.Duration
	Multiplier float64
	Jitter     float64
}

// DefaultConfig is 100 ms doubling to 5 s, ±20 %.
var DefaultConfig = Config{Base: 100 * time.Millisecond, Max: 5 * time.Second, Multiplier: 2, Jitter: 0.2}

// Backoff hands out the delays of one retry loop.
type Backoff struct {
	cfg      Config
	failures int
	rand     func() float64 // in [0, 1)
}

// New returns a Backoff; zero fields of cfg take DefaultConfig's.
func New(cfg Config) *Backoff {
	if cfg.Base <= 0 {
		cfg.Base = DefaultConfig.Base
	}
	if cfg.Max <= 0 {
		cfg.Max = max(DefaultConfig.Max, cfg.Base)
	}
	if cfg.Multiplier < 1 {
		cfg.Multiplier = DefaultConfig.Multiplier
	}
	if cfg.Jitter <= 0 || cfg.Jitter > 1 {
		cfg.Jitter = DefaultConfig.Jitter
	}
	return &Backoff{cfg: cfg, rand: rand.Float64}
}

// Next returns the delay before the next attempt and counts a failure.
func (b *Backoff) Next() time.Duration {
	d := float64(b.cfg.Base)
	for range b.failures {
		if d *= b.cfg.Multiplier; d >= float64(b.cfg.Max) {
			break
		}
	}
	d = min(d, float64(b.cfg.Max))
	b.failures++
	d *= 1 + b.cfg.Jitter*(2*b.rand()-1)
	return time.Duration(d)
}

// Reset starts over from Base, after a success.
func (b *Backoff) Reset() { b.failures = 0 }

// Wait sleeps for Next(), or until ctx ends (then it returns ctx's error).
func (b *Backoff) Wait(ctx context.Context) error {
	return Sleep(ctx, b.Next())
}

// Sleep waits d, or until ctx ends (then it returns ctx's error).
func Sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

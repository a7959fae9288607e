package policy

import (
	"fmt"
	"math/rand/v2"
	"sync/atomic"
	"time"
)

// budgetBuckets splits the budget's window; counts age out a bucket at a
// time.
const budgetBuckets = 10

// Budget caps retries and hedges to a share of the calls, so that a failing
// backend is not hit by a storm of retries (Finagle's RetryBudget, Envoy's
// retry_budget): over the last Window, retries may not exceed
// MinPerSecond × Window plus Ratio × requests.
type Budget struct {
	ratio     float64
	reserve   int64        // MinPerSecond × Window
	bucketDur int64        // ns
	seen      atomic.Int64 // bucket number last read from the clock
	buckets   [budgetBuckets]budgetBucket
}

type budgetBucket struct {
	epoch    atomic.Int64 // bucket number (unix ns / bucketDur) it counts
	requests atomic.Int64
	retries  atomic.Int64
}

// BudgetConfig sizes a Budget.
type BudgetConfig struct {
	Ratio        float64       // retries per request, in [0, 1] (default 0.2)
	MinPerSecond int           // retries always allowed per second (default 10)
	Window       time.Duration // default 10 s; at least 10 ms
}

// DefaultBudget is Finagle's default budget.
var DefaultBudget = BudgetConfig{Ratio: 0.2, MinPerSecond: 10, Window: 10 * time.Second}

// NewBudget returns a budget; zero fields take DefaultBudget's values, and
// a negative MinPerSecond means none.
func NewBudget(cfg BudgetConfig) (*Budget, error) {
	if cfg.Ratio == 0 {
		cfg.Ratio = DefaultBudget.Ratio
	}
	if cfg.MinPerSecond == 0 {
		cfg.MinPerSecond = DefaultBudget.MinPerSecond
	}
	if cfg.Window == 0 {
		cfg.Window = DefaultBudget.Window
	}
	switch {
	case cfg.Ratio < 0 || cfg.Ratio > 1:
		return nil, fmt.Errorf("policy: budget ratio %v must be in [0, 1]", cfg.Ratio)
	case cfg.Window < 10*time.Millisecond:
		return nil, fmt.Errorf("policy: budget window %v must be at least 10ms", cfg.Window)
	}
	return &Budget{
		ratio:     cfg.Ratio,
		reserve:   int64(max(cfg.MinPerSecond, 0)) * int64(cfg.Window/time.Second),
		bucketDur: int64(cfg.Window / budgetBuckets),
	}, nil
}

// bucket returns the bucket for now, resetting it if it last counted an
// older period. Concurrent resets may drop a few counts; the budget stays
// approximately right, which is all it promises.
func (b *Budget) bucket(now int64) *budgetBucket {
	epoch := now / b.bucketDur
	b.seen.Store(epoch)
	return b.bucketAt(epoch)
}

func (b *Budget) bucketAt(epoch int64) *budgetBucket {
	bk := &b.buckets[epoch%budgetBuckets]
	if old := bk.epoch.Load(); old != epoch && bk.epoch.CompareAndSwap(old, epoch) {
		bk.requests.Store(0)
		bk.retries.Store(0)
	}
	return bk
}

// Request records a first attempt (now in unix ns).
func (b *Budget) Request(now int64) { b.bucket(now).requests.Add(1) }

// RequestN records n first attempts at once (now in unix ns): for callers
// that know a batch's size, one shared counter update instead of n.
func (b *Budget) RequestN(now int64, n int) { b.bucket(now).requests.Add(int64(n)) }

// record is Request for the call path: it reads the clock for one call in
// 16 and otherwise counts into the bucket last seen, saving a clock read
// (~50 ns on VMs) at the price of a few calls counted a bucket late.
func (b *Budget) record(now func() int64) {
	epoch := b.seen.Load()
	if epoch == 0 || rand.Uint32()&15 == 0 {
		epoch = now() / b.bucketDur
		b.seen.Store(epoch)
	}
	b.bucketAt(epoch).requests.Add(1)
}

// TryRetry takes one retry from the budget, reporting whether it may go.
func (b *Budget) TryRetry(now int64) bool {
	requests, retries := b.totals(now)
	if float64(retries+1) > float64(b.reserve)+b.ratio*float64(requests) {
		return false
	}
	b.bucket(now).retries.Add(1)
	return true
}

func (b *Budget) totals(now int64) (requests, retries int64) {
	epoch := now / b.bucketDur
	for i := range b.buckets {
		bk := &b.buckets[i]
		if e := bk.epoch.Load(); e > epoch-budgetBuckets && e <= epoch {
			requests += bk.requests.Load()
			retries += bk.retries.Load()
		}
	}
	return requests, retries
}

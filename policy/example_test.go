package policy_test

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"time"

	"beacon.dev/beacon/policy"
)

// The policies compose in one order: fallback → timeout → retry → breaker
// → bulkhead → rate limit → per-try timeout → the call.
func Example() {
	budget, _ := policy.NewBudget(policy.DefaultBudget)
	breaker, _ := policy.NewBreaker(policy.BreakerConfig{})
	exec, _ := policy.New(
		policy.WithTimeout(2*time.Second),
		policy.WithRetry(policy.RetryConfig{MaxAttempts: 3, BaseBackoff: time.Millisecond, Budget: budget}),
		policy.WithBreaker(breaker),
		policy.WithBulkhead(100, 0),
		policy.WithPerTryTimeout(500*time.Millisecond),
		policy.WithFallback(func(ctx context.Context, err error) error {
			fmt.Println("fallback after:", err)
			return nil // serve a cached answer instead
		}),
	)

	attempt := 0
	err := exec.Do(context.Background(), policy.Idempotent, func(ctx context.Context) error {
		attempt++
		fmt.Println("attempt", attempt)
		if attempt < 3 {
			return syscall.ECONNRESET // retryable
		}
		return errors.New("internal error") // not retryable: ends the call
	})
	fmt.Println("result:", err)
	// Output:
	// attempt 1
	// attempt 2
	// attempt 3
	// fallback after: policy: gave up after 3 attempts (not retryable): internal error
	// result: <nil>
}

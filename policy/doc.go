// Package policy wraps calls in resilience policies, composed in one fixed
// order from the outside in:
//
//	fallback → timeout → retry (backoff, budget) → circuit breaker →
//	bulkhead → rate limit → per-try timeout → the call
//
// Hedging (a second attempt after a delay, cancelling the loser) runs
// inside the call, through a Hedger that shares the retry Budget.
//
// The succeeding path of Executor.Do does not allocate unless a timeout is
// set. Executors, Breakers, Budgets and Hedgers are safe for concurrent use;
// share one per service (or per method class) between callers.
package policy

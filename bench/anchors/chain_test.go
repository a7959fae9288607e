package anchors

import (
	"context"
	"fmt"
	"testing"

	"github.com/failsafe-go/failsafe-go"
	"github.com/failsafe-go/failsafe-go/circuitbreaker"
	"github.com/failsafe-go/failsafe-go/retrypolicy"
	"github.com/sony/gobreaker/v2"

	"beacon.dev/beacon/balancer"
	"beacon.dev/beacon/balancer/p2c"
	"beacon.dev/beacon/balancer/roundrobin"
	"beacon.dev/beacon/endpoint"
	"beacon.dev/beacon/outlier"
	"beacon.dev/beacon/policy"
)

// call stands for the remote call: it succeeds at once, so the benchmark
// measures only what wraps it.
//
//go:noinline
func call(ep *endpoint.Endpoint) error {
	if ep == nil {
		return fmt.Errorf("no endpoint")
	}
	return nil
}

//go:noinline
func callAnchor() error { return nil }

func newBalancer(b *testing.B, builder balancer.Builder) *balancer.Balancer {
	bal, err := balancer.New(builder, balancer.Config{}, balancer.WithOutlierDetection(outlier.Config{}))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(bal.Close)
	set := endpoint.Set{Service: "bench", Revision: 1}
	for i := range 3 {
		set.Endpoints = append(set.Endpoints, &endpoint.Endpoint{ID: fmt.Sprintf("e%d", i), Addr: fmt.Sprintf("127.0.0.1:%d", 9000+i), Weight: 100})
	}
	bal.Update(set)
	return bal
}

func newExecutor(b *testing.B, budget bool) *policy.Executor {
	br, err := policy.NewBreaker(policy.BreakerConfig{})
	if err != nil {
		b.Fatal(err)
	}
	rc := policy.RetryConfig{MaxAttempts: 3}
	if budget {
		if rc.Budget, err = policy.NewBudget(policy.DefaultBudget); err != nil {
			b.Fatal(err)
		}
	}
	exec, err := policy.New(policy.WithRetry(rc), policy.WithBreaker(br))
	if err != nil {
		b.Fatal(err)
	}
	return exec
}

// BenchmarkChain is one succeeding call through the whole client path:
// retry wrapper → circuit breaker → pick → call → outlier and latency
// accounting, beside the anchors wrapping the same call.
func BenchmarkChain(b *testing.B) {
	beacon := func(builder balancer.Builder, budget bool) func(b *testing.B) {
		return func(b *testing.B) {
			bal := newBalancer(b, builder)
			exec := newExecutor(b, budget)
			b.ReportAllocs()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				ctx := context.Background()
				for pb.Next() {
					err := exec.Do(ctx, policy.Idempotent, func(ctx context.Context) error {
						ep, err := bal.Pick(balancer.PickInfo{})
						if err != nil {
							return err
						}
						err = call(ep.Endpoint)
						ep.Done(err)
						return err
					})
					if err != nil {
						b.Error(err)
						return
					}
				}
			})
		}
	}
	b.Run("beacon/p2c+breaker+retry", beacon(p2c.Builder{}, false))
	b.Run("beacon/p2c+breaker+retry+budget", beacon(p2c.Builder{}, true))
	b.Run("beacon/round_robin+breaker+retry", beacon(roundrobin.Builder{}, false))

	b.Run("gobreaker/breaker", func(b *testing.B) {
		cb := gobreaker.NewCircuitBreaker[struct{}](gobreaker.Settings{Name: "bench"})
		b.ReportAllocs()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := cb.Execute(func() (struct{}, error) { return struct{}{}, callAnchor() }); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
	b.Run("failsafe-go/retry+breaker", func(b *testing.B) {
		exec := failsafe.With[any](retrypolicy.NewBuilder[any]().WithMaxAttempts(3).Build(), circuitbreaker.NewBuilder[any]().Build())
		b.ReportAllocs()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if err := exec.Run(callAnchor); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}

package discovery_test

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"beacon.dev/beacon/balancer"
	"beacon.dev/beacon/balancer/p2c"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/discovery"
	"beacon.dev/beacon/outlier"
	"beacon.dev/beacon/policy"
)

// callOrders stands for the application's own call.
func callOrders(ctx context.Context, addr string) error { return nil }

// The data plane wired by hand (docs/sdk.md); the grpc-go and net/http
// integrations do this for you. It needs a running beacon server, so it is
// compiled but not run.
func ExampleCache() {
	ctx := context.Background()
	c, err := client.New([]string{"127.0.0.1:8970"})
	if err != nil {
		panic(err)
	}
	defer c.Close()

	cache, err := discovery.New(discovery.FromClient(c, ""), discovery.Config{SnapshotDir: "/var/lib/myapp"}, "orders")
	if err != nil {
		panic(err)
	}
	defer cache.Close()
	prometheus.MustRegister(cache)

	bal, err := balancer.New(p2c.Builder{}, balancer.Config{
		Zone:           "eu-1a",
		PanicThreshold: 0.5,
		SlowStart:      30 * time.Second,
		Subsets: []balancer.Subset{
			{Name: "stable", Weight: 95, Match: balancer.Selector{Version: "v1"}},
			{Name: "canary", Weight: 5, Match: balancer.Selector{Version: "v2"}},
		},
	}, balancer.WithOutlierDetection(outlier.Config{ConsecutiveFailures: 5}))
	if err != nil {
		panic(err)
	}
	defer bal.Close()
	sub, err := cache.Subscribe("orders")
	if err != nil {
		panic(err)
	}
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	go bal.Run(runCtx, sub)

	budget, _ := policy.NewBudget(policy.DefaultBudget)
	breaker, _ := policy.NewBreaker(policy.BreakerConfig{})
	exec, _ := policy.New(
		policy.WithTimeout(2*time.Second),
		policy.WithRetry(policy.RetryConfig{MaxAttempts: 3, Budget: budget}),
		policy.WithBreaker(breaker),
		policy.WithPerTryTimeout(300*time.Millisecond),
	)

	_ = exec.Do(ctx, policy.Idempotent, func(ctx context.Context) error {
		ep, err := bal.Pick(balancer.PickInfo{})
		if err != nil {
			return err
		}
		err = callOrders(ctx, ep.Addr)
		ep.Done(err)
		return err
	})
}

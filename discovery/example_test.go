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

// The data plane wired by hand (docs/sdk.md, where this is the snippet);
// the grpc-go and net/http integrations do this for you. It needs a
// running beacon server, so it is compiled but not run.
func ExampleCache() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c, err := client.New([]string{"127.0.0.1:8970"})
	if err != nil {
		panic(err)
	}
	defer c.Close()
	if err := dataPlane(ctx, c); err != nil {
		panic(err)
	}
}

func dataPlane(ctx context.Context, c *client.Client) error {
	// Discovery: one cache per process and namespace.
	cache, err := discovery.New(discovery.FromClient(c, ""), discovery.Config{
		SnapshotDir: "/var/lib/myapp", // optional: cold start while the registry is down
	}, "orders")
	if err != nil {
		return err
	}
	defer cache.Close()
	prometheus.MustRegister(cache) // beacon_discovery_stale_seconds, …

	// Balancing: one balancer per service, fed by the cache.
	bal, err := balancer.New(p2c.Builder{}, balancer.Config{
		Zone:           "eu-1a", // prefer the caller's zone
		PanicThreshold: 0.5,     // too few healthy: spread over all
		SlowStart:      30 * time.Second,
		Subsets: []balancer.Subset{
			{Name: "stable", Weight: 95, Match: balancer.Selector{Version: "v1"}},
			{Name: "canary", Weight: 5, Match: balancer.Selector{Version: "v2"}},
		},
	}, balancer.WithOutlierDetection(outlier.Config{ConsecutiveFailures: 5}))
	if err != nil {
		return err
	}
	defer bal.Close()
	sub, err := cache.Subscribe("orders") // costs only this service's snapshot
	if err != nil {
		return err
	}
	defer sub.Close()    // its last subscription closed, a service leaves the cache
	go bal.Run(ctx, sub) // returns when ctx ends

	// Policies: one executor per service (or per class of method).
	budget, _ := policy.NewBudget(policy.DefaultBudget)
	breaker, _ := policy.NewBreaker(policy.BreakerConfig{})
	exec, err := policy.New(
		policy.WithTimeout(2*time.Second),
		policy.WithRetry(policy.RetryConfig{MaxAttempts: 3, Budget: budget}),
		policy.WithBreaker(breaker),
		policy.WithPerTryTimeout(300*time.Millisecond),
	)
	if err != nil {
		return err
	}

	// A call.
	return exec.Do(ctx, policy.Idempotent, func(ctx context.Context) error {
		p, err := bal.Pick(balancer.PickInfo{}) // a small value: the endpoint and what Done needs
		if err != nil {
			return err
		}
		err = callOrders(ctx, p.Addr)
		p.Done(err) // nil for outcomes that say nothing against the endpoint
		return err
	})
}

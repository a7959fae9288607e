package client_test

import (
	"context"
	"log/slog"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/registry"
)

// Example_tour is the first section of docs/sdk.md as compiled code (a
// test checks that every snippet of that page is in an example). It needs
// beacon servers at the addresses it names, so it is compiled, not run;
// Example above is the runnable version.
func Example_tour() {
	addrs := []string{"10.0.0.1:8970", "10.0.0.2:8970"}
	if err := tour(context.Background(), slog.Default(), addrs); err != nil {
		slog.Error("tour", "err", err)
	}
}

func tour(ctx context.Context, logger *slog.Logger, addrs []string) error {
	c, err := client.New(addrs, // e.g. "10.0.0.1:8970", "10.0.0.2:8970": a random one is home
		client.WithNamespace("prod"), client.WithLogger(logger))
	if err != nil {
		return err
	}
	defer c.Close() // also closes every session and watcher made from c

	// One session per process. Heartbeats every TTL/3 on one shared stream.
	sess, err := c.NewSession(ctx, client.WithTTL(10*time.Second),
		client.WithEvents(func(ev client.SessionEvent) {
			// SessionDisconnected / SessionResumed: the registry was unreachable for a while.
			// SessionExpired then SessionRecovered: the lease was lost (process frozen,
			// network cut longer than the TTL); a new session was granted and every
			// instance registered again, with no code of yours.
			logger.Info("beacon session", "event", ev.Kind, "reregistered", ev.Reregistered)
		}))
	if err != nil {
		return err
	}
	defer sess.Close(ctx) // revokes the lease: ephemeral instances leave at once

	_, err = sess.Register(ctx, registry.Instance{
		Service: "orders", ID: "orders-1", Address: "10.0.0.7", Port: 9001,
		Zone: "eu-1a", Tags: []string{"v2"}, Metadata: map[string]string{"team": "core"},
	})
	if err != nil {
		return err
	}

	// Many instances of one process (a sidecar, a gateway) in one request:
	// each gets its own outcome; err joins the refusals, naming each instance.
	revs, err := sess.RegisterMany(ctx, []registry.Instance{
		{Service: "orders", ID: "orders-2", Address: "10.0.0.7", Port: 9002},
		{Service: "orders", ID: "orders-3", Address: "10.0.0.7", Port: 9003},
	})
	if err != nil {
		logger.Warn("some instances refused", "revisions", revs, "err", err)
	}

	// Persistent: stays until deregistered, whatever happens to this process.
	_, err = c.Register(ctx, registry.Instance{Service: "billing", ID: "legacy-1", Address: "10.0.0.9", Port: 80})
	if err != nil {
		return err
	}
	found, err := c.Deregister(ctx, "billing", "legacy-1")
	if err != nil {
		return err
	}

	// Every call that addresses a namespace takes it the same way: the
	// client's (WithNamespace), or another with client.InNamespace.
	snap, err := c.Instances(ctx, "orders") // routable only
	if err != nil {
		return err
	}
	all, err := c.Instances(ctx, "orders", client.All(), client.InNamespace("staging")) // every status
	if err != nil {
		return err
	}
	svcs, err := c.Services(ctx)
	if err != nil {
		return err
	}
	logger.Info("listed", "deregistered", found, "orders", len(snap.Instances), "staging orders", len(all.Instances), "services", len(svcs))

	// Watch: full snapshots, newest per service, revisions only grow.
	w, err := c.Watch(ctx, []string{"orders", "payments"}) // nil: every service of the namespace
	if err != nil {
		return err
	}
	defer w.Close()
	<-w.Synced()
	for {
		snaps, err := w.Next(ctx)
		if err != nil {
			return err // ctx done or w closed
		}
		for _, s := range snaps {
			logger.Info("changed", "service", s.Service, "revision", s.Revision, "routable", len(s.Routable()))
		}
	}
}

// Example_healthChecks is docs/sdk.md's "Health checks, maintenance,
// protection", compiled (not run: it needs a server).
func Example_healthChecks() {
	ctx := context.Background()
	c, err := client.New([]string{"10.0.0.1:8970"})
	if err != nil {
		return
	}
	defer c.Close()
	sess, err := c.NewSession(ctx)
	if err != nil {
		return
	}
	defer sess.Close(ctx)
	for _, step := range []func(context.Context, *client.Client, *client.Session) error{activeChecks, ttlCheck, operate} {
		if err := step(ctx, c, sess); err != nil {
			slog.Error("health checks", "err", err)
		}
	}
}

func activeChecks(ctx context.Context, _ *client.Client, sess *client.Session) error {
	in := registry.Instance{Service: "web", ID: "web-1", Address: "10.0.0.5", Port: 8080,
		Checks: []registry.Check{
			{Kind: registry.CheckHTTP, Target: "http://10.0.0.5:8080/readyz", Interval: 2 * time.Second},
			{Kind: registry.CheckGRPC, GRPCService: "web.v1.Web"}, // on 10.0.0.5:8080
		}}
	_, err := sess.Register(ctx, in)
	return err
}

func ttlCheck(ctx context.Context, c *client.Client, sess *client.Session) error {
	in := registry.Instance{Service: "batch", ID: "batch-1", Address: "10.0.0.6", Port: 7000,
		Checks: []registry.Check{{Kind: registry.CheckTTL, Interval: 30 * time.Second}}}
	if _, err := sess.Register(ctx, in); err != nil {
		return err
	}
	// every 10 s or so ("" names the check "ttl"):
	_, err := c.UpdateCheck(ctx, "batch", "batch-1", "", registry.HealthPassing, "queue depth 3")
	return err
}

func operate(ctx context.Context, c *client.Client, _ *client.Session) error {
	_, err := c.SetStatus(ctx, "web", "web-1", registry.StatusOutOfService) // StatusUp puts it back
	if err != nil {
		return err
	}
	_, err = c.SetProtectionThreshold(ctx, "web", 0.5) // ResetProtectionThreshold: the server's default again
	return err
}

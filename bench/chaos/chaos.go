package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"

	"beacon.dev/beacon/examples/shop/shopkit"
	"beacon.dev/beacon/examples/shop/shoppb"
)

// Config sizes a scorecard run.
type Config struct {
	ShopBin, BeaconBin string
	Dir                string // working directory (data, snapshots)
	Rate               int    // requests per second
	Warm               time.Duration
	Fault              time.Duration // how long the fault lasts (registry: RegistryDown)
	RegistryDown       time.Duration
	After              time.Duration // measured after the fault ends
	Scenarios          []string
	Clients            []string
	Raw                bool // also write every call and attempt as CSV
	Log                func(format string, args ...any)
}

// Client timeouts: the beacon client tries up to 3 times within the
// deadline, each try bounded and hedged; the plain client has the deadline.
const (
	perTry   = 300 * time.Millisecond
	hedge    = 50 * time.Millisecond
	deadline = 2 * time.Second
)

var allScenarios = []string{"kill", "hang", "slow", "rolling-restart", "registry-down", "scale-out"}

// run is one scenario with one client.
type run struct {
	Scenario, Client     string
	FaultStart, FaultEnd time.Duration
	ClientRestart        time.Duration // registry-down: when the new client took over (0: none)
	Total                time.Duration
	Calls                []call
	Attempts             []call
	Victim               string   // the faulty instance's address, if any
	Added                []string // scale-out: the new instances
	OrdersAddrs          []string // the instances at the start
}

// runScenario starts a fresh shop, puts load on orders through the
// client, injects the fault and collects every call.
func runScenario(ctx context.Context, cfg Config, scenario, clientKind string) (*run, error) {
	dir, err := os.MkdirTemp(cfg.Dir, scenario+"-"+clientKind+"-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	cl, err := shopkit.NewCluster(cfg.ShopBin, cfg.BeaconBin, dir)
	if err != nil {
		return nil, err
	}
	defer cl.Close()
	// Orders without sagas: the scorecard measures the data plane (and a
	// saga's state is in the registry, which one scenario takes down).
	cl.ServiceArgs = map[string][]string{"orders": {"--sagas=false"}}
	startCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := cl.StartRegistry(startCtx); err != nil {
		return nil, err
	}
	if err := cl.StartDB(startCtx); err != nil {
		return nil, err
	}
	for _, s := range []string{"inventory", "inventory", "payments", "payments", "orders", "orders", "orders"} {
		if _, err := cl.Start(startCtx, s); err != nil {
			return nil, err
		}
	}
	orders := cl.Running("orders")
	r := &run{Scenario: scenario, Client: clientKind, Victim: orders[0].Addr}
	for _, p := range orders {
		r.OrdersAddrs = append(r.OrdersAddrs, p.Addr)
	}
	snapDir := filepath.Join(dir, "client-snapshot")
	g := &generator{}
	newClient := func() (shoppb.OrdersClient, func(), error) {
		if clientKind == "beacon" {
			p, err := shopkit.NewPeers(shopkit.PeersConfig{Registry: []string{cl.Registry}, Services: []string{"orders"},
				SnapshotDir: snapDir, PerTry: perTry, Hedge: hedge, Timeout: deadline})
			if err != nil {
				return nil, nil, err
			}
			cc, err := p.Conn("orders", grpc.WithChainUnaryInterceptor(g.recordAttempts))
			if err != nil {
				p.Close()
				return nil, nil, err
			}
			return shoppb.NewOrdersClient(cc), p.Close, nil
		}
		// The baseline a user has today: grpc-go's round_robin over the
		// instances known at start (a static list).
		res := manual.NewBuilderWithScheme("static")
		var addrs []resolver.Address
		for _, a := range r.OrdersAddrs {
			addrs = append(addrs, resolver.Address{Addr: a})
		}
		res.InitialState(resolver.State{Addresses: addrs})
		cc, err := grpc.NewClient("static:///orders", grpc.WithResolvers(res), grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultServiceConfig(`{"loadBalancingConfig": [{"round_robin": {}}]}`), grpc.WithChainUnaryInterceptor(g.recordAttempts))
		if err != nil {
			return nil, nil, err
		}
		return shoppb.NewOrdersClient(cc), func() { cc.Close() }, nil
	}
	c, closeClient, err := newClient()
	if err != nil {
		return nil, err
	}
	defer func() { closeClient() }()
	if clientKind == "beacon" { // the cache on disk before anything happens
		time.Sleep(1500 * time.Millisecond)
	}
	g.begin = time.Now()
	g.setClient(c)
	loadCtx, stopLoad := context.WithCancel(ctx)
	loadDone := make(chan struct{})
	go func() { defer close(loadDone); g.run(loadCtx, cfg.Rate, deadline) }()
	defer func() { stopLoad(); <-loadDone }()
	sleep := func(d time.Duration) error {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(d):
			return nil
		}
	}
	if err := sleep(cfg.Warm); err != nil {
		return nil, err
	}
	r.FaultStart = time.Since(g.begin)
	victim := orders[0]
	restartVictim := func() error {
		_, err := cl.Start(ctx, "orders", "--listen", victim.Addr)
		return err
	}
	switch scenario {
	case "kill":
		victim.Kill()
		if err := sleep(cfg.Fault); err != nil {
			return nil, err
		}
		r.FaultEnd = time.Since(g.begin)
		if err := restartVictim(); err != nil {
			return nil, err
		}
	case "hang", "slow": // a signal starts the fault, another ends it
		on, off := syscall.SIGSTOP, syscall.SIGCONT
		if scenario == "slow" {
			on, off = syscall.SIGUSR1, syscall.SIGUSR2
		}
		if err := victim.Signal(on); err != nil {
			return nil, err
		}
		if err := sleep(cfg.Fault); err != nil {
			return nil, err
		}
		r.FaultEnd = time.Since(g.begin)
		if err := victim.Signal(off); err != nil {
			return nil, err
		}
	case "rolling-restart":
		r.Victim = ""
		for _, p := range orders { // one at a time, each back on its port
			p.Terminate(30 * time.Second)
			if _, err := cl.Start(ctx, "orders", "--listen", p.Addr); err != nil {
				return nil, err
			}
			if err := sleep(cfg.Fault / 3); err != nil {
				return nil, err
			}
		}
		r.FaultEnd = time.Since(g.begin)
	case "registry-down":
		r.Victim = ""
		cl.StopRegistry()
		if err := sleep(cfg.RegistryDown / 2); err != nil {
			return nil, err
		}
		// The client restarts while the registry is down.
		c2, close2, err := newClient()
		if err != nil {
			return nil, fmt.Errorf("restarting the client with the registry down: %w", err)
		}
		drained := g.setClient(c2)
		r.ClientRestart = time.Since(g.begin)
		old := closeClient
		closeClient = close2
		if err := sleep(cfg.RegistryDown / 2); err != nil {
			old()
			return nil, err
		}
		drained() // each call is bounded by its deadline
		old()
		r.FaultEnd = time.Since(g.begin)
		if err := cl.StartRegistry(ctx); err != nil {
			return nil, err
		}
	case "scale-out":
		r.Victim = ""
		for range 2 {
			p, err := cl.Start(ctx, "orders")
			if err != nil {
				return nil, err
			}
			r.Added = append(r.Added, p.Addr)
		}
		r.FaultEnd = time.Since(g.begin)
	default:
		return nil, fmt.Errorf("unknown scenario %q", scenario)
	}
	if err := sleep(cfg.After); err != nil {
		return nil, err
	}
	stopLoad()
	<-loadDone
	r.Total = time.Since(g.begin)
	r.Calls, r.Attempts = g.results()
	return r, nil
}

// Package shopkit holds what the demo shop's services, its demo command
// and the chaos scorecard share: the SDK wiring every caller uses (Peers)
// and the supervisor that runs the shop as real processes (Cluster).
package shopkit

import (
	"errors"
	"log/slog"
	"net/http"
	"sync"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"

	"beacon.dev/beacon/beacongrpc"
	"beacon.dev/beacon/beaconhttp"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/discovery"
	"beacon.dev/beacon/policy"
)

// HTTPServices are the shop's services called over HTTP (http://NAME/…):
// the only hosts the transport resolves through beacon.
var HTTPServices = []string{"payments"}

// PeersConfig configures how a process calls the others.
type PeersConfig struct {
	Registry []string // beacon server addresses
	// Services are followed from the start (others on first use).
	Services []string
	// SnapshotDir keeps the discovery cache on disk, so a process started
	// while the registry is down still finds its peers.
	SnapshotDir string
	// PerTry bounds each attempt (default 300 ms); Hedge sends a second
	// attempt when the first has not answered by then (default 50 ms;
	// negative: no hedging). Calls get 3 attempts within Timeout (default
	// 2 s), retries and hedges paid from one budget.
	PerTry, Hedge, Timeout time.Duration
	Logger                 *slog.Logger
	// TracerProvider, when set, traces every call (beacon's call and
	// attempt spans, otelgrpc's and otelhttp's RPC spans under them, W3C
	// trace context to the callee).
	TracerProvider trace.TracerProvider
}

// Peers is a process's way to the other services: one registry client,
// one discovery cache, one policy for every call.
type Peers struct {
	Client *client.Client
	Cache  *discovery.Cache
	exec   *policy.Executor
	hedger *policy.Hedger
	tp     trace.TracerProvider // nil: no tracing
	http   *http.Client
	tr     *beaconhttp.Transport

	mu    sync.Mutex
	conns map[string]*grpc.ClientConn // guarded by mu
}

// NewPeers connects to the registry (or, with it down, starts from the
// disk snapshot) and sets the call policies up.
func NewPeers(cfg PeersConfig) (*Peers, error) {
	if cfg.PerTry == 0 {
		cfg.PerTry = 300 * time.Millisecond
	}
	if cfg.Hedge == 0 {
		cfg.Hedge = 50 * time.Millisecond
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 2 * time.Second
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c, err := client.New(cfg.Registry, client.WithLogger(log))
	if err != nil {
		return nil, err
	}
	p := &Peers{Client: c, conns: map[string]*grpc.ClientConn{}, tp: cfg.TracerProvider}
	p.Cache, err = discovery.New(discovery.FromClient(c, ""), discovery.Config{SnapshotDir: cfg.SnapshotDir, Logger: log}, cfg.Services...)
	if err != nil {
		c.Close()
		return nil, err
	}
	budget, err := policy.NewBudget(policy.BudgetConfig{MinPerSecond: 50, Ratio: 0.2})
	if err != nil {
		p.Close()
		return nil, err
	}
	retry := policy.RetryConfig{MaxAttempts: 3, BaseBackoff: 5 * time.Millisecond, MaxBackoff: 50 * time.Millisecond, Jitter: 0.2,
		RetryOn: beacongrpc.RetryableCode, Budget: budget}
	if p.exec, err = policy.New(policy.WithTimeout(cfg.Timeout), policy.WithPerTryTimeout(cfg.PerTry), policy.WithRetry(retry)); err != nil {
		p.Close()
		return nil, err
	}
	if cfg.Hedge > 0 {
		if p.hedger, err = policy.NewHedger(policy.HedgeConfig{Delay: cfg.Hedge, Budget: budget, RetryOn: beacongrpc.RetryableCode}); err != nil {
			p.Close()
			return nil, err
		}
	}
	retry.RetryOn = nil // HTTP: the transport's own classification
	hopts := []beaconhttp.Option{beaconhttp.WithRetry(retry), beaconhttp.WithServices(HTTPServices...),
		beaconhttp.WithPolicies(policy.WithPerTryTimeout(cfg.PerTry))}
	if p.tp != nil {
		hopts = append(hopts, beaconhttp.WithTracing(p.tp),
			beaconhttp.WithBase(otelhttp.NewTransport(beaconhttp.DefaultBase(), otelhttp.WithTracerProvider(p.tp), otelhttp.WithPropagators(Propagator))))
	}
	if p.tr, err = beaconhttp.NewTransport(p.Cache, hopts...); err != nil {
		p.Close()
		return nil, err
	}
	p.http = &http.Client{Transport: p.tr, Timeout: cfg.Timeout}
	return p, nil
}

// Conn returns the gRPC connection to a service (every method is
// idempotent in the shop: requests carry their order ID). opts, used only
// when the connection is made, come after beacon's; an interceptor among
// them sees each attempt.
func (p *Peers) Conn(service string, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if cc, ok := p.conns[service]; ok {
		return cc, nil
	}
	var icOpts []beacongrpc.InterceptorOption
	if p.hedger != nil {
		icOpts = append(icOpts, beacongrpc.WithHedging(p.hedger))
	}
	all := []grpc.DialOption{
		grpc.WithChainUnaryInterceptor(beacongrpc.UnaryClientInterceptor(p.exec, func(string) bool { return true }, icOpts...)),
	}
	if p.tp != nil {
		icOpts = append(icOpts, beacongrpc.WithTracing(p.tp))
		all = []grpc.DialOption{
			grpc.WithChainUnaryInterceptor(beacongrpc.UnaryClientInterceptor(p.exec, func(string) bool { return true }, icOpts...)),
			grpc.WithStatsHandler(otelgrpc.NewClientHandler(otelgrpc.WithTracerProvider(p.tp), otelgrpc.WithPropagators(Propagator))),
		}
	}
	all = append(all, opts...)
	cc, err := beacongrpc.NewClient(p.Cache, service, beacongrpc.WithDialOptions(all...))
	if err != nil {
		return nil, err
	}
	p.conns[service] = cc
	return cc, nil
}

// HTTP is the client for "http://SERVICE/…" URLs.
func (p *Peers) HTTP() *http.Client { return p.http }

// Close releases everything.
func (p *Peers) Close() {
	p.mu.Lock()
	var errs []error
	for _, cc := range p.conns {
		errs = append(errs, cc.Close())
	}
	p.conns = nil
	p.mu.Unlock()
	_ = errors.Join(errs...)
	if p.tr != nil {
		p.tr.Close()
	}
	if p.Cache != nil {
		p.Cache.Close()
	}
	p.Client.Close()
}

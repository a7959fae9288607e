package beacongrpc

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"sync"

	grpcbalancer "google.golang.org/grpc/balancer"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/serviceconfig"

	"beacon.dev/beacon/balancer"
	"beacon.dev/beacon/balancer/p2c"
	"beacon.dev/beacon/balancer/roundrobin"
	"beacon.dev/beacon/endpoint"
	"beacon.dev/beacon/outlier"
	"beacon.dev/beacon/policy"
	"beacon.dev/beacon/tracing"
)

// LB policy names registered by this package, for service configs such
// as {"loadBalancingConfig": [{"beacon_p2c": {}}]}. Both run outlier
// detection with outlier.DefaultConfig, fed by the calls' outcomes
// (IsFailure) — which grpc-go itself offers only under xDS.
const (
	PolicyP2C        = "beacon_p2c"
	PolicyRoundRobin = "beacon_round_robin"
)

func init() {
	RegisterPolicy(PolicyP2C, p2c.Builder{}, balancer.Config{}, outlier.Config{})
	RegisterPolicy(PolicyRoundRobin, roundrobin.Builder{}, balancer.Config{}, outlier.Config{})
}

// RegisterPolicy registers a beacon balancer as a gRPC LB policy under name.
// Like grpc-go's own balancer.Register, call it from an init function.
func RegisterPolicy(name string, b balancer.Builder, cfg balancer.Config, oc outlier.Config) {
	grpcbalancer.Register(lbBuilder{name: name, builder: b, cfg: cfg, outlier: oc})
}

type lbBuilder struct {
	name    string
	builder balancer.Builder
	cfg     balancer.Config
	outlier outlier.Config
}

func (b lbBuilder) Name() string { return b.name }

func (b lbBuilder) Build(cc grpcbalancer.ClientConn, opts grpcbalancer.BuildOptions) grpcbalancer.Balancer {
	return &lb{builder: b, target: opts.Target.Endpoint(), cc: cc, subConns: make(map[string]*subConn)}
}

type subConn struct {
	sc    grpcbalancer.SubConn
	ep    *endpoint.Endpoint
	state connectivity.State
}

// lb adapts a beacon Balancer to gRPC: one SubConn per endpoint, and the
// balancer picks among the READY ones. gRPC serialises calls into a
// balancer except the pickers' Pick and Done.
type lb struct {
	builder lbBuilder
	target  string // the service, for metrics
	cc      grpcbalancer.ClientConn

	mu       sync.Mutex
	bal      *balancer.Balancer  // guarded by mu; built with the first config
	cfg      *lbConfig           // guarded by mu; nil: the registered one
	subConns map[string]*subConn // guarded by mu; by address
	revision int64               // guarded by mu; stamps ready-sets for the balancer
	lastErr  error               // guarded by mu
	closed   bool                // guarded by mu
}

// configureLocked (re)builds the balancer when the service config gives
// the policy new parameters.
func (l *lb) configureLocked(sc serviceconfig.LoadBalancingConfig) error {
	cfg, _ := sc.(*lbConfig)
	if l.bal != nil && (cfg == nil && l.cfg == nil || cfg != nil && l.cfg != nil && reflect.DeepEqual(*cfg, *l.cfg)) {
		return nil
	}
	bcfg, ocfg := l.builder.cfg, l.builder.outlier
	if cfg != nil {
		bcfg, ocfg = cfg.balancer, cfg.outlier
	}
	// Every call's latency is measured (not one in four, the balancer's
	// default for nanosecond-scale picks): a gRPC call costs far more than
	// the two clock reads, and at a few calls a second per endpoint,
	// sampling left P2C ranking endpoints by stale peaks — one of three
	// could get almost no traffic for tens of seconds (seen in the demo).
	bal, err := balancer.New(l.builder.builder, bcfg, balancer.WithOutlierDetection(ocfg), balancer.WithLatencySampling(1))
	if err != nil {
		return fmt.Errorf("beacongrpc: policy %s: %w", l.builder.name, err)
	}
	if l.bal != nil {
		untrack(l.bal)
		l.bal.Close()
	}
	l.bal, l.cfg = bal, cfg
	track(l.target, bal)
	return nil
}

func (l *lb) UpdateClientConnState(s grpcbalancer.ClientConnState) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.configureLocked(s.BalancerConfig); err != nil {
		return err
	}
	seen := make(map[string]bool)
	for _, addr := range addressesOf(s.ResolverState) {
		seen[addr.Addr] = true
		ep, ok := EndpointOf(addr)
		if !ok { // a plain resolver: the address is all we know
			ep = &endpoint.Endpoint{ID: addr.Addr, Addr: addr.Addr, Weight: 100}
		}
		if cur, ok := l.subConns[addr.Addr]; ok {
			cur.ep = ep
			continue
		}
		key := addr.Addr
		sc, err := l.cc.NewSubConn([]resolver.Address{addr}, grpcbalancer.NewSubConnOptions{
			StateListener: func(st grpcbalancer.SubConnState) { l.subConnState(key, st) },
		})
		if err != nil {
			continue
		}
		l.subConns[key] = &subConn{sc: sc, ep: ep, state: connectivity.Idle}
		sc.Connect()
	}
	for addr, sc := range l.subConns {
		if !seen[addr] {
			sc.sc.Shutdown()
			delete(l.subConns, addr)
		}
	}
	if len(l.subConns) == 0 {
		l.lastErr = errors.New("beacongrpc: the resolver produced no addresses")
		l.publishLocked()
		return grpcbalancer.ErrBadResolverState
	}
	l.publishLocked()
	return nil
}

func addressesOf(st resolver.State) []resolver.Address {
	if len(st.Endpoints) == 0 {
		return st.Addresses
	}
	var out []resolver.Address
	for _, e := range st.Endpoints {
		out = append(out, e.Addresses...)
	}
	return out
}

func (l *lb) subConnState(addr string, st grpcbalancer.SubConnState) {
	l.mu.Lock()
	defer l.mu.Unlock()
	sc, ok := l.subConns[addr]
	if !ok || l.closed {
		return
	}
	sc.state = st.ConnectivityState
	switch st.ConnectivityState {
	case connectivity.Idle:
		sc.sc.Connect() // stay connected to every endpoint, like round_robin
	case connectivity.TransientFailure:
		l.lastErr = st.ConnectionError
	}
	l.publishLocked()
}

// publishLocked hands the READY endpoints to the balancer and a picker
// (or the reason there is none) to gRPC.
func (l *lb) publishLocked() {
	set := endpoint.Set{Revision: l.revision + 1}
	l.revision++
	byID := make(map[string]grpcbalancer.SubConn)
	connecting := false
	for _, sc := range l.subConns {
		switch sc.state {
		case connectivity.Ready:
			set.Endpoints = append(set.Endpoints, sc.ep)
			byID[sc.ep.ID] = sc.sc
		case connectivity.Idle, connectivity.Connecting:
			connecting = true
		}
	}
	l.bal.Update(set)
	switch {
	case len(set.Endpoints) > 0:
		l.cc.UpdateState(grpcbalancer.State{ConnectivityState: connectivity.Ready, Picker: &picker{bal: l.bal, subConns: byID}})
	case connecting:
		l.cc.UpdateState(grpcbalancer.State{ConnectivityState: connectivity.Connecting, Picker: errPicker{grpcbalancer.ErrNoSubConnAvailable}})
	default:
		err := l.lastErr
		if err == nil {
			err = errors.New("beacongrpc: no endpoint is reachable")
		}
		l.cc.UpdateState(grpcbalancer.State{ConnectivityState: connectivity.TransientFailure, Picker: errPicker{err}})
	}
}

func (l *lb) ResolverError(err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lastErr = err
	if l.bal == nil {
		if cerr := l.configureLocked(nil); cerr != nil {
			return
		}
	}
	ready := false
	for _, sc := range l.subConns {
		ready = ready || sc.state == connectivity.Ready
	}
	if !ready { // keep serving from what we have; otherwise say why not
		l.cc.UpdateState(grpcbalancer.State{ConnectivityState: connectivity.TransientFailure, Picker: errPicker{err}})
	}
}

// UpdateSubConnState is unused: every SubConn has a StateListener.
func (l *lb) UpdateSubConnState(grpcbalancer.SubConn, grpcbalancer.SubConnState) {}

func (l *lb) ExitIdle() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, sc := range l.subConns {
		if sc.state == connectivity.Idle {
			sc.sc.Connect()
		}
	}
}

func (l *lb) Close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.closed = true
	for _, sc := range l.subConns {
		sc.sc.Shutdown()
	}
	if l.bal != nil {
		untrack(l.bal)
		l.bal.Close()
	}
}

type picker struct {
	bal      *balancer.Balancer
	subConns map[string]grpcbalancer.SubConn // by endpoint ID; immutable
}

func (p *picker) Pick(info grpcbalancer.PickInfo) (grpcbalancer.PickResult, error) {
	var pi balancer.PickInfo
	tried := attemptsOf(info.Ctx)
	if tried != nil {
		pi.Avoid = tried.avoid()
	}
	ep, err := p.bal.Pick(pi)
	if err != nil {
		return grpcbalancer.PickResult{}, grpcbalancer.ErrNoSubConnAvailable
	}
	sc, ok := p.subConns[ep.ID]
	if !ok { // the balancer moved on since this picker was built
		ep.Done(nil)
		return grpcbalancer.PickResult{}, grpcbalancer.ErrNoSubConnAvailable
	}
	if tried != nil {
		tried.picked(ep.ID)
	}
	tracing.RecordPick(info.Ctx, p.bal.Name(), ep)
	return grpcbalancer.PickResult{SubConn: sc, Done: func(di grpcbalancer.DoneInfo) {
		var failure error // nil: the outcome says nothing against the endpoint
		if IsFailure(di.Err) || lostHedge(info.Ctx, di.Err) {
			failure = di.Err
		}
		if failure == nil {
			ep.Done(nil)
			return
		}
		d := p.bal.Outlier()
		if d == nil || tracing.Attempt(info.Ctx) == nil {
			ep.Done(failure)
			return
		}
		was := d.Ejected(ep.ID)
		ep.Done(failure)
		if !was && d.Ejected(ep.ID) { // this failure (or one beside it) ejected it
			tracing.RecordEjection(info.Ctx, ep.ID)
		}
	}}, nil
}

// lostHedge reports an attempt cancelled because a hedge answered first:
// for outlier detection that counts against the endpoint, or a hung
// instance that only ever loses to hedges would never be ejected.
func lostHedge(ctx context.Context, err error) bool {
	return err != nil && ctx != nil && errors.Is(context.Cause(ctx), policy.ErrHedgeLost)
}

type errPicker struct{ err error }

func (p errPicker) Pick(grpcbalancer.PickInfo) (grpcbalancer.PickResult, error) {
	return grpcbalancer.PickResult{}, p.err
}

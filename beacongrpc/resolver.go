package beacongrpc

import (
	"context"
	"fmt"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/attributes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/resolver"

	"beacon.dev/beacon/discovery"
	"beacon.dev/beacon/endpoint"
	"beacon.dev/beacon/policy"
)

// Scheme is the target scheme: "beacon:///orders", or
// "beacon://NAMESPACE/orders" to name the namespace explicitly (it must be
// the cache's).
const Scheme = "beacon"

// endpointKey keys the *endpoint.Endpoint in an address's attributes:
// weight, zone, version, tags and metadata travel with it.
type endpointKey struct{}

// EndpointOf returns the beacon endpoint a resolved address came from.
func EndpointOf(addr resolver.Address) (*endpoint.Endpoint, bool) {
	ep, ok := addr.Attributes.Value(endpointKey{}).(*endpoint.Endpoint)
	return ep, ok
}

// ResolverBuilder builds resolvers over one discovery cache.
type ResolverBuilder struct {
	cache     *discovery.Cache
	namespace string
}

var _ resolver.Builder = (*ResolverBuilder)(nil)

// NewResolverBuilder returns a builder to pass to grpc.WithResolvers (or to
// resolver.Register). namespace is the cache's, to check targets against.
func NewResolverBuilder(cache *discovery.Cache, namespace string) *ResolverBuilder {
	return &ResolverBuilder{cache: cache, namespace: namespace}
}

// Scheme implements resolver.Builder.
func (b *ResolverBuilder) Scheme() string { return Scheme }

// Build implements resolver.Builder: it follows the service named by the
// target's path until Close.
func (b *ResolverBuilder) Build(target resolver.Target, cc resolver.ClientConn, _ resolver.BuildOptions) (resolver.Resolver, error) {
	if ns := target.URL.Host; ns != "" && ns != b.namespace {
		return nil, fmt.Errorf("beacongrpc: target %q names namespace %q, the cache follows %q", target.URL.String(), ns, b.namespace)
	}
	service := target.Endpoint()
	sub, err := b.cache.Subscribe(service)
	if err != nil {
		return nil, fmt.Errorf("beacongrpc: target %q: %w", target.URL.String(), err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &beaconResolver{cache: b.cache, service: service, cc: cc, sub: sub, cancel: cancel, done: make(chan struct{})}
	go r.run(ctx)
	return r, nil
}

type beaconResolver struct {
	cache   *discovery.Cache
	service string
	cc      resolver.ClientConn
	sub     *discovery.Subscription
	cancel  context.CancelFunc
	done    chan struct{}
	once    sync.Once
}

// run pushes every set to gRPC until Close.
func (r *beaconResolver) run(ctx context.Context) {
	defer close(r.done)
	for {
		r.push()
		select {
		case <-ctx.Done():
			return
		case <-r.sub.Changed():
		}
	}
}

func (r *beaconResolver) push() {
	set, known := r.cache.Endpoints(r.service)
	if !known {
		return // not heard from the registry yet: gRPC waits for the first state
	}
	if len(set.Endpoints) == 0 {
		// Say so rather than go quiet: RPCs fail with this reason.
		r.cc.ReportError(fmt.Errorf("beacongrpc: service %q has no routable instances (revision %d)", r.service, set.Revision))
		return
	}
	st := resolver.State{}
	for _, ep := range set.Endpoints {
		addr := resolver.Address{Addr: ep.Addr, Attributes: attributes.New(endpointKey{}, ep)}
		st.Addresses = append(st.Addresses, addr)
		st.Endpoints = append(st.Endpoints, resolver.Endpoint{Addresses: []resolver.Address{addr}})
	}
	_ = r.cc.UpdateState(st) // an error means the LB policy rejected it; the next set retries
}

// ResolveNow implements resolver.Resolver: the cache pushes changes, so
// there is nothing to poll.
func (r *beaconResolver) ResolveNow(resolver.ResolveNowOptions) {}

// Close implements resolver.Resolver.
func (r *beaconResolver) Close() {
	r.once.Do(func() {
		r.cancel()
		<-r.done
		r.sub.Close()
	})
}

// ClientOption configures NewClient.
type ClientOption func(*clientConfig)

type clientConfig struct {
	exec       *policy.Executor
	idempotent func(string) bool
	dial       []grpc.DialOption
}

// WithPolicies runs every call through exec (UnaryClientInterceptor and
// StreamClientInterceptor); calls to methods for which idempotent returns
// true may be retried and hedged.
func WithPolicies(exec *policy.Executor, idempotent func(method string) bool) ClientOption {
	return func(c *clientConfig) { c.exec, c.idempotent = exec, idempotent }
}

// WithDialOptions adds gRPC dial options; they come last and may override
// any of NewClient's.
func WithDialOptions(opts ...grpc.DialOption) ClientOption {
	return func(c *clientConfig) { c.dial = append(c.dial, opts...) }
}

// NewClient is grpc.NewClient for "beacon:///service" through cache, with
// the beacon_p2c policy and, WithPolicies, the interceptors. Without
// transport credentials (WithDialOptions) it dials in plaintext.
func NewClient(cache *discovery.Cache, service string, opts ...ClientOption) (*grpc.ClientConn, error) {
	var cfg clientConfig
	for _, o := range opts {
		o(&cfg)
	}
	base := []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithResolvers(NewResolverBuilder(cache, "")),
		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig": [{"` + PolicyP2C + `": {}}]}`),
	}
	if cfg.exec != nil {
		base = append(base,
			grpc.WithChainUnaryInterceptor(UnaryClientInterceptor(cfg.exec, cfg.idempotent)),
			grpc.WithChainStreamInterceptor(StreamClientInterceptor(cfg.exec)))
	}
	return grpc.NewClient(Scheme+":///"+service, append(base, cfg.dial...)...)
}

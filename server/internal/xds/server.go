package xds

import (
	"context"
	"fmt"
	"log/slog"
	"sync"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/config"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"beacon.dev/beacon/registry"
)

// Config configures a Server.
type Config struct {
	Log *slog.Logger
	// Authorize takes the caller of a stream (from its context: token
	// metadata or TLS peer) and returns how to resolve it into what it may
	// read; the stream resolves it again on every request, so that a
	// deleted token or a narrowed policy applies to open streams too. nil:
	// every caller reads everything.
	Authorize func(ctx context.Context) (resolve func() (mayRead func(registry.ServiceKey) bool, err error), err error)
	// NACK is told of every resource a client refused (a NACK), with the
	// client's node id, the resource type and the client's error.
	NACK func(node, typeURL, detail string)
	// Refused is told of every stream ended for its credential
	// (Unauthenticated, PermissionDenied), with the stream's context and
	// the resource asked for ("" when refused as it opened), for the
	// audit log. nil: nobody is told.
	Refused func(ctx context.Context, resource string, err error)
	// Policy returns a service's policy as it is now (nil: every service
	// has the defaults). A change to it must be followed by an Offer of
	// the service: Run reads the policy of each service it was offered.
	Policy func(registry.ServiceKey) registry.ServicePolicy
}

// Server keeps one cache per resource type, all services in each, and
// answers each client with the resources it names (go-control-plane's
// LinearCache under a MuxCache: unlike its snapshot cache, it answers a
// name as soon as it is asked, whatever else exists).
type Server struct {
	cfg    Config
	caches map[string]*cachev3.LinearCache
	xds    serverv3.Server

	mu    sync.Mutex
	dirty map[registry.ServiceKey]*registry.Snapshot
	wake  chan struct{}

	// Run's own: the services whose listener is set, each with the
	// policy its route and cluster were built from.
	applied map[string]registry.ServicePolicy

	// Endpoints differ by the client's zone (priorities): one cache per
	// zone clients said they are in, made on first use, at most maxZones
	// (clients of other zones get the zone-less one).
	edsMu sync.Mutex
	snaps map[string]*registry.Snapshot // by resource name
	eds   map[string]*cachev3.LinearCache

	streams sync.Map // stream id -> resolver (nil: every caller reads everything)
}

var typeURLs = []string{resourcev3.ListenerType, resourcev3.RouteType, resourcev3.ClusterType, resourcev3.EndpointType}

// New returns a Server whose streams end with ctx.
func New(ctx context.Context, cfg Config) *Server {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	s := &Server{cfg: cfg, caches: map[string]*cachev3.LinearCache{}, dirty: map[registry.ServiceKey]*registry.Snapshot{},
		applied: map[string]registry.ServicePolicy{}, wake: make(chan struct{}, 1),
		snaps: map[string]*registry.Snapshot{}, eds: map[string]*cachev3.LinearCache{}}
	mux := &cachev3.MuxCache{
		Classify:      func(r *cachev3.Request) string { return r.GetTypeUrl() },
		ClassifyDelta: func(r *cachev3.DeltaRequest) string { return r.GetTypeUrl() },
		Caches:        map[string]cachev3.Cache{},
	}
	for _, t := range typeURLs[:3] {
		c := cachev3.NewLinearCache(t, cachev3.WithLogger(quietLogger{cfg.Log}))
		s.caches[t] = c
		mux.Caches[t] = c
	}
	s.eds[""] = cachev3.NewLinearCache(resourcev3.EndpointType, cachev3.WithLogger(quietLogger{cfg.Log}))
	mux.Caches[resourcev3.EndpointType] = edsByZone{s}
	// Without legacy wildcards an empty list of names is "none", not "all"
	// (gRPC clients never ask for all); "*" is refused under ACLs below.
	s.xds = serverv3.NewServer(ctx, mux, serverv3.CallbackFuncs{
		StreamOpenFunc:    s.open,
		StreamClosedFunc:  func(id int64, _ *corev3.Node) { s.streams.Delete(id) },
		StreamRequestFunc: s.request,
		DeltaStreamOpenFunc: func(context.Context, int64, string) error {
			return status.Error(codes.Unimplemented, "xds: incremental (delta) xDS is not served; use state-of-the-world ADS")
		},
		DeltaStreamClosedFunc: func(int64, *corev3.Node) {},
	}, config.DeactivateLegacyWildcard())
	return s
}

// Register serves ADS on g.
func (s *Server) Register(g *grpc.Server) {
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(g, s.xds)
}

func (s *Server) open(ctx context.Context, id int64, typeURL string) error {
	if typeURL != resourcev3.AnyType {
		return status.Error(codes.Unimplemented, "xds: only ADS (the aggregated discovery service) is served")
	}
	if s.cfg.Authorize == nil {
		return nil
	}
	resolve, err := s.cfg.Authorize(ctx)
	if err != nil || resolve == nil { // nil: every caller reads everything
		return err
	}
	if _, err := resolve(); err != nil {
		s.refused(ctx, "", err)
		return err
	}
	s.streams.Store(id, stream{ctx, resolve})
	return nil
}

// stream is an open ADS stream's context and credential.
type stream struct {
	ctx     context.Context
	resolve func() (func(registry.ServiceKey) bool, error)
}

func (s *Server) refused(ctx context.Context, resource string, err error) {
	if s.cfg.Refused != nil {
		s.cfg.Refused(ctx, resource, err)
	}
}

// request checks what a client asks for against what it may read, and
// reports a NACK.
func (s *Server) request(id int64, req *discoveryv3.DiscoveryRequest) error {
	if d := req.GetErrorDetail(); d != nil {
		s.cfg.Log.Warn("xds: a client refused (NACKed) a response", "node", req.GetNode().GetId(), "type", req.GetTypeUrl(), "version", req.GetVersionInfo(), "error", d.GetMessage())
		if s.cfg.NACK != nil {
			s.cfg.NACK(req.GetNode().GetId(), req.GetTypeUrl(), d.GetMessage())
		}
	}
	v, ok := s.streams.Load(id)
	if !ok {
		return nil // no ACLs
	}
	st := v.(stream)
	mayRead, err := st.resolve()
	if err != nil {
		s.refused(st.ctx, "", err)
		return err // the credential is gone: the stream ends
	}
	for _, name := range req.GetResourceNames() {
		sk, ok := ParseName(name)
		if !ok {
			// "*" (every resource) included: with ACLs a stream names
			// the services it may read.
			err := status.Errorf(codes.PermissionDenied, "xds: %q names no service (wildcards are refused with ACLs on: name the services)", name)
			s.refused(st.ctx, name, err)
			return err
		}
		if !mayRead(sk) {
			err := status.Errorf(codes.PermissionDenied, "xds: permission denied: needs service:read on %q", sk.Namespace+"/"+sk.Service)
			s.refused(st.ctx, "service:"+sk.Namespace+"/"+sk.Service, err)
			return err
		}
	}
	return nil
}

// Offer hands the server new snapshots; Run applies them. It never blocks.
func (s *Server) Offer(snaps []*registry.Snapshot) {
	s.mu.Lock()
	for _, snap := range snaps {
		sk := registry.ServiceKey{Namespace: snap.Namespace, Service: snap.Service}
		if old, ok := s.dirty[sk]; !ok || snap.Revision >= old.Revision {
			s.dirty[sk] = snap
		}
	}
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Run applies offered snapshots to the caches until ctx ends.
func (s *Server) Run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.wake:
		}
		s.mu.Lock()
		dirty := s.dirty
		s.dirty = map[registry.ServiceKey]*registry.Snapshot{}
		s.mu.Unlock()
		s.apply(dirty)
	}
}

func (s *Server) apply(dirty map[registry.ServiceKey]*registry.Snapshot) {
	fixed := map[string]map[string]types.Resource{resourcev3.ListenerType: {}, resourcev3.RouteType: {}, resourcev3.ClusterType: {}}
	for sk := range dirty {
		name := Name(sk)
		var p registry.ServicePolicy
		if s.cfg.Policy != nil {
			p = s.cfg.Policy(sk)
		}
		old, known := s.applied[name]
		if !known {
			fixed[resourcev3.ListenerType][name] = Listener(name)
		}
		// A route and a cluster change only with the policy: an
		// instance's coming and going sends the endpoints alone.
		if !known || p != old {
			s.applied[name] = p
			fixed[resourcev3.RouteType][name] = Route(name, p)
			fixed[resourcev3.ClusterType][name] = Cluster(name, p)
		}
	}
	// Listeners, routes and clusters first: a client that learns of a
	// cluster finds its endpoints already there.
	for t, res := range fixed {
		if len(res) > 0 {
			if err := s.caches[t].UpdateResources(res, nil); err != nil {
				s.cfg.Log.Error("xds: updating resources", "type", t, "err", err)
			}
		}
	}
	s.edsMu.Lock()
	defer s.edsMu.Unlock()
	for sk, snap := range dirty {
		s.snaps[Name(sk)] = snap
	}
	for zone, c := range s.eds {
		eds := make(map[string]types.Resource, len(dirty))
		for sk, snap := range dirty {
			eds[Name(sk)] = Endpoints(Name(sk), snap, zone)
		}
		if err := c.UpdateResources(eds, nil); err != nil {
			s.cfg.Log.Error("xds: updating endpoints", "zone", zone, "err", err)
		}
	}
}

// maxZones bounds the per-zone endpoint caches (a client names its zone).
const maxZones = 64

// edsCache returns the endpoints' cache of a client's zone, made (with
// every service's endpoints) on first use.
func (s *Server) edsCache(zone string) *cachev3.LinearCache {
	s.edsMu.Lock()
	defer s.edsMu.Unlock()
	if c, ok := s.eds[zone]; ok {
		return c
	}
	if registry.ValidateName("zone", zone) != nil || len(s.eds) >= maxZones+1 { // +1: the zone-less one
		return s.eds[""]
	}
	res := make(map[string]types.Resource, len(s.snaps))
	for name, snap := range s.snaps {
		res[name] = Endpoints(name, snap, zone)
	}
	c := cachev3.NewLinearCache(resourcev3.EndpointType, cachev3.WithLogger(quietLogger{s.cfg.Log}), cachev3.WithInitialResources(res))
	s.eds[zone] = c
	return c
}

// edsByZone is the endpoints' cache as the ADS server sees it: each
// request goes to the cache of the zone its node says it is in.
type edsByZone struct{ s *Server }

func (e edsByZone) CreateWatch(r *cachev3.Request, sub cachev3.Subscription, ch chan cachev3.Response) (func(), error) {
	return e.s.edsCache(r.GetNode().GetLocality().GetZone()).CreateWatch(r, sub, ch)
}

func (e edsByZone) CreateDeltaWatch(r *cachev3.DeltaRequest, sub cachev3.Subscription, ch chan cachev3.DeltaResponse) (func(), error) {
	return e.s.edsCache(r.GetNode().GetLocality().GetZone()).CreateDeltaWatch(r, sub, ch)
}

func (e edsByZone) Fetch(ctx context.Context, r *cachev3.Request) (cachev3.Response, error) {
	return e.s.edsCache(r.GetNode().GetLocality().GetZone()).Fetch(ctx, r)
}

// quietLogger passes go-control-plane's logs on at debug level (warnings
// and errors as such).
type quietLogger struct{ l *slog.Logger }

func (q quietLogger) Debugf(f string, a ...any) { q.l.Debug("xds: " + fmt.Sprintf(f, a...)) }
func (q quietLogger) Infof(f string, a ...any)  { q.l.Debug("xds: " + fmt.Sprintf(f, a...)) }
func (q quietLogger) Warnf(f string, a ...any)  { q.l.Warn("xds: " + fmt.Sprintf(f, a...)) }
func (q quietLogger) Errorf(f string, a ...any) { q.l.Error("xds: " + fmt.Sprintf(f, a...)) }

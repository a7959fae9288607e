package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/audit"
	"beacon.dev/beacon/server/internal/acl"
	"beacon.dev/beacon/server/internal/xds"
)

// The xDS control plane (docs/xds.md): ADS v3 on a gRPC listener of its
// own (--xds-addr), for proxyless gRPC clients in any language and other
// xDS clients, fed from the view (server/internal/xds builds and caches
// the resources).

// XDSConfig configures the xDS control plane.
type XDSConfig struct {
	// Addr is its gRPC listener; empty: off.
	Addr string
	// MaxStreams bounds the ADS streams of one connection.
	MaxStreams int
}

// DefaultXDSMaxStreams is XDSConfig.MaxStreams unless set.
const DefaultXDSMaxStreams = 16

func (c *XDSConfig) bindFlags(fs *pflag.FlagSet) {
	fs.StringVar(&c.Addr, "xds-addr", c.Addr, "serve xDS (ADS v3) here for proxyless gRPC clients, e.g. 127.0.0.1:18000 (default: off; docs/xds.md)")
	fs.IntVar(&c.MaxStreams, "xds-max-streams", c.MaxStreams, "ADS streams of one xDS client connection at most")
}

func (c *Config) validateXDS() error {
	x := c.XDS
	if x.Addr == "" {
		return nil
	}
	if _, _, err := net.SplitHostPort(x.Addr); err != nil {
		return fmt.Errorf("server: invalid --xds-addr %q: %w", x.Addr, err)
	}
	if x.MaxStreams < 1 || x.MaxStreams > 10000 {
		return fmt.Errorf("server: invalid --xds-max-streams %d: must be between 1 and 10000", x.MaxStreams)
	}
	if !c.Insecure && !loopback(x.Addr) && (c.TLSCertFile == "" || !c.ACL) {
		return fmt.Errorf("server: --xds-addr %s is reachable beyond this machine: serve it with --tls-cert and --tls-key (it uses the API's) and turn on --acl, or give --insecure (docs/security.md)", x.Addr)
	}
	return nil
}

// startXDS binds the xDS listener, behind the API's connection limits, and
// serves it; the resources follow the view once it is ready (runXDS).
func (s *Server) startXDS() error {
	cfg := s.cfg.XDS
	if cfg.Addr == "" {
		return nil
	}
	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return fmt.Errorf("server: listening on --xds-addr %s: %w", cfg.Addr, err)
	}
	lim := s.cfg.Limits
	limited := newConnLimiter(ln, lim.effectiveMaxConns(), lim.MaxConnsPerIP, s.conns.newWrites, func(limit string) {
		s.metrics.limitHits.WithLabelValues(limit).Inc()
	})
	s.xdsLn = limited
	nacks := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "beacon_xds_nacks_total", Help: "xDS responses a client refused (NACKed), by resource type.",
	}, []string{"type"})
	refusals := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "beacon_xds_refused_streams_total", Help: "ADS streams ended for their credential, by gRPC code (Unauthenticated, PermissionDenied).",
	}, []string{"code"})
	s.metrics.reg.MustRegister(nacks, refusals)
	s.xds = xds.New(s.runCtx, xds.Config{
		Log:       s.log,
		Authorize: s.xdsAuthorize,
		Refused: func(ctx context.Context, resource string, err error) {
			refusals.WithLabelValues(status.Code(err).String()).Inc()
			s.auditXDSRefusal(ctx, resource, err)
		},
		NACK: func(node, typeURL, detail string) {
			nacks.WithLabelValues(typeURL[strings.LastIndexByte(typeURL, '.')+1:]).Inc()
		},
		// The view publishes a service again when its policy changes.
		Policy: func(sk registry.ServiceKey) registry.ServicePolicy { return s.view.Policy(sk) },
	})
	opts := []grpc.ServerOption{
		grpc.MaxConcurrentStreams(uint32(cfg.MaxStreams)),
		grpc.MaxRecvMsgSize(1 << 20), // a discovery request names resources: a MiB is plenty
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
		grpc.ConnectionTimeout(lim.ReadHeaderTimeout),
		grpc.WaitForHandlers(true), // Stop returns once every ADS handler has
	}
	if s.tlsConfig != nil {
		opts = append(opts, grpc.Creds(credentials.NewTLS(s.tlsConfig))) // the API's certificate and client CAs
	}
	s.xdsSrv = grpc.NewServer(opts...)
	s.xds.Register(s.xdsSrv)
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := s.xdsSrv.Serve(limited); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			s.fail(fmt.Errorf("server: serving --xds-addr %s: %w", cfg.Addr, err))
		}
	}()
	return nil
}

// runXDS feeds the xDS caches: every service once the view is ready, then
// every change the view publishes (offered by its Published hook).
func (s *Server) runXDS(ctx context.Context) {
	select {
	case <-s.view.Ready():
	case <-ctx.Done():
		return
	}
	s.xds.Offer(s.view.All())
	s.xds.Run(ctx)
}

// stopXDS ends the streams (they follow runCtx, already done) and the
// listener.
func (s *Server) stopXDS() {
	if s.xdsSrv != nil {
		s.xdsSrv.Stop()
	}
}

// XDSAddr returns the address xDS is served on ("" when off).
func (s *Server) XDSAddr() string {
	if s.xdsLn == nil {
		return ""
	}
	return s.xdsLn.Addr().String()
}

// xdsAuthorize takes an ADS stream's caller: a token in its metadata
// ("authorization: Bearer …" or "x-beacon-token"), else a verified client
// certificate naming a role. The stream resolves it again on every
// request (a deleted token or role, or a narrowed policy, applies to it).
// xdsCredential is what an ADS stream presents: a token in its metadata,
// or its verified TLS client certificate.
func xdsCredential(ctx context.Context) (secret string, cs *tls.ConnectionState) {
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get("authorization"); len(v) > 0 {
		secret = strings.TrimSpace(strings.TrimPrefix(v[0], "Bearer "))
	} else if v := md.Get("x-beacon-token"); len(v) > 0 {
		secret = strings.TrimSpace(v[0])
	}
	if p, ok := peer.FromContext(ctx); ok {
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok {
			cs = &ti.State
		}
	}
	return secret, cs
}

// auditXDSRefusal writes an ADS stream refused for its credential to the
// audit log, as a refused API call is.
func (s *Server) auditXDSRefusal(ctx context.Context, resource string, err error) {
	if s.audit == nil {
		return
	}
	accessor := ""
	if status.Code(err) != codes.Unauthenticated { // identified before: cheap; a bad credential is not looked up twice
		if id, ierr := s.identify(xdsCredential(ctx)); ierr == nil {
			accessor = id.Accessor
		}
	}
	source := ""
	if p, ok := peer.FromContext(ctx); ok {
		source = p.Addr.String()
	}
	s.audit.write(audit.Event{Accessor: accessor, Source: source, Operation: discoveryv3.AggregatedDiscoveryService_StreamAggregatedResources_FullMethodName[1:],
		Resource: resource, Outcome: audit.OutcomeDenied, Reason: status.Convert(err).Message()})
}

func (s *Server) xdsAuthorize(ctx context.Context) (func() (func(registry.ServiceKey) bool, error), error) {
	if s.acl == nil {
		return nil, nil
	}
	secret, cs := xdsCredential(ctx)
	return func() (func(registry.ServiceKey) bool, error) {
		id, err := s.identify(secret, cs)
		if err != nil {
			return nil, status.Error(codes.Unauthenticated, err.Error())
		}
		return func(sk registry.ServiceKey) bool { return id.Authz.Service(sk.Namespace, sk.Service) >= acl.Read }, nil
	}, nil
}

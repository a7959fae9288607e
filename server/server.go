package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"golang.org/x/time/rate"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3client"
	"golang.org/x/sync/singleflight"
	"google.golang.org/grpc"

	"beacon.dev/beacon/internal/store"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/audit"
	"beacon.dev/beacon/server/internal/acl"
	"beacon.dev/beacon/server/internal/dns"
	"beacon.dev/beacon/server/internal/health"
	"beacon.dev/beacon/server/internal/kv"
	"beacon.dev/beacon/server/internal/lock"
	"beacon.dev/beacon/server/internal/members"
	"beacon.dev/beacon/server/internal/view"
	"beacon.dev/beacon/server/internal/xds"
)

// Server is a running beacon server.
type Server struct {
	cfg     Config
	log     *slog.Logger
	ln      net.Listener
	conns   *connLimiter
	httpSrv *http.Server
	metrics *metrics
	dns     *dns.Server // nil without --dns-addr

	tlsConfig      *tls.Config  // the API's, also the Consul API's; nil without --tls-cert
	consulLn       net.Listener // nil without --consul-addr
	consulSrv      *http.Server
	consulBlocking atomic.Int32 // Consul blocking queries waiting
	consulKV       *consulKVState
	consoleLn      net.Listener // nil without a console (--console-addr)
	consoleSrv     *http.Server
	xdsLn          net.Listener // nil without --xds-addr
	xdsSrv         *grpc.Server
	xds            *xds.Server

	etcd          *embed.Etcd // nil with external etcd
	unlockDataDir func()      // releases the data directory's lock
	cli           *clientv3.Client
	localEtcd     *clientv3.Client // the embedded etcd, in-process (v3client); nil with --etcd-endpoints
	store         *store.Store
	view          *view.View
	acks          *acks
	removals      removals // recent instance removals, for ExplainInstance
	kv            *kv.Store
	kvReplica     *kv.Replica // the KV values, fed by the view
	kvApplied     *kv.Applied
	kvRollouts    *kv.Rollouts
	locks         *lock.Locks
	acl           *acl.System // nil without --acl
	breakGlass    *breakGlass // nil without --acl
	audit         *auditor    // nil without --audit-log
	quotas        *tokenQuotas
	catchUps      singleflight.Group // ACL catch-ups for unknown tokens, one at a time

	watchers  atomic.Int32 // open watch streams (at most Limits.MaxWatchers)
	awaits    atomic.Int32 // AwaitWatchers calls waiting (at most Limits.MaxAwaits)
	lockWaits atomic.Int32 // lock Acquire calls waiting (at most Limits.MaxLockWaits)

	members *members.Members
	checker *health.Checker
	targets health.Targets // where checks may probe
	space   spaceMonitor   // etcd quota, compaction, alarms (space.go)

	ready      chan struct{}
	errc       chan error
	writes     *stalledWrites     // cuts calls whose client stops reading (guard.go)
	stopWrites context.CancelFunc // ends the writes' watchdog, after the HTTP servers stopped
	runCtx     context.Context    // ends when Close starts; watch streams and the view follow it
	runCancel  context.CancelFunc
	wg         sync.WaitGroup
	closing    atomic.Bool // set when Close starts; silences etcd's shutdown noise
	closeOnce  sync.Once
}

// Start starts a server: it binds the API address, starts (or connects to)
// etcd and returns. Ready closes once the server has loaded the registry
// and answers calls; until then /readyz answers 503.
func Start(ctx context.Context, cfg *Config) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Embedded() {
		// Fill in the derived peer address, for the caller too (tests and
		// tools read it back).
		cfg.EtcdPeerAddr, _ = cfg.etcdPeerAddr()
	}
	s := &Server{cfg: *cfg, log: cfg.Logger, ready: make(chan struct{}), errc: make(chan error, 1)}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	s.runCtx, s.runCancel = context.WithCancel(context.Background())
	s.acks = newAcks()
	s.quotas = newTokenQuotas(cfg.Limits)
	s.metrics = newMetrics(s)

	ln, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("server: listening on --addr %s: %w", cfg.Addr, err)
	}
	refusedLog := &logLimiter{every: time.Minute}
	ipWrites := func() *rate.Limiter {
		return rate.NewLimiter(rate.Limit(cfg.Limits.WriteRatePerIP), cfg.Limits.WriteBurstPerIP)
	}
	s.conns = newConnLimiter(ln, cfg.Limits.effectiveMaxConns(), cfg.Limits.MaxConnsPerIP, ipWrites, func(limit string) {
		s.metrics.limitHits.WithLabelValues(limit).Inc()
		if refusedLog.allow() {
			s.log.Warn("refusing client connections at a limit (counted in beacon_limit_refusals_total)", "limit", "--"+limit)
		}
	})
	s.ln = s.conns
	if cfg.AuditLog != "" {
		l, err := audit.Open(cfg.AuditLog, audit.Options{MaxBytes: cfg.AuditLogMaxBytes, MaxFiles: cfg.AuditLogMaxFiles, Logger: s.log})
		if err != nil {
			s.conns.Close()
			return nil, fmt.Errorf("server: --audit-log: %w", err)
		}
		s.audit = &auditor{log: l, errors: s.metrics.auditErrors, warn: &logLimiter{every: time.Minute}, s: s}
	}
	s.warnInsecure()
	if cfg.TLSCertFile != "" {
		cf, err := newCertFiles(cfg.TLSCertFile, cfg.TLSKeyFile, cfg.TLSClientCAFile, s.log)
		if err != nil {
			s.conns.Close()
			return nil, err
		}
		s.tlsConfig = cf.config()
		s.ln = tls.NewListener(s.conns, s.tlsConfig)
	}
	// Serve from the first moment, before etcd is up: /readyz says 503
	// and API calls get unavailable instead of hanging on an open port.
	s.writes = newStalledWrites(cfg.Limits.WriteTimeout, s.metrics.writeTimeouts)
	// Its own context: a shutdown still cuts stalled writes while it
	// waits for the calls in flight.
	writesCtx, stopWrites := context.WithCancel(context.Background())
	s.stopWrites = stopWrites
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.writes.run(writesCtx)
	}()
	s.httpSrv = s.newHTTPServer(s.routes())
	if err := s.startConsul(); err != nil {
		s.runCancel()
		s.conns.Close()
		s.stopWrites()
		s.wg.Wait() // the write watchdog
		s.closeAudit()
		return nil, err
	}
	if err := s.startConsole(); err != nil {
		s.runCancel()
		s.conns.Close()
		if s.consulSrv != nil {
			s.consulSrv.Close()
		}
		s.stopWrites()
		s.wg.Wait()
		s.closeAudit()
		return nil, err
	}
	if err := s.startXDS(); err != nil {
		s.runCancel()
		s.conns.Close()
		if s.consulSrv != nil {
			s.consulSrv.Close()
		}
		s.stopConsole(nil)
		s.stopWrites()
		s.wg.Wait() // their Serve goroutines
		s.closeAudit()
		return nil, err
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := s.httpSrv.Serve(s.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.fail(fmt.Errorf("server: serving %s: %w", cfg.Addr, err))
		}
	}()
	started := false
	defer func() {
		if !started { // Start failed: stop serving before returning the error
			s.runCancel()
			s.httpSrv.Close()
			if s.consulSrv != nil {
				s.consulSrv.Close()
			}
			s.stopConsole(nil)
			s.stopXDS()
			s.stopWrites()
			s.wg.Wait()
			s.closeAudit()
		}
	}()
	if err := s.startDNS(); err != nil { // DNS interface (dns.go)
		return nil, err
	}

	endpoints := cfg.EtcdEndpoints
	var etcdTLS *tls.Config
	if cfg.Embedded() {
		// etcd's own lock on its database waits for ever, deaf to
		// signals, when another process holds it: take ours first.
		unlock, err := lockDataDir(cfg.DataDir)
		if err != nil {
			return nil, err
		}
		socket, _ := EtcdSocket(cfg.DataDir) // Validate checked it
		lg, lastWarning := newEtcdLogger(s.log, &s.closing)
		e, err := startEmbeddedEtcd(ctx, cfg, socket, lg, lastWarning)
		if err != nil {
			unlock()
			return nil, err
		}
		s.etcd, s.unlockDataDir = e, unlock
		endpoints = []string{"unix://" + socket}
	} else if cfg.EtcdCAFile != "" || cfg.EtcdCertFile != "" {
		tlsInfo := transport.TLSInfo{CertFile: cfg.EtcdCertFile, KeyFile: cfg.EtcdKeyFile, TrustedCAFile: cfg.EtcdCAFile}
		if etcdTLS, err = tlsInfo.ClientConfig(); err != nil {
			return nil, fmt.Errorf("server: TLS for --etcd-endpoints: %w", err)
		}
	}
	cli, err := newEtcdClient(endpoints, etcdTLS)
	if err != nil {
		s.stopEtcd()
		return nil, err
	}
	s.cli = cli
	s.store = store.New(cli, cfg.EtcdPrefix)
	if s.etcd != nil {
		s.store.SetRenewer(embeddedRenewer(s.etcd.Server))
		s.localEtcd = v3client.New(s.etcd.Server)
		s.store.SetLocalKV(s.localEtcd.KV)
	}
	if cfg.ACL {
		path := cfg.ACLBreakGlassFile
		if path == "" {
			path = filepath.Join(cfg.DataDir, "acl-break-glass.key")
		}
		if s.breakGlass, err = newBreakGlass(path); err != nil {
			s.store.Close()
			cli.Close()
			s.stopEtcd()
			return nil, err
		}
		s.acl = acl.New(cli, s.store.ACLPrefix(), s.log)
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.acl.Run(s.runCtx)
		}()
	}
	// Servers sharing the etcd split the health checks among themselves.
	s.members = members.Join(cli, s.store.ServersPrefix(), cfg.Name+"@"+ln.Addr().String(), cfg.MemberTTL, s.log)
	hooks := s.metrics.viewHooks()
	s.targets, _ = health.ParseTargets(cfg.CheckAllowTargets) // Validate parsed them
	s.checker = health.New(health.Config{
		Store: s.store, Members: s.members, MaxConcurrent: cfg.CheckConcurrency, MaxConns: cfg.CheckMaxConns, Log: s.log,
		Instance: func(k registry.InstanceKey) *registry.Instance { return s.view.Instance(k) },
	})
	hooks.Published = func(snaps []*registry.Snapshot) {
		s.checker.Offer(snaps)
		if s.xds != nil {
			s.xds.Offer(snaps)
		}
		s.acks.published(snaps, time.Now())
	}
	history := cfg.KVHistory
	if history == 0 {
		history = kv.DefaultHistory
	}
	s.kv = kv.New(cli, s.store.KVPrefix(), s.store.KVHistoryPrefix(), history)
	s.kvReplica = kv.NewReplica(s.store.KVPrefix(), s.store.KVRolloutPrefix(), 0)
	s.kvApplied = kv.NewApplied(cli, s.store.KVAppliedPrefix())
	s.kvRollouts = kv.NewRollouts(s.kv, s.store.KVRolloutPrefix())
	hooks.KVListed = func(kvs []*mvccpb.KeyValue, rev int64) {
		s.kvReplica.Listed(kvs, rev)
		if s.consulKV != nil {
			s.consulKV.listed(rev)
		}
	}
	delay := cfg.LockDelay
	switch {
	case delay == 0:
		delay = DefaultLockDelay
	case delay < 0:
		delay = 0
	}
	s.locks = lock.New(cli, s.store.Layout, delay, s.log)
	hooks.Changed = func(events []*clientv3.Event, rev int64) {
		s.removals.notice(events, s.store.Layout)
		s.kvReplica.Changed(events, rev)
		s.locks.NoticeLost(events)
		if s.consulKV != nil {
			s.consulNotice(events, rev)
		}
	}
	s.view = view.New(cli, s.store.Layout, s.log, hooks)
	s.store.SetHint(func(k registry.InstanceKey) (*registry.Instance, bool) {
		select {
		case <-s.view.Ready():
		default:
			return nil, false // not loaded yet: it would say absent of everything
		}
		in := s.view.Instance(k)
		if in != nil && in.Suspect {
			return nil, false // held by the guard: etcd no longer has it as shown
		}
		return in, true
	})
	s.view.SetDefaultProtection(cfg.ProtectionThreshold)
	vctx, vcancel := context.WithTimeout(ctx, 10*time.Second)
	if v, err := etcdVersion(vctx, cli); err == nil && !progressNotifyOrdered(v) {
		s.log.Warn("etcd's requested progress notifications may run ahead of its events (etcd #15220): linearizable reads will write a probe key", "etcd_version", v)
		s.view.UseProbeWrites()
	}
	vcancel()
	s.view.SetGuard(cfg.Guard, func(string, int, int) { s.metrics.guardTriggered.Inc() })
	s.metrics.reg.MustRegister(s.checker.Collector())

	s.wg.Add(4)
	go func() {
		defer s.wg.Done()
		s.locks.Run(s.runCtx) // lock delays for holders lost with their sessions
	}()
	go func() {
		defer s.wg.Done()
		s.view.Run(s.runCtx)
	}()
	go func() {
		defer s.wg.Done()
		select {
		case <-s.view.Ready():
			s.checker.Run(s.runCtx, s.view.All())
		case <-s.runCtx.Done():
		}
	}()
	go func() {
		defer s.wg.Done()
		s.watchReadiness()
	}()
	s.wg.Add(1)
	go s.watchSpace(s.runCtx) // etcd quota, compaction, alarms (space.go)
	if s.xds != nil {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.runXDS(s.runCtx)
		}()
	}
	if s.consulKV != nil {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.consulReleaser(s.runCtx) // locks of Consul sessions that ended
		}()
	}
	started = true
	return s, nil
}

// warnInsecure warns, at every start, about each opening that Insecure
// or a loopback address let through: they are meant to be noticed.
func (s *Server) warnInsecure() {
	cfg := &s.cfg
	if cfg.Insecure && cfg.TLSCertFile == "" && !loopback(cfg.Addr) {
		s.log.Warn("serving the API in the clear beyond this machine (--insecure): anyone who reaches it can read the registry, and tokens cross the network readable", "addr", cfg.Addr)
	}
	if cfg.Insecure && !cfg.ACL && !loopback(cfg.Addr) {
		s.log.Warn("serving the API without ACLs beyond this machine (--insecure): anyone who reaches it can change the registry", "addr", cfg.Addr)
	}
	if c := cfg.Consul.Addr; c != "" && cfg.Insecure && !loopback(c) && (cfg.TLSCertFile == "" || !cfg.ACL) {
		s.log.Warn("serving the Consul-compatible API beyond this machine in the clear or without --acl (--insecure)", "consul_addr", c)
	}
	if !cfg.Embedded() {
		for _, ep := range cfg.EtcdEndpoints {
			if u, err := url.Parse(ep); err == nil && u.Scheme == "http" && !loopback(u.Host) {
				s.log.Warn("talking to etcd in the clear across the network: whoever reaches it can write the registry past the server (docs/security.md, \"An external etcd\")", "endpoint", ep)
			}
		}
		return
	}
	if cfg.EtcdClientAddr != "" && cfg.EtcdClientCertFile == "" {
		if loopback(cfg.EtcdClientAddr) {
			s.log.Warn("the embedded etcd's TCP client listener has no client-certificate auth: any local process can write the registry past the server (give --etcd-client-cert, --etcd-client-key and --etcd-client-ca)", "etcd_client_addr", cfg.EtcdClientAddr)
		} else {
			s.log.Warn("the embedded etcd's TCP client listener is in the clear beyond this machine (--insecure): anyone who reaches it can write the registry past the server", "etcd_client_addr", cfg.EtcdClientAddr)
		}
	}
	if cfg.cluster() && cfg.EtcdPeerCertFile == "" {
		s.log.Warn("the embedded etcd's members talk in the clear (--insecure, no --etcd-peer-cert): anyone who reaches a peer port can join the cluster or forge its traffic and write the registry", "etcd_peer_addr", cfg.EtcdPeerAddr)
	}
}

func (s *Server) newHTTPServer(handler http.Handler) *http.Server {
	lim := s.cfg.Limits
	srv := &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: lim.ReadHeaderTimeout,
		IdleTimeout:       lim.IdleTimeout,
		MaxHeaderBytes:    64 << 10,
		BaseContext:       func(net.Listener) context.Context { return s.runCtx },
		ConnContext:       s.connContext,
		Protocols:         new(http.Protocols),
		HTTP2: &http.HTTP2Config{
			MaxConcurrentStreams: lim.MaxStreamsPerConn,
			// Find clients that vanished without closing their connection.
			SendPingTimeout: 15 * time.Second,
			PingTimeout:     10 * time.Second,
		},
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	srv.Protocols.SetHTTP1(true)
	if s.cfg.TLSCertFile != "" {
		srv.Protocols.SetHTTP2(true)
	} else {
		srv.Protocols.SetUnencryptedHTTP2(true)
	}
	return srv
}

// isReady reports whether Ready is closed; the fields Start fills after
// etcd is up may be read once it is.
func (s *Server) isReady() bool {
	select {
	case <-s.ready:
		return true
	default:
		return false
	}
}

func (s *Server) watchReadiness() {
	var etcdErr <-chan error
	if s.etcd != nil {
		etcdErr = s.etcd.Err()
	}
	aclReady := closedChan
	if s.acl != nil {
		aclReady = s.acl.Ready()
	}
	for _, ready := range []<-chan struct{}{s.view.Ready(), aclReady} {
		select {
		case <-ready:
		case <-s.runCtx.Done():
			return
		}
	}
	close(s.ready)
	s.log.Info("beacon server ready", "addr", s.Addr(), "embedded_etcd", s.etcd != nil, "acl", s.acl != nil)
	select {
	case err := <-etcdErr:
		s.fail(fmt.Errorf("server: embedded etcd failed: %w", err))
	case <-s.runCtx.Done():
	}
}

var closedChan = func() <-chan struct{} { c := make(chan struct{}); close(c); return c }()

func (s *Server) fail(err error) {
	s.log.Error("beacon server failed", "err", err)
	select {
	case s.errc <- err:
	default:
	}
}

// Ready is closed once the server serves calls.
func (s *Server) Ready() <-chan struct{} { return s.ready }

// Err reports a fatal error; it never blocks the server.
func (s *Server) Err() <-chan error { return s.errc }

// Addr returns the address the API listens on.
func (s *Server) Addr() string { return s.ln.Addr().String() }

// EtcdClient returns the server's etcd client (for tests and tools).
func (s *Server) EtcdClient() *clientv3.Client { return s.cli }

// Close ends watch streams, waits up to ShutdownTimeout for in-flight
// calls, then stops the view and etcd. Sessions are not revoked: clients
// resume them on another server or after a restart.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.closing.Store(true)
		s.runCancel()
		ctx, cancel := context.WithTimeout(context.Background(), s.cfg.ShutdownTimeout)
		defer cancel()
		if err := s.httpSrv.Shutdown(ctx); err != nil {
			s.httpSrv.Close()
		}
		if s.consulSrv != nil {
			if err := s.consulSrv.Shutdown(ctx); err != nil {
				s.consulSrv.Close()
			}
		}
		s.stopConsole(ctx)
		s.stopXDS() // its streams ended with runCtx
		s.stopWrites()
		s.wg.Wait()
		s.closeAudit()
		s.members.Close() // the others take over our checks at once
		s.store.Close()
		s.cli.Close()
		s.stopEtcd()
	})
	return nil
}

func (s *Server) closeAudit() {
	if s.audit != nil {
		if err := s.audit.log.Close(); err != nil {
			s.log.Error("audit log: closing", "err", err)
		}
	}
}

func (s *Server) stopEtcd() {
	if s.localEtcd != nil {
		s.localEtcd.Close()
	}
	if s.etcd != nil {
		s.etcd.Close()
		s.unlockDataDir()
	}
}

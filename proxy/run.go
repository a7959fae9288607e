package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"beacon.dev/beacon/beaconhttp"
	"beacon.dev/beacon/lifecycle"
	"beacon.dev/beacon/registry"
)

// DefaultShutdownTimeout bounds how long Run waits for requests in flight
// once it stops (the sidecar's stopTimeout when longer).
const DefaultShutdownTimeout = 10 * time.Second

type limitsKey struct{}

func limitsOf(ctx context.Context) *Limits {
	l, _ := ctx.Value(limitsKey{}).(*Limits)
	return l
}

// Run listens and serves until ctx ends, then stops: in sidecar mode it
// first drains the local service's instance (lifecycle.Run: DRAINING,
// acknowledged by the watchers, in-flight requests finished,
// deregistered), then closes the outbound listeners gracefully. It
// returns nil after a clean stop. Run once.
func (p *Proxy) Run(ctx context.Context) error {
	cfg := p.cfg.Load()
	var (
		lns     []net.Listener // what each server serves
		servers []*http.Server
		fastOf  []*h1Server // servers[i]'s HTTP/1.1 fast path, or nil
		fast    []*h1Server // the plain listeners' fast paths
		fastLns []net.Listener
	)
	closeAll := func() {
		for _, ln := range append(lns, fastLns...) {
			ln.Close()
		}
	}
	for i := range cfg.Listeners {
		lc := &cfg.Listeners[i]
		ln, err := p.listen(lc.Name, lc.Addr, lc.Limits.MaxConnections, lc.TLS != nil, fmt.Sprintf("listeners[%d].limits.maxConnections", i))
		if err != nil {
			closeAll()
			return err
		}
		srv := p.server(lc.Limits, p)
		if lc.TLS != nil {
			cert, err := tls.LoadX509KeyPair(lc.TLS.Cert, lc.TLS.Key)
			if err != nil {
				ln.Close()
				closeAll()
				return fmt.Errorf("proxy: listeners[%d].tls: %w", i, err)
			}
			srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12, NextProtos: []string{"h2", "http/1.1"}}
			ln = tls.NewListener(ln, srv.TLSConfig)
		}
		if lc.H2C {
			srv.Protocols = new(http.Protocols)
			srv.Protocols.SetHTTP1(true)
			srv.Protocols.SetUnencryptedHTTP2(true)
			srv.Protocols.SetHTTP2(true)
		}
		var h *h1Server
		if lc.TLS == nil && !lc.NetHTTP { // the fast path accepts; net/http gets what it hands over
			h = newH1Server(p, lc.Limits, ln.Addr())
			fast, fastLns = append(fast, h), append(fastLns, ln)
			ln = h.handoff
		}
		fastOf = append(fastOf, h)
		lns = append(lns, ln)
		servers = append(servers, srv)
	}
	if cfg.Metrics.Addr != "" {
		ln, err := net.Listen("tcp", cfg.Metrics.Addr)
		if err != nil {
			closeAll()
			return fmt.Errorf("proxy: metrics.addr: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", promhttp.HandlerFor(p.reg, promhttp.HandlerOpts{}))
		lns, fastOf = append(lns, ln), append(fastOf, nil)
		servers = append(servers, &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second})
	}
	var tcps []*tcpProxy
	for i := range cfg.TCP {
		tp, err := p.newTCP(&cfg.TCP[i], fmt.Sprintf("tcp[%d]", i))
		if err != nil {
			for _, t := range tcps {
				t.close()
			}
			closeAll()
			return err
		}
		tcps = append(tcps, tp)
	}
	var sidecarLn net.Listener
	if sc := cfg.Sidecar; sc != nil {
		ln, err := p.listen("sidecar", sc.Addr, sc.Limits.MaxConnections, false, "sidecar.limits.maxConnections")
		if err != nil {
			for _, t := range tcps {
				t.close()
			}
			closeAll()
			return err
		}
		sidecarLn = ln
	}

	var wg sync.WaitGroup
	errc := make(chan error, len(servers)+1)
	for i, srv := range servers {
		wg.Add(1)
		go func() { // owned by Run: ends with Shutdown below
			defer wg.Done()
			if err := srv.Serve(lns[i]); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("proxy: serving %s: %w", lns[i].Addr(), err)
			}
		}()
	}
	for i, h := range fast {
		wg.Add(1)
		go func() { // owned by Run: ends when its listener is closed below
			defer wg.Done()
			if err := h.serve(fastLns[i]); err != nil && !errors.Is(err, net.ErrClosed) {
				errc <- fmt.Errorf("proxy: serving %s: %w", fastLns[i].Addr(), err)
			}
		}()
	}
	for _, t := range tcps {
		wg.Add(1)
		go func() { defer wg.Done(); t.serve() }() // ends with t.close
	}
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	sidecarDone := make(chan error, 1)
	shutdown := DefaultShutdownTimeout
	if sc := cfg.Sidecar; sc != nil {
		shutdown = max(shutdown, time.Duration(sc.StopTimeout))
		lcfg, err := p.sidecarConfig(sc, sidecarLn, cfg.Zone)
		if err != nil {
			sidecarLn.Close()
			sidecarDone <- err
		} else {
			wg.Add(1)
			go func() { // owned by Run: ends when runCtx does (or on a signal)
				defer wg.Done()
				_, err := lifecycle.Run(runCtx, lcfg)
				sidecarDone <- err
			}()
		}
	}
	p.markReady()

	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	case err = <-sidecarDone:
		sidecarDone <- err // read again below
	}
	stop()
	if cfg.Sidecar != nil {
		// The drain comes first: the local service may still call out
		// through the outbound listeners while its callers move away.
		if serr := <-sidecarDone; err == nil {
			err = serr
		}
	}
	sctx, cancel := context.WithTimeout(context.Background(), shutdown)
	defer cancel()
	// Every listener stops at once. A fast path stops before its net/http
	// server: until its last request is done, it may still hand that
	// server a connection.
	for _, ln := range fastLns {
		ln.Close()
	}
	var stopping sync.WaitGroup
	stopErrs := make([]error, len(servers))
	for i, srv := range servers {
		stopping.Add(1)
		go func() { // ends by sctx at the latest
			defer stopping.Done()
			if h := fastOf[i]; h != nil {
				stopErrs[i] = h.shutdown(sctx)
			}
			if serr := srv.Shutdown(sctx); stopErrs[i] == nil {
				stopErrs[i] = serr
			}
		}()
	}
	stopping.Wait()
	for _, serr := range stopErrs {
		if serr != nil && err == nil {
			err = fmt.Errorf("proxy: requests still in flight after %v: %w", shutdown, serr)
		}
	}
	for _, t := range tcps {
		t.close()
	}
	wg.Wait()
	return err
}

// server returns an http.Server bounded by l whose requests carry l.
func (p *Proxy) server(l Limits, h http.Handler) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: time.Duration(l.ReadHeaderTimeout),
		IdleTimeout:       time.Duration(l.IdleTimeout),
		WriteTimeout:      time.Duration(l.WriteTimeout),
		MaxHeaderBytes:    l.MaxHeaderBytes,
		BaseContext:       func(net.Listener) context.Context { return context.WithValue(context.Background(), limitsKey{}, &l) },
		ErrorLog:          nil,
	}
}

// sidecarConfig is the lifecycle.Run of the inbound side: a reverse proxy
// to the local service, registered once the local service answers.
func (p *Proxy) sidecarConfig(sc *Sidecar, ln net.Listener, zone string) (lifecycle.Config, error) {
	local := &url.URL{Scheme: "http", Host: sc.Local}
	tr := beaconhttp.DefaultBase()
	tr.DisableCompression = true
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(local)
			pr.Out.Host = pr.In.Host
			pr.SetXForwarded()
		},
		Transport: tr,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			http.Error(w, "beacon proxy: local service "+sc.Local+": "+err.Error(), http.StatusBadGateway)
		},
	}
	in := p.server(sc.Limits, bodyLimited(rp))
	host, port, err := net.SplitHostPort(ln.Addr().String())
	if err != nil {
		return lifecycle.Config{}, err
	}
	if sc.Advertise != "" {
		host = sc.Advertise
	} else if h, _, _ := net.SplitHostPort(sc.Addr); h != "" {
		host = h
	}
	pn, _ := strconv.Atoi(port)
	inst := registry.Instance{
		Service: sc.Service, ID: sc.ID, Address: host, Port: pn, Zone: zone,
		Version: sc.Version, Tags: sc.Tags, Metadata: sc.Metadata, Weight: sc.Weight,
	}
	var ready func(context.Context) error
	if sc.HealthPath != "-" {
		target := "http://" + net.JoinHostPort(host, port) + sc.HealthPath
		// The registry probes the local service through the sidecar: a
		// local service that stops answering becomes CRITICAL and leaves
		// the routable set, as a Go service's failing check would.
		inst.Checks = []registry.Check{{Name: "local", Kind: registry.CheckHTTP, Target: target, Interval: time.Duration(sc.HealthInterval)}}
		probe := "http://" + sc.Local + sc.HealthPath
		hc := &http.Client{Transport: tr, Timeout: 2 * time.Second}
		ready = func(ctx context.Context) error {
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, probe, nil)
			if err != nil {
				return err
			}
			resp, err := hc.Do(req)
			if err != nil {
				return err
			}
			resp.Body.Close()
			if resp.StatusCode/100 != 2 {
				return fmt.Errorf("proxy: local service %s answered %s", probe, resp.Status)
			}
			return nil
		}
	}
	return lifecycle.Config{
		Client: p.client, Instance: inst, HTTPService: sc.Service,
		HTTP: in, HTTPListener: ln, Ready: ready, ReadyInterval: time.Duration(sc.HealthInterval),
		SessionTTL: time.Duration(sc.TTL), AckTimeout: time.Duration(sc.AckTimeout),
		StopTimeout: time.Duration(sc.StopTimeout), DrainDelay: time.Duration(sc.DrainDelay),
		Logger: p.log,
	}, nil
}

// listen opens a listener that holds at most max connections: the next
// one gets a 503 naming the limit (plain HTTP) or is closed (TLS) at once.
func (p *Proxy) listen(name, addr string, max int, isTLS bool, field string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("proxy: listener %s: %w", name, err)
	}
	return &limitListener{Listener: ln, sem: make(chan struct{}, max), tls: isTLS, field: field, max: max,
		gauge: p.m.conns.WithLabelValues(name), rejected: p.m.rejected.WithLabelValues(name)}, nil
}

// markReady closes Ready's channel once.
func (p *Proxy) markReady() { p.readyOnce.Do(func() { close(p.ready) }) }

// Ready is closed once Run listens on every address.
func (p *Proxy) Ready() <-chan struct{} { return p.ready }

// bodyLimited enforces the listener's limits.maxBodyBytes on a handler
// that is not the proxy's router (the sidecar's pass to the local
// service): 413 at once for a declared length over it, and a body cut
// there otherwise.
func bodyLimited(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		lim := limitsOf(req.Context())
		if lim != nil && lim.MaxBodyBytes > 0 && req.Body != nil && req.Body != http.NoBody {
			if req.ContentLength > lim.MaxBodyBytes {
				http.Error(w, fmt.Sprintf("beacon proxy: request body of %d bytes is over the listener's limit (limits.maxBodyBytes %d)", req.ContentLength, lim.MaxBodyBytes), http.StatusRequestEntityTooLarge)
				return
			}
			req.Body = http.MaxBytesReader(w, req.Body, lim.MaxBodyBytes)
		}
		h.ServeHTTP(w, req)
	})
}

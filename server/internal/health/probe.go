package health

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"beacon.dev/beacon/registry"
)

// verdict is what a probe says about its target.
type verdict int8

const (
	fail verdict = iota
	pass
	// noVerdict: the probe could not run for a reason of this server's
	// (its probe connections at the limit); the check's counters stay.
	noVerdict
)

// prober runs one kind of probe against one target. probe is called by
// one goroutine at a time and is bounded by ctx, dial included; close
// when the check stops: it releases the prober's connections.
type prober interface {
	probe(ctx context.Context) (verdict, string)
	close()
}

func newProber(spec registry.Check, target string, ttl func(ctx context.Context) (bool, error), conns *connLimiter) prober {
	switch spec.Kind {
	case registry.CheckTTL:
		return ttlProber{alive: ttl, ttl: spec.Interval}
	case registry.CheckHTTP:
		p := &httpProber{spec: spec, url: target, conns: conns}
		p.client = &http.Client{
			Transport: &http.Transport{
				// Through the cap, and bounded by the timeout: net/http goes
				// on dialing after the request is cancelled.
				DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
					return conns.dial(ctx, p, spec.Timeout, network, addr)
				},
				TLSHandshakeTimeout: spec.Timeout,
				// One connection per check, kept between runs: 1,000
				// checks a second must not open 1,000 connections a second.
				MaxIdleConnsPerHost: 1, IdleConnTimeout: 2 * spec.Interval,
				DisableCompression: true,
			},
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
		return p
	case registry.CheckGRPC:
		return &grpcProber{spec: spec, target: target, conns: conns}
	default:
		return tcpProber{spec: spec, target: target, conns: conns}
	}
}

// refused tells a dial refused by the connection cap.
func refused(err error) (string, bool) {
	var le *connLimitError
	if errors.As(err, &le) {
		return le.Error(), true
	}
	return "", false
}

type httpProber struct {
	spec   registry.Check
	url    string
	client *http.Client
	conns  *connLimiter
}

func (p *httpProber) probe(ctx context.Context) (verdict, string) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.url, nil)
	if err != nil {
		return fail, err.Error()
	}
	req.Header.Set("User-Agent", "beacon-health-check")
	for k, v := range p.spec.Headers {
		if strings.EqualFold(k, "Host") {
			req.Host = v
			continue
		}
		req.Header.Set(k, v)
	}
	p.conns.markBusy(p)
	resp, err := p.client.Do(req)
	if err != nil {
		// No connection is left to pool: not idle, nothing to evict.
		if out, ok := refused(err); ok {
			return noVerdict, out
		}
		return fail, short(err)
	}
	defer p.conns.markIdle(p) // after the body is closed: its connection may stay in the pool
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	out := fmt.Sprintf("HTTP GET %s: %s", p.url, resp.Status)
	if !p.spec.StatusMatches(resp.StatusCode) {
		return fail, out + " (want " + p.spec.ExpectStatus + ")"
	}
	if p.spec.BodyContains != "" && !strings.Contains(string(body), p.spec.BodyContains) {
		return fail, out + fmt.Sprintf(" (body lacks %q)", p.spec.BodyContains)
	}
	return pass, out
}

func (p *httpProber) closeIdle() { p.client.CloseIdleConnections() }

func (p *httpProber) close() {
	p.conns.markBusy(p)
	// Also makes the transport close, rather than pool, a connection whose
	// dial ends after this (bounded by the timeout).
	p.client.CloseIdleConnections()
}

// ttlProber looks for the check's heartbeat key, which its lease removes
// when no update came within the TTL.
type ttlProber struct {
	alive func(ctx context.Context) (bool, error)
	ttl   time.Duration
}

func (p ttlProber) probe(ctx context.Context) (verdict, string) {
	ok, err := p.alive(ctx)
	if err != nil {
		return pass, "" // etcd unreachable: no verdict, and no false alarm
	}
	if !ok {
		return fail, fmt.Sprintf("TTL %v passed without an update", p.ttl)
	}
	return pass, ""
}

func (ttlProber) close() {}

type tcpProber struct {
	spec   registry.Check
	target string
	conns  *connLimiter
}

func (p tcpProber) probe(ctx context.Context) (verdict, string) {
	conn, err := p.conns.dial(ctx, nil, p.spec.Timeout, "tcp", p.target)
	if err != nil {
		if out, ok := refused(err); ok {
			return noVerdict, out
		}
		return fail, short(err)
	}
	conn.Close()
	return pass, "TCP connect " + p.target + ": ok"
}

func (tcpProber) close() {}

// grpcProber keeps one channel per check between runs while the target
// answers; a failed probe closes it, so that the channel does not go on
// reconnecting in the background between probes (its dials would hold
// probe connections) and the next probe starts afresh.
type grpcProber struct {
	spec    registry.Check
	target  string
	conns   *connLimiter
	refused atomic.Pointer[connLimitError] // the last dial's refusal, nil if none

	mu    sync.Mutex
	cc    *grpc.ClientConn // guarded by mu
	inUse bool             // guarded by mu; a probe runs on cc
}

func (p *grpcProber) probe(ctx context.Context) (verdict, string) {
	p.conns.markBusy(p)
	p.mu.Lock()
	if p.cc == nil {
		cc, err := grpc.NewClient("passthrough:///"+p.target,
			grpc.WithTransportCredentials(insecure.NewCredentials()),
			// Through the cap, each dial bounded by the timeout; the
			// connect deadline (dial and HTTP/2 handshake) would otherwise
			// be 20 s, growing with the backoff up to 2 min.
			grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
				conn, err := p.conns.dial(ctx, p, p.spec.Timeout, "tcp", addr)
				var le *connLimitError
				if errors.As(err, &le) {
					p.refused.Store(le)
				}
				return conn, err
			}),
			grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.DefaultConfig, MinConnectTimeout: p.spec.Timeout}),
		)
		if err != nil {
			p.mu.Unlock()
			return fail, short(err)
		}
		p.cc = cc
	}
	cc := p.cc
	p.inUse = true
	p.mu.Unlock()
	p.refused.Store(nil)

	resp, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{Service: p.spec.GRPCService})

	p.mu.Lock()
	p.inUse = false
	if err != nil && p.cc == cc {
		p.cc = nil
	}
	p.mu.Unlock()
	if err != nil {
		cc.Close()
		if le := p.refused.Load(); le != nil {
			return noVerdict, le.Error()
		}
		return fail, short(err)
	}
	p.conns.markIdle(p)
	out := fmt.Sprintf("gRPC health %s %q: %s", p.target, p.spec.GRPCService, resp.GetStatus())
	if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		return fail, out
	}
	return pass, out
}

func (p *grpcProber) closeIdle() {
	p.mu.Lock()
	cc := p.cc
	if p.inUse {
		cc = nil // a probe started since: it keeps its channel
	} else {
		p.cc = nil
	}
	p.mu.Unlock()
	if cc != nil {
		cc.Close()
	}
}

func (p *grpcProber) close() {
	p.conns.markBusy(p)
	p.closeIdle() // the checker calls close only when no probe runs
}

func short(err error) string {
	s := err.Error()
	if len(s) > registry.MaxCheckOutputLen {
		s = s[:registry.MaxCheckOutputLen]
	}
	return s
}

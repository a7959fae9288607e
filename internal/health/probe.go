package health

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"beacon.dev/beacon/registry"
)

// prober runs one kind of probe against one target. probe is called by
// one goroutine at a time; close when the check stops.
type prober interface {
	probe(ctx context.Context) (ok bool, output string)
	close()
}

func newProber(spec registry.Check, target string, ttl func(ctx context.Context) (bool, error)) prober {
	switch spec.Kind {
	case registry.CheckTTL:
		return ttlProber{alive: ttl, ttl: spec.Interval}
	case registry.CheckHTTP:
		return &httpProber{spec: spec, url: target, client: &http.Client{
			Transport: &http.Transport{
				// One connection per check, kept between runs: 1,000
				// checks a second must not open 1,000 connections a second.
				MaxIdleConnsPerHost: 1, IdleConnTimeout: 2 * spec.Interval,
				DisableCompression: true,
			},
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}}
	case registry.CheckGRPC:
		return &grpcProber{spec: spec, target: target}
	default:
		return tcpProber{target: target}
	}
}

type httpProber struct {
	spec   registry.Check
	url    string
	client *http.Client
}

func (p *httpProber) probe(ctx context.Context) (bool, string) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.url, nil)
	if err != nil {
		return false, err.Error()
	}
	req.Header.Set("User-Agent", "beacon-health-check")
	for k, v := range p.spec.Headers {
		if strings.EqualFold(k, "Host") {
			req.Host = v
			continue
		}
		req.Header.Set(k, v)
	}
	resp, err := p.client.Do(req)
	if err != nil {
		return false, short(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	out := fmt.Sprintf("HTTP GET %s: %s", p.url, resp.Status)
	if !p.spec.StatusMatches(resp.StatusCode) {
		return false, out + " (want " + p.spec.ExpectStatus + ")"
	}
	if p.spec.BodyContains != "" && !strings.Contains(string(body), p.spec.BodyContains) {
		return false, out + fmt.Sprintf(" (body lacks %q)", p.spec.BodyContains)
	}
	return true, out
}

func (p *httpProber) close() { p.client.CloseIdleConnections() }

// ttlProber looks for the check's heartbeat key, which its lease removes
// when no update came within the TTL.
type ttlProber struct {
	alive func(ctx context.Context) (bool, error)
	ttl   time.Duration
}

func (p ttlProber) probe(ctx context.Context) (bool, string) {
	ok, err := p.alive(ctx)
	if err != nil {
		return true, "" // etcd unreachable: no verdict, and no false alarm
	}
	if !ok {
		return false, fmt.Sprintf("TTL %v passed without an update", p.ttl)
	}
	return true, ""
}

func (ttlProber) close() {}

type tcpProber struct{ target string }

func (p tcpProber) probe(ctx context.Context) (bool, string) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", p.target)
	if err != nil {
		return false, short(err)
	}
	conn.Close()
	return true, "TCP connect " + p.target + ": ok"
}

func (tcpProber) close() {}

// grpcProber keeps one connection per check between runs.
type grpcProber struct {
	spec   registry.Check
	target string
	cc     *grpc.ClientConn
}

func (p *grpcProber) probe(ctx context.Context) (bool, string) {
	if p.cc == nil {
		cc, err := grpc.NewClient("passthrough:///"+p.target, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return false, short(err)
		}
		p.cc = cc
	}
	resp, err := healthpb.NewHealthClient(p.cc).Check(ctx, &healthpb.HealthCheckRequest{Service: p.spec.GRPCService})
	if err != nil {
		return false, short(err)
	}
	out := fmt.Sprintf("gRPC health %s %q: %s", p.target, p.spec.GRPCService, resp.GetStatus())
	return resp.GetStatus() == healthpb.HealthCheckResponse_SERVING, out
}

func (p *grpcProber) close() {
	if p.cc != nil {
		p.cc.Close()
	}
}

func short(err error) string {
	s := err.Error()
	if len(s) > registry.MaxCheckOutputLen {
		s = s[:registry.MaxCheckOutputLen]
	}
	return s
}

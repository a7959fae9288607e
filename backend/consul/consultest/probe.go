package consultest

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/hashicorp/consul/api"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// startProbeLocked runs an HTTP, TCP or gRPC check at its interval until
// the check is dropped or the server closes, as the agent does.
func (s *Server) startProbeLocked(c *check) {
	ctx, cancel := context.WithCancel(s.ctx)
	s.probes[c.hc.CheckID] = cancel
	interval := c.hc.Definition.IntervalDuration
	timeout := 10 * time.Second // Consul's default
	if d, err := time.ParseDuration(c.spec.Timeout); err == nil && d > 0 {
		timeout = d
	}
	spec := c.spec
	s.wg.Add(1)
	go func() { // owned: ends when the check is dropped (cancel) or the server closes
		defer s.wg.Done()
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			pctx, pcancel := context.WithTimeout(ctx, timeout)
			status, output := probe(pctx, &spec)
			pcancel()
			if ctx.Err() != nil {
				return
			}
			s.mu.Lock()
			if cur, ok := s.checks[c.hc.CheckID]; ok && cur == c {
				s.observeLocked(c, status, output)
			}
			s.mu.Unlock()
		}
	}()
}

// observeLocked applies a probe's result with Consul's thresholds: a
// change of status needs SuccessBeforePassing successes (or
// FailuresBeforeCritical failures) in a row.
func (s *Server) observeLocked(c *check, status, output string) {
	if status == api.HealthPassing {
		c.successes, c.failures = c.successes+1, 0
		if c.successes < max(c.spec.SuccessBeforePassing, 1) {
			return
		}
	} else {
		c.failures, c.successes = c.failures+1, 0
		if status == api.HealthCritical && c.failures < max(c.spec.FailuresBeforeCritical, 1) {
			return
		}
	}
	s.setStatusLocked(c, status, output)
}

func probe(ctx context.Context, spec *api.AgentServiceCheck) (status, output string) {
	switch {
	case spec.HTTP != "":
		return probeHTTP(ctx, spec)
	case spec.TCP != "":
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", spec.TCP)
		if err != nil {
			return api.HealthCritical, fmt.Sprintf("dial tcp %s: %v", spec.TCP, err)
		}
		conn.Close()
		return api.HealthPassing, fmt.Sprintf("TCP connect %s: Success", spec.TCP)
	default:
		return probeGRPC(ctx, spec.GRPC)
	}
}

func probeHTTP(ctx context.Context, spec *api.AgentServiceCheck) (string, string) {
	method := spec.Method
	if method == "" {
		method = http.MethodGet
	}
	req, err := http.NewRequestWithContext(ctx, method, spec.HTTP, nil)
	if err != nil {
		return api.HealthCritical, err.Error()
	}
	for k, vs := range spec.Header {
		for _, v := range vs {
			req.Header.Add(k, v)
		}
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return api.HealthCritical, fmt.Sprintf("Get %q: %v", spec.HTTP, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	output := fmt.Sprintf("HTTP %s %s: %s Output: %s", method, spec.HTTP, resp.Status, body)
	switch {
	case resp.StatusCode >= 200 && resp.StatusCode < 300:
		return api.HealthPassing, output
	case resp.StatusCode == http.StatusTooManyRequests:
		return api.HealthWarning, output
	default:
		return api.HealthCritical, output
	}
}

// probeGRPC asks grpc.health.v1 at "host:port" or "host:port/service".
func probeGRPC(ctx context.Context, target string) (string, string) {
	addr, svc, _ := strings.Cut(target, "/")
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return api.HealthCritical, err.Error()
	}
	defer conn.Close()
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
	if err != nil {
		return api.HealthCritical, fmt.Sprintf("gRPC %s: %v", target, err)
	}
	if resp.Status != healthpb.HealthCheckResponse_SERVING {
		return api.HealthCritical, fmt.Sprintf("gRPC %s: %s", target, resp.Status)
	}
	return api.HealthPassing, fmt.Sprintf("gRPC %s: SERVING", target)
}

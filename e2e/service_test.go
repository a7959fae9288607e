package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/peer"

	"beacon.dev/beacon/beacongrpc"
	"beacon.dev/beacon/beaconhttp"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/discovery"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/policy"
	"beacon.dev/beacon/server/servertest"
)

// echoProc is a real echo service process run by lifecycle.Run.
type echoProc struct {
	*proc
	grpcAddr, httpAddr string
}

func startEcho(t *testing.T, registryAddr string, args ...string) *echoProc {
	t.Helper()
	p := startBin(t, echoBin, append([]string{"--registry", registryAddr}, args...)...)
	line := p.waitLine(30*time.Second, "echo: serving ")
	var addrs map[string]string
	if err := json.Unmarshal([]byte(line[strings.Index(line, "{"):]), &addrs); err != nil {
		t.Fatalf("echo printed %q: %v", line, err)
	}
	p.waitLine(30*time.Second, "lifecycle: registered")
	return &echoProc{proc: p, grpcAddr: addrs["grpc"], httpAddr: addrs["http"]}
}

// stopReport is what the echo service prints once stopped.
type stopReport struct {
	StoppingMS   float64 `json:"stopping_ms"`
	AckWaitMS    float64 `json:"ack_wait_ms"`
	Watchers     int     `json:"watchers"`
	Acknowledged int     `json:"acknowledged"`
	Unreachable  int     `json:"unreachable"`
	Clean        bool    `json:"clean"`
	DrainErr     string  `json:"drain_err"`
}

// terminate sends SIGTERM, expects exit code 0 and returns the report.
func (e *echoProc) terminate(t *testing.T) stopReport {
	t.Helper()
	e.signal(syscall.SIGTERM)
	if code := e.wait(30 * time.Second); code != 0 {
		t.Fatalf("echo exited with %d after SIGTERM; output:\n%s", code, e.output())
	}
	return e.stopReport(t)
}

// stopReport reads the report the echo service printed when it stopped.
func (e *echoProc) stopReport(t *testing.T) stopReport {
	t.Helper()
	line := e.waitLine(30*time.Second, "echo: stopped ")
	var r stopReport
	if err := json.Unmarshal([]byte(line[strings.Index(line, "{"):]), &r); err != nil {
		t.Fatalf("echo printed %q: %v", line, err)
	}
	return r
}

// caller is the beacon client side under test: discovery cache, resolver,
// P2C with outlier detection, retries with a budget, optional hedging.
type caller struct {
	cache *discovery.Cache
	grpc  testpb.TestServiceClient
	http  *http.Client
	// attempts records every gRPC attempt (below the retries and hedges).
	mu       sync.Mutex
	attempts []attempt // guarded by mu
}

type attempt struct {
	start, end time.Time
	addr       string
	err        error
}

// maxAttempts is the callers' retry policy: attempts per call.
const maxAttempts = 3

type callerConfig struct {
	lb      string        // gRPC LB policy (default beacon_p2c)
	perTry  time.Duration // 0: none
	hedge   time.Duration // 0: no hedging
	outlier string        // JSON for the policy's "outlier" field
}

func newCaller(ctx context.Context, t *testing.T, registryAddr, service string, cfg callerConfig) *caller {
	t.Helper()
	c := newClient(t, registryAddr)
	cache, err := discovery.New(discovery.FromClient(c, ""), discovery.Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cache.Close)
	budget, err := policy.NewBudget(policy.BudgetConfig{MinPerSecond: 50})
	if err != nil {
		t.Fatal(err)
	}
	opts := []policy.Option{policy.WithRetry(policy.RetryConfig{
		MaxAttempts: maxAttempts, BaseBackoff: 5 * time.Millisecond, MaxBackoff: 50 * time.Millisecond, Jitter: 0.2,
		RetryOn: beacongrpc.RetryableCode, Budget: budget,
	})}
	if cfg.perTry > 0 {
		opts = append(opts, policy.WithPerTryTimeout(cfg.perTry))
	}
	exec, err := policy.New(opts...)
	if err != nil {
		t.Fatal(err)
	}
	var icOpts []beacongrpc.InterceptorOption
	if cfg.hedge > 0 {
		h, err := policy.NewHedger(policy.HedgeConfig{Delay: cfg.hedge, Budget: budget, RetryOn: beacongrpc.RetryableCode})
		if err != nil {
			t.Fatal(err)
		}
		icOpts = append(icOpts, beacongrpc.WithHedging(h))
	}
	if cfg.lb == "" {
		cfg.lb = beacongrpc.PolicyP2C
	}
	outlierJSON := cfg.outlier
	if outlierJSON == "" {
		outlierJSON = "{}"
	}
	cl := &caller{cache: cache}
	record := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		var p peer.Peer
		a := attempt{start: time.Now()}
		err := invoker(ctx, method, req, reply, cc, append(opts, grpc.Peer(&p))...)
		a.end, a.err = time.Now(), err
		if p.Addr != nil {
			a.addr = p.Addr.String()
		}
		cl.mu.Lock()
		cl.attempts = append(cl.attempts, a)
		cl.mu.Unlock()
		return err
	}
	cc, err := beacongrpc.NewClient(cache, service, beacongrpc.WithDialOptions(
		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig": [{"`+cfg.lb+`": {"outlier": `+outlierJSON+`}}]}`),
		grpc.WithChainUnaryInterceptor(
			beacongrpc.UnaryClientInterceptor(exec, func(string) bool { return true }, icOpts...),
			record)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	cl.grpc = testpb.NewTestServiceClient(cc)
	tr, err := beaconhttp.NewTransport(cache, beaconhttp.WithServiceSuffix(".svc"), beaconhttp.WithRetry(policy.RetryConfig{
		MaxAttempts: maxAttempts, BaseBackoff: 5 * time.Millisecond, MaxBackoff: 50 * time.Millisecond, Budget: budget,
	}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tr.Close)
	cl.http = &http.Client{Transport: tr, Timeout: 10 * time.Second}
	return cl
}

// callGRPC makes one call and returns the instance that answered.
func (c *caller) callGRPC(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	resp, err := c.grpc.UnaryCall(ctx, &testpb.SimpleRequest{})
	if err != nil {
		return "", err
	}
	return resp.GetServerId(), nil
}

func (c *caller) callHTTP(service string) func(ctx context.Context) (string, error) {
	return func(ctx context.Context) (string, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+service+".svc/echo", nil)
		if err != nil {
			return "", err
		}
		resp, err := c.http.Do(req)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			return "", err
		}
		if resp.StatusCode != http.StatusOK {
			return "", fmt.Errorf("status %d: %s", resp.StatusCode, b)
		}
		return string(b), nil
	}
}

// reachAll calls until every one of ids has answered.
func reachAll(ctx context.Context, t *testing.T, call func(context.Context) (string, error), ids ...string) {
	t.Helper()
	seen := map[string]bool{}
	testutil.Eventually(t, 30*time.Second, fmt.Sprintf("calls reach %v", ids), func() bool {
		if id, err := call(ctx); err == nil {
			seen[id] = true
		}
		for _, id := range ids {
			if !seen[id] {
				return false
			}
		}
		return true
	})
}

// load runs callers in a loop until stopped, each pausing between calls.
type load struct {
	stop    context.CancelFunc
	wg      sync.WaitGroup
	calls   atomic.Int64
	mu      sync.Mutex
	lat     []time.Duration // guarded by mu
	errs    []error         // guarded by mu; every failure
	servers map[string]int  // guarded by mu
}

func startLoad(ctx context.Context, callers int, pause time.Duration, call func(context.Context) (string, error)) *load {
	ctx, stop := context.WithCancel(ctx)
	l := &load{stop: stop, servers: map[string]int{}}
	for range callers {
		l.wg.Go(func() {
			for ctx.Err() == nil {
				start := time.Now()
				id, err := call(context.WithoutCancel(ctx)) // a call in flight finishes
				d := time.Since(start)
				l.calls.Add(1)
				l.mu.Lock()
				l.lat = append(l.lat, d)
				if err != nil {
					l.errs = append(l.errs, err)
				} else {
					l.servers[id]++
				}
				l.mu.Unlock()
				select {
				case <-ctx.Done():
				case <-time.After(pause):
				}
			}
		})
	}
	return l
}

// finish stops the load and returns calls, failures and the p50/p99/max.
func (l *load) finish() (calls, failed int, p50, p99, worst time.Duration) {
	l.stop()
	l.wg.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	slices.Sort(l.lat)
	q := func(f float64) time.Duration { return l.lat[min(len(l.lat)-1, int(f*float64(len(l.lat))))] }
	return len(l.lat), len(l.errs), q(0.50), q(0.99), l.lat[len(l.lat)-1]
}

func (l *load) failures() []error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.errs)
}

func (l *load) waitCalls(t *testing.T, n int64) {
	t.Helper()
	target := l.calls.Load() + n
	testutil.Eventually(t, 30*time.Second, fmt.Sprintf("%d more calls", n), func() bool { return l.calls.Load() >= target })
}

func checkNoFailures(t *testing.T, l *load, what string) {
	t.Helper()
	calls, failed, p50, p99, worst := l.finish()
	t.Logf("%s: %d calls, %d failed, p50 %v, p99 %v, max %v, per instance %v", what, calls, failed, p50, p99, worst, l.servers)
	if failed > 0 {
		errs := l.failures()
		t.Errorf("%s: %d of %d calls failed; first: %v", what, failed, calls, errs[0])
	}
	if calls < 200 {
		t.Errorf("%s: only %d calls: the load did not run", what, calls)
	}
}

// Behaviour 1: a rolling restart of all three instances under continuous
// load fails no request — gRPC, and HTTP.
func TestRollingRestartFailsNoRequest(t *testing.T) {
	for _, proto := range []string{"grpc", "http"} {
		t.Run(proto, func(t *testing.T) {
			srv := servertest.Start(t, servertest.Config(t, ""))
			ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
			defer cancel()
			args := []string{"--service", "echo"}
			if proto == "http" {
				args = []string{"--service", "echo", "--grpc", "", "--http", "127.0.0.1:0"}
			}
			var fleet []*echoProc
			var ids []string
			for range 3 {
				e := startEcho(t, srv.Addr(), args...)
				fleet = append(fleet, e)
				ids = append(ids, idOf(e))
			}
			cl := newCaller(ctx, t, srv.Addr(), "echo", callerConfig{})
			call := cl.callGRPC
			if proto == "http" {
				call = cl.callHTTP("echo")
			}
			reachAll(ctx, t, call, ids...)
			l := startLoad(ctx, 4, 2*time.Millisecond, call)
			l.waitCalls(t, 100)
			for i, old := range fleet {
				fresh := startEcho(t, srv.Addr(), args...) // surge first, as a deployment does
				l.waitCalls(t, 200)
				rep := old.terminate(t)
				t.Logf("instance %d: stopped in %.0f ms, drain waited %.1f ms for %d/%d watchers", i, rep.StoppingMS, rep.AckWaitMS, rep.Acknowledged, rep.Watchers)
				if !rep.Clean || rep.Watchers < 1 || rep.Acknowledged != rep.Watchers || rep.DrainErr != "<nil>" {
					t.Errorf("instance %d's drain: %+v; want clean, every watcher acknowledged", i, rep)
				}
				fleet[i] = fresh
				l.waitCalls(t, 200)
			}
			checkNoFailures(t, l, "rolling restart")
			l.mu.Lock()
			defer l.mu.Unlock()
			for _, e := range fleet {
				if l.servers[idOf(e)] == 0 {
					t.Errorf("the new instance %s got no calls", idOf(e))
				}
			}
		})
	}
}

func idOf(e *echoProc) string {
	if e.grpcAddr != "" {
		return e.grpcAddr
	}
	return e.httpAddr
}

// Behaviour 2: SIGKILL of one of three instances under load, idempotent
// calls with retries: no call fails, and the dead endpoint stops being
// picked as soon as its first connection failure is seen.
func TestKilledInstanceFailsNoRequest(t *testing.T) {
	srv := servertest.Start(t, servertest.Config(t, ""))
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	var fleet []*echoProc
	for range 3 {
		fleet = append(fleet, startEcho(t, srv.Addr(), "--service", "echo", "--ttl", "10s"))
	}
	cl := newCaller(ctx, t, srv.Addr(), "echo", callerConfig{})
	reachAll(ctx, t, cl.callGRPC, idOf(fleet[0]), idOf(fleet[1]), idOf(fleet[2]))
	const callers = 4
	l := startLoad(ctx, callers, 2*time.Millisecond, cl.callGRPC)
	l.waitCalls(t, 200)
	victim := fleet[0]
	killed := time.Now()
	victim.signal(syscall.SIGKILL)
	victim.wait(30 * time.Second)
	l.waitCalls(t, 600)
	checkNoFailures(t, l, "SIGKILL 1 of 3")

	// After the first failed attempt on the dead endpoint, attempts may
	// still go there only while gRPC's picker has not yet seen the
	// connection close: a handful at most — no more than every caller's
	// every attempt of one call — not a stream of them.
	cl.mu.Lock()
	defer cl.mu.Unlock()
	var firstFail, lastStart time.Time
	failedAttempts := 0
	for _, a := range cl.attempts {
		if a.addr != victim.grpcAddr || a.start.Before(killed) && a.end.Before(killed) {
			continue
		}
		if a.err != nil {
			failedAttempts++
			if firstFail.IsZero() || a.end.Before(firstFail) {
				firstFail = a.end
			}
		}
		lastStart = maxTime(lastStart, a.start)
	}
	var after int
	for _, a := range cl.attempts {
		if a.addr == victim.grpcAddr && !firstFail.IsZero() && a.start.After(firstFail) {
			after++
		}
	}
	t.Logf("after the kill: %d failed attempts on the dead endpoint (all retried); %d started after the first failure; last attempt there started %v after the first failure",
		failedAttempts, after, lastStart.Sub(firstFail))
	if limit := callers * maxAttempts; after > limit {
		t.Errorf("%d attempts went to the dead endpoint after its first failure, want at most %d (%d callers × %d attempts)", after, limit, callers, maxAttempts)
	}
}

func maxTime(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// Behaviour 3: SIGSTOP of one of three instances (a hang). Per-try
// timeout, hedging and outlier detection keep every call succeeding; after
// SIGCONT the instance gets calls again. Under round robin the hung
// instance keeps being offered calls, loses them to hedges and is ejected,
// then re-admitted. P2C stops sending it calls after one or two lost
// attempts — before outlier detection has seen enough to eject. Either
// way the hung instance gets a small share of the attempts made while it
// hangs (an even spread would give it a third). The hang lasts a number
// of calls, not a time; latencies are logged (make chaos's hang scenario
// measures them).
func TestHungInstanceIsAvoidedAndReadmitted(t *testing.T) {
	for _, lb := range []string{beacongrpc.PolicyRoundRobin, beacongrpc.PolicyP2C} {
		t.Run(lb, func(t *testing.T) { testHungInstance(t, lb) })
	}
}

func testHungInstance(t *testing.T, lb string) {
	srv := servertest.Start(t, servertest.Config(t, ""))
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var fleet []*echoProc
	for range 3 {
		// TTL above the hang: the registry keeps the instance, so the
		// client has to cope by itself.
		fleet = append(fleet, startEcho(t, srv.Addr(), "--service", "echo", "--ttl", "10m"))
	}
	// A hang is forever: the per-try timeout is generous (a loaded machine
	// does not time out a live instance), the hedge is what routes around
	// the hung one.
	const perTry, hedge = 2 * time.Second, 200 * time.Millisecond
	cl := newCaller(ctx, t, srv.Addr(), "echo", callerConfig{
		lb: lb, perTry: perTry, hedge: hedge,
		outlier: `{"interval": "500ms", "consecutiveFailures": 3, "baseEjection": "2s", "maxEjection": "4s"}`,
	})
	reachAll(ctx, t, cl.callGRPC, idOf(fleet[0]), idOf(fleet[1]), idOf(fleet[2]))
	l := startLoad(ctx, 4, 2*time.Millisecond, cl.callGRPC)
	l.waitCalls(t, 200)
	hung := fleet[0]
	base := beacongrpc.Outliers()["echo"]
	hung.signal(syscall.SIGSTOP)
	stopped := time.Now()
	if lb == beacongrpc.PolicyRoundRobin {
		testutil.Eventually(t, 60*time.Second, "the hung instance is ejected", func() bool {
			return beacongrpc.Outliers()["echo"].Ejections > base.Ejections
		})
	}
	for range 3 { // the hang: 3,000 calls, through ejections and re-admissions
		l.waitCalls(t, 1000)
	}
	l.mu.Lock()
	answeredBefore := l.servers[idOf(hung)]
	l.mu.Unlock()
	hung.signal(syscall.SIGCONT)
	resumed := time.Now()
	testutil.Eventually(t, 60*time.Second, "the resumed instance answers calls again", func() bool {
		l.mu.Lock()
		defer l.mu.Unlock()
		return l.servers[idOf(hung)] > answeredBefore
	})
	back := time.Since(resumed)
	calls, failed, p50, p99, worst := l.finish()
	// The attempts started while the instance hung (the load has stopped:
	// every one has ended and is recorded).
	cl.mu.Lock()
	var during, all int
	for _, a := range cl.attempts {
		if a.start.Before(stopped) || !a.start.Before(resumed) {
			continue
		}
		all++
		if a.addr == hung.grpcAddr {
			during++
		}
	}
	cl.mu.Unlock()
	share := float64(during) / float64(max(all, 1))
	t.Logf("%s, hang of %v: %d calls, %d failed, p50 %v, p99 %v, max %v; %d of %d attempts (%.1f %%) during the hang went to the hung instance; outliers %+v; calls answered by it again %v after SIGCONT",
		lb, resumed.Sub(stopped).Round(time.Millisecond), calls, failed, p50, p99, worst, during, all, 100*share, beacongrpc.Outliers()["echo"], back.Round(time.Millisecond))
	if failed > 0 {
		t.Errorf("%d calls failed; first: %v", failed, l.failures()[0])
	}
	if share >= 0.1 {
		t.Errorf("%d of %d attempts (%.1f %%) went to the hung instance while it hung, want under 10 %% (even would be 33 %%): ejection or P2C should have stopped them",
			during, all, 100*share)
	}
}

// Behaviour 4: grpc-health-probe sees SERVING while the instance runs and
// NOT_SERVING (or no server) once it drains. The test holds each phase
// open itself — readiness waits for a file it creates, the drain for a
// watcher it closes — so that no probe races a timer.
func TestHealthProbeFollowsTheLifecycle(t *testing.T) {
	srv := servertest.Start(t, servertest.Config(t, ""))
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	probe := func(addr string) (string, int) {
		out, err := execOutput(ctx, probeBin, "-addr", addr, "-connect-timeout", "10s", "-rpc-timeout", "10s")
		code := 0
		if err != nil {
			code = exitCode(err)
		}
		return strings.TrimSpace(out), code
	}
	// Not ready until the file exists: the probe says NOT_SERVING meanwhile.
	readyFile := filepath.Join(t.TempDir(), "ready")
	p := startBin(t, echoBin, "--registry", srv.Addr(), "--service", "echo", "--ready-file", readyFile,
		"--grpc", "127.0.0.1:0", "--ack-timeout", "60s")
	line := p.waitLine(30*time.Second, "lifecycle: state")
	if !strings.Contains(line, "STARTING") {
		t.Fatalf("first state line %q, want STARTING", line)
	}
	addr := listenAddr(t, p)
	out, code := probe(addr)
	t.Logf("while starting: %q (exit %d)", out, code)
	if code != 4 || !strings.Contains(out, "NOT_SERVING") {
		t.Errorf("probe while starting: %q, exit %d; want NOT_SERVING, exit 4", out, code)
	}
	if err := os.WriteFile(readyFile, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	p.waitLine(30*time.Second, "lifecycle: registered")
	out, code = probe(addr)
	if code != 0 || !strings.Contains(out, "SERVING") {
		t.Errorf("probe while serving: %q, exit %d; want SERVING, exit 0", out, code)
	}
	// A watcher that never applies changes holds the drain (for up to the
	// 60 s ack timeout), so the probe can look at a draining instance;
	// closing it lets the drain finish.
	c := newClient(t, srv.Addr())
	w, err := c.Watch(ctx, []string{"echo"})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	<-w.Synced()
	w.Next(ctx) // takes the first batch, then never returns for more
	p.signal(syscall.SIGTERM)
	p.waitLine(30*time.Second, "state=DRAINING")
	out, code = probe(addr)
	if code != 4 || !strings.Contains(out, "NOT_SERVING") {
		t.Errorf("probe while draining: %q, exit %d; want NOT_SERVING, exit 4", out, code)
	}
	w.Close()
	if code := p.wait(90 * time.Second); code != 0 {
		t.Fatalf("exit code %d after SIGTERM", code)
	}
	out, code = probe(addr)
	if code != 2 {
		t.Errorf("probe after exit: %q, exit %d; want a failed connection, exit 2", out, code)
	}
}

// listenAddr reads the gRPC address the echo service prints at start.
func listenAddr(t *testing.T, p *proc) string {
	t.Helper()
	line := p.waitLine(30*time.Second, "echo: listening ")
	var addrs map[string]string
	if err := json.Unmarshal([]byte(line[strings.Index(line, "{"):]), &addrs); err != nil {
		t.Fatalf("echo printed %q: %v", line, err)
	}
	return addrs["grpc"]
}

func execOutput(ctx context.Context, bin string, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	return string(out), err
}

func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	return -1
}

// Behaviour 5: with the registry unreachable for the whole test after the
// clients warmed up, calls keep succeeding — past the point where the
// registry has given the services up (their sessions expired: a client
// straight to the server sees them gone, or held as suspects by the
// mass-expiry guard), which no client behind the outage can hear.
func TestRegistryDownCallsKeepSucceeding(t *testing.T) {
	srv := servertest.Start(t, servertest.Config(t, ""))
	proxy := testutil.NewProxy(t, srv.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var ids []string
	for range 3 {
		e := startEcho(t, proxy.Addr(), "--service", "echo", "--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0")
		ids = append(ids, idOf(e))
	}
	cl := newCaller(ctx, t, proxy.Addr(), "echo", callerConfig{})
	reachAll(ctx, t, cl.callGRPC, ids...)
	httpCall := cl.callHTTP("echo-http")
	reachAll(ctx, t, httpCall, ids...)
	direct := newClient(t, srv.Addr())
	proxy.SetDown(true) // clients and services lose the registry for good
	lg := startLoad(ctx, 2, 5*time.Millisecond, cl.callGRPC)
	lh := startLoad(ctx, 2, 5*time.Millisecond, httpCall)
	// The services' sessions expire on the server (they cannot renew
	// them through the proxy).
	testutil.Eventually(t, 60*time.Second, "the server has given up the services' sessions", func() bool {
		for _, svc := range []string{"echo", "echo-http"} {
			snap, err := direct.Instances(ctx, svc, client.All())
			if err != nil {
				t.Fatal(err)
			}
			for _, in := range snap.Instances {
				if !in.Suspect {
					return false
				}
			}
		}
		return true
	})
	// And calls go on succeeding after that.
	lg.waitCalls(t, 200)
	lh.waitCalls(t, 200)
	checkNoFailures(t, lg, "gRPC, registry down")
	checkNoFailures(t, lh, "HTTP, registry down")
	if st := cl.cache.Status(); st.Connected {
		t.Errorf("discovery status %+v: connected to a registry that is down", st)
	}
}

package bench

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
)

// The edge-proxy benchmark: wrk (Debian) drives beacon proxy, nginx 1.22
// and HAProxy 2.6 in turn, each proxying to the same three backends (the
// echo service as child processes, registered with a beacon server, on
// fixed ports the anchors' configs name). Everything runs on this
// machine's loopback, each load run bounded by wrk's -d.

// proxyTarget is one proxy under test.
type proxyTarget struct {
	name string
	url  string // http://addr
	cmd  *exec.Cmd
}

// cpuSeconds is the user+system CPU time of the proxy's process and its
// children (nginx's workers).
func (t *proxyTarget) cpuSeconds(tb testing.TB) float64 {
	return processTreeCPU(tb, t.cmd.Process.Pid)
}

// proxyRig is the backends and the three proxies in front of them.
type proxyRig struct {
	tb       testing.TB
	dir      string
	registry string // beacon server
	echoBin  string
	backends []*rigBackend
	targets  []*proxyTarget
	hc       *http.Client
}

type rigBackend struct {
	addr string
	id   string
	gen  int
	p    *echoProcess
}

// anchors are the commands the rig needs beside Go.
var anchors = []string{"wrk", "nginx", "haproxy"}

func missingAnchors() []string {
	var miss []string
	for _, c := range anchors {
		if _, err := exec.LookPath(c); err != nil {
			miss = append(miss, c)
		}
	}
	return miss
}

// newProxyRig starts the server, three backends and beacon proxy, and
// nginx and HAProxy when withAnchors.
func newProxyRig(tb testing.TB, beaconBin string, withAnchors bool) *proxyRig {
	tb.Helper()
	if miss := missingAnchors(); withAnchors && len(miss) > 0 {
		if os.Getenv("BEACON_REQUIRE_PROXY_ANCHORS") != "" {
			tb.Fatalf("%v not installed (apt-get install nginx haproxy wrk)", miss)
		}
		tb.Skipf("%v not installed (apt-get install nginx haproxy wrk)", miss)
	}
	r := &proxyRig{tb: tb, dir: tb.TempDir(), hc: &http.Client{Timeout: 5 * time.Second}}
	tb.Cleanup(r.hc.CloseIdleConnections)
	r.echoBin = filepath.Join(r.dir, "echo")
	if out, err := exec.Command("go", "build", "-o", r.echoBin, "beacon.dev/beacon/internal/cmd/echo").CombinedOutput(); err != nil {
		tb.Fatalf("go build echo: %v\n%s", err, out)
	}
	srv := startServerProcessFrom(tb, beaconBin)
	r.registry = srv.addr
	for i := range 3 {
		be := &rigBackend{addr: testutil.FreeAddr(tb)}
		r.backends = append(r.backends, be)
		r.startBackend(i)
	}
	r.targets = []*proxyTarget{r.startBeaconProxy(beaconBin, false)}
	if withAnchors {
		r.targets = append(r.targets, r.startBeaconProxy(beaconBin, true), r.startNginx(), r.startHAProxy(), r.startGoProxy())
	}
	for _, t := range r.targets {
		r.waitAllBackends(t)
	}
	return r
}

// startBackend (re)starts backend i; a restart takes a new instance id
// (the dead one's session may not have expired yet).
func (r *proxyRig) startBackend(i int) {
	be := r.backends[i]
	be.gen++
	be.id = fmt.Sprintf("b%d.%d", i, be.gen)
	be.p = startEchoProcess(r.tb, r.echoBin, r.registry, "--service", "web", "--grpc", "", "--http", be.addr, "--id", be.id)
}

// kill SIGKILLs backend i and waits for it to be gone.
func (r *proxyRig) kill(i int) {
	p := r.backends[i].p
	p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.exited
}

// waitAllBackends waits until t has answered from every live backend.
func (r *proxyRig) waitAllBackends(t *proxyTarget) {
	r.tb.Helper()
	want := map[string]bool{}
	for _, be := range r.backends {
		want[be.id] = true
	}
	seen := map[string]bool{}
	testutil.Eventually(r.tb, 60*time.Second, t.name+" answering from every backend", func() bool {
		resp, err := r.hc.Get(t.url + "/echo")
		if err != nil {
			return false
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK && want[string(body)] {
			seen[string(body)] = true
		}
		return len(seen) == len(want)
	})
}

// startDaemon runs a proxy in the foreground until the benchmark ends.
func (r *proxyRig) startDaemon(name, url string, bin string, args ...string) *proxyTarget {
	r.tb.Helper()
	cmd := exec.Command(bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	logf, err := os.Create(filepath.Join(r.dir, name+".log"))
	if err != nil {
		r.tb.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		r.tb.Fatalf("%s: %v", name, err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); logf.Close(); close(exited) }() // ends with the process
	r.tb.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			cmd.Process.Signal(syscall.SIGKILL)
			<-exited
		}
		if name == "nginx" { // workers outlive a killed master only briefly; make sure
			exec.Command("pkill", "-KILL", "-f", "nginx: worker process.*").Run()
		}
	})
	return &proxyTarget{name: name, url: url, cmd: cmd}
}

func (r *proxyRig) write(name, body string) string {
	r.tb.Helper()
	path := filepath.Join(r.dir, name)
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		r.tb.Fatal(err)
	}
	return path
}

// startBeaconProxy: one route to the service; the defaults otherwise
// (3 attempts for idempotent requests, outlier ejection after 5
// consecutive failures, P2C). netHTTP: the listener serves through Go's
// net/http instead of the HTTP/1.1 fast path (the path before it).
func (r *proxyRig) startBeaconProxy(bin string, netHTTP bool) *proxyTarget {
	addr := testutil.FreeAddr(r.tb)
	name := "beacon-proxy"
	if netHTTP {
		name += "-nethttp"
	}
	cfg := r.write(name+".yaml", fmt.Sprintf(`registry:
  servers: [%q]
listeners: [{name: edge, addr: %q, netHTTP: %v}]
routes: [{name: web, service: web}]
`, r.registry, addr, netHTTP))
	return r.startDaemon(name, "http://"+addr, bin, "proxy", "--config", cfg, "--reload-interval", "0")
}

// startNginx: the upstream with keepalive connections and passive health
// (max_fails=1 fail_timeout=10s); proxy_next_upstream keeps its default
// (error timeout: an idempotent request is passed to the next server when
// the connection fails or no header came).
func (r *proxyRig) startNginx() *proxyTarget {
	addr := testutil.FreeAddr(r.tb)
	var servers strings.Builder
	for _, be := range r.backends {
		fmt.Fprintf(&servers, "    server %s max_fails=1 fail_timeout=10s;\n", be.addr)
	}
	d := r.dir
	cfg := r.write("nginx.conf", fmt.Sprintf(`daemon off;
master_process on;
worker_processes 2;
pid %[1]s/nginx.pid;
error_log %[1]s/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path %[1]s/body;
  proxy_temp_path %[1]s/proxy;
  fastcgi_temp_path %[1]s/fastcgi;
  uwsgi_temp_path %[1]s/uwsgi;
  scgi_temp_path %[1]s/scgi;
  upstream web {
%[2]s    keepalive 64;
  }
  server {
    listen %[3]s;
    location / {
      proxy_pass http://web;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
`, d, servers.String(), addr))
	return r.startDaemon("nginx", "http://"+addr, "nginx", "-p", d, "-c", cfg, "-e", filepath.Join(d, "nginx-error.log"))
}

// startHAProxy: round robin with connection reuse, layer-7 passive health
// (observe layer7, marked down on the first error, active checks every
// second to bring a server back) and retries with redispatch on
// connection failures and empty responses.
func (r *proxyRig) startHAProxy() *proxyTarget {
	addr := testutil.FreeAddr(r.tb)
	var servers strings.Builder
	for i, be := range r.backends {
		fmt.Fprintf(&servers, "  server s%d %s check inter 1s observe layer7 error-limit 1 on-error mark-down\n", i, be.addr)
	}
	cfg := r.write("haproxy.cfg", fmt.Sprintf(`global
  maxconn 8192
  nbthread 2
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  retries 3
  option redispatch 1
  retry-on conn-failure empty-response response-timeout
frontend edge
  bind %s
  default_backend web
backend web
  balance roundrobin
  http-reuse always
  option httpchk GET /readyz
%s`, addr, servers.String()))
	return r.startDaemon("haproxy", "http://"+addr, "haproxy", "-f", cfg, "-db")
}

// startGoProxy: the Go floor (bench/internal/cmd/goproxy), a bare
// httputil.ReverseProxy round-robining over the same backends.
func (r *proxyRig) startGoProxy() *proxyTarget {
	bin := filepath.Join(r.dir, "goproxy")
	if out, err := exec.Command("go", "build", "-o", bin, "beacon.dev/beacon/bench/internal/cmd/goproxy").CombinedOutput(); err != nil {
		r.tb.Fatalf("go build goproxy: %v\n%s", err, out)
	}
	addr := testutil.FreeAddr(r.tb)
	var hosts []string
	for _, be := range r.backends {
		hosts = append(hosts, be.addr)
	}
	return r.startDaemon("go-reverseproxy", "http://"+addr, bin, "-addr", addr, "-backends", strings.Join(hosts, ","))
}

// wrkResult is one wrk run.
type wrkResult struct {
	requests  float64 // completed
	perSecond float64
	p50, p99  float64 // ms
	errors    float64 // socket errors (connect, read, write, timeout) + non-2xx/3xx
	cpu       float64 // the proxy's CPU seconds during the run
}

// runWrk drives t with conns connections for d; during, if set, runs
// while the load does (the chaos row's kill).
func (r *proxyRig) runWrk(t *proxyTarget, conns int, d time.Duration, during func()) wrkResult {
	r.tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d+30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "wrk", "-t", "2", "-c", strconv.Itoa(conns), "-d", fmt.Sprintf("%ds", int(d.Seconds())), "--latency", t.url+"/echo")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		r.tb.Fatal(err)
	}
	cpu0 := t.cpuSeconds(r.tb)
	if err := cmd.Start(); err != nil {
		r.tb.Fatal(err)
	}
	if during != nil {
		during()
	}
	text, _ := io.ReadAll(out)
	if err := cmd.Wait(); err != nil {
		r.tb.Fatalf("wrk against %s: %v\n%s", t.name, err, text)
	}
	res, err := parseWrk(string(text))
	if err != nil {
		r.tb.Fatalf("wrk against %s: %v\n%s", t.name, err, text)
	}
	res.cpu = t.cpuSeconds(r.tb) - cpu0
	return res
}

var (
	wrkRequests = regexp.MustCompile(`(\d+) requests in`)
	wrkRate     = regexp.MustCompile(`Requests/sec:\s+([\d.]+)`)
	wrkLatency  = regexp.MustCompile(`(?m)^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$`)
	wrkSocket   = regexp.MustCompile(`Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)`)
	wrkNon2xx   = regexp.MustCompile(`Non-2xx or 3xx responses: (\d+)`)
)

func parseWrk(out string) (wrkResult, error) {
	var res wrkResult
	m := wrkRequests.FindStringSubmatch(out)
	n := wrkRate.FindStringSubmatch(out)
	if m == nil || n == nil {
		return res, fmt.Errorf("no request count or rate in wrk's output")
	}
	res.requests, _ = strconv.ParseFloat(m[1], 64)
	res.perSecond, _ = strconv.ParseFloat(n[1], 64)
	for _, l := range wrkLatency.FindAllStringSubmatch(out, -1) {
		v, _ := strconv.ParseFloat(l[2], 64)
		switch l[3] {
		case "us":
			v /= 1000
		case "s":
			v *= 1000
		}
		if l[1] == "50" {
			res.p50 = v
		} else {
			res.p99 = v
		}
	}
	if res.p99 == 0 {
		return res, fmt.Errorf("no latency distribution in wrk's output")
	}
	if s := wrkSocket.FindStringSubmatch(out); s != nil {
		for _, f := range s[1:] {
			v, _ := strconv.ParseFloat(f, 64)
			res.errors += v
		}
	}
	if s := wrkNon2xx.FindStringSubmatch(out); s != nil {
		v, _ := strconv.ParseFloat(s[1], 64)
		res.errors += v
	}
	return res, nil
}

// processTreeCPU sums user+system CPU seconds of pid and its children.
func processTreeCPU(tb testing.TB, pid int) float64 {
	total := procCPU(pid)
	entries, err := os.ReadDir("/proc")
	if err != nil {
		tb.Fatal(err)
	}
	for _, e := range entries {
		child, err := strconv.Atoi(e.Name())
		if err != nil || child == pid {
			continue
		}
		if ppid, ok := procField(child, 1); ok && ppid == float64(pid) {
			total += procCPU(child)
		}
	}
	return total
}

func procCPU(pid int) float64 {
	u, _ := procField(pid, 11)
	s, _ := procField(pid, 12)
	return (u + s) / 100 // USER_HZ
}

// procField is field i (0 = state) after the command in /proc/pid/stat.
func procField(pid, i int) (float64, bool) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, false
	}
	s := string(data)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	if i >= len(f) {
		return 0, false
	}
	v, err := strconv.ParseFloat(f[i], 64)
	return v, err == nil
}

// BenchmarkProxy: throughput and latency through beacon proxy beside
// nginx, HAProxy, the Go floor (a bare httputil.ReverseProxy) and beacon
// proxy on net/http (listeners[i].netHTTP, the path before the HTTP/1.1
// fast path) in the same run, wrk with 16 and 100 connections for
// 10 s each (after 2 s of warm-up), the proxies taking turns. Reported:
// requests/s, p50/p99, the proxy's CPU per request, and the ratios to
// nginx (goal: throughput ≥ 0.8×, p99 ≤ 1.2×) and HAProxy.
func BenchmarkProxy(b *testing.B) {
	rig := newProxyRig(b, buildBeacon(b), true)
	for _, conns := range []int{16, 100} {
		b.Run(fmt.Sprintf("conns=%d", conns), func(b *testing.B) {
			res := map[string]wrkResult{}
			for _, t := range rig.targets {
				rig.runWrk(t, conns, 2*time.Second, nil)
				res[t.name] = rig.runWrk(t, conns, 10*time.Second, nil)
			}
			for _, t := range rig.targets {
				r := res[t.name]
				b.ReportMetric(r.perSecond, t.name+"_req/s")
				b.ReportMetric(r.p50, t.name+"_p50_ms")
				b.ReportMetric(r.p99, t.name+"_p99_ms")
				b.ReportMetric(r.cpu/r.requests*1e6, t.name+"_cpu_us/req")
				if r.errors > 0 {
					b.Errorf("%s: %v failed requests without a fault", t.name, r.errors)
				}
			}
			bp, ng, ha, gp, nh := res["beacon-proxy"], res["nginx"], res["haproxy"], res["go-reverseproxy"], res["beacon-proxy-nethttp"]
			b.ReportMetric(bp.perSecond/ng.perSecond, "req/s_vs_nginx")
			b.ReportMetric(bp.p99/ng.p99, "p99_vs_nginx")
			b.ReportMetric(bp.perSecond/ha.perSecond, "req/s_vs_haproxy")
			b.ReportMetric(bp.p99/ha.p99, "p99_vs_haproxy")
			b.ReportMetric(bp.perSecond/gp.perSecond, "req/s_vs_go")
			b.ReportMetric(bp.p99/gp.p99, "p99_vs_go")
			b.ReportMetric(bp.perSecond/nh.perSecond, "req/s_vs_nethttp")
			b.ReportMetric(nh.perSecond/ng.perSecond, "nethttp_req/s_vs_nginx")
		})
	}
}

// BenchmarkProxyChaos: 16 connections for 10 s through each proxy in
// turn; 3 s in, one of the three backends is SIGKILLed (connections reset,
// port refusing). Reported: the requests each proxy failed (socket errors
// and 5xx seen by wrk). The backend is restarted before the next proxy's
// turn, and every proxy must be answering from all three again first.
func BenchmarkProxyChaos(b *testing.B) {
	rig := newProxyRig(b, buildBeacon(b), true)
	for _, t := range rig.targets {
		res := rig.runWrk(t, 16, 10*time.Second, func() {
			time.Sleep(3 * time.Second) // the load runs meanwhile
			rig.kill(0)
		})
		b.ReportMetric(res.errors, t.name+"_failed")
		b.ReportMetric(res.requests, t.name+"_requests")
		rig.startBackend(0)
		for _, t := range rig.targets {
			rig.waitAllBackends(t)
		}
	}
}

// The rig's configurations work: each proxy answers from all three
// backends, wrk's report parses, and a SIGKILLed backend comes back into
// every proxy once restarted (a short run of the benchmarks above).
func TestProxyRigServes(t *testing.T) {
	rig := newProxyRig(t, testutil.BeaconBinary(t), true)
	for _, tg := range rig.targets {
		res := rig.runWrk(tg, 4, time.Second, nil)
		if res.requests == 0 || res.errors != 0 {
			t.Errorf("%s: %v requests, %v errors; want some and none", tg.name, res.requests, res.errors)
		}
	}
	rig.kill(1)
	rig.startBackend(1)
	for _, tg := range rig.targets {
		rig.waitAllBackends(tg)
	}
}

// load sends GETs through t from workers goroutines until stop, counting
// answers by backend id and failures.
type load struct {
	ok, failed atomic.Int64
	mu         sync.Mutex
	by         map[string]int64 // guarded by mu
	firstErr   atomic.Value
	stop       context.CancelFunc
	wg         sync.WaitGroup
}

func (r *proxyRig) startLoad(t *proxyTarget, workers int) *load {
	l := &load{by: map[string]int64{}}
	ctx, cancel := context.WithCancel(context.Background())
	l.stop = cancel
	hc := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: workers}}
	for range workers {
		l.wg.Go(func() { // ends with stop
			for ctx.Err() == nil {
				resp, err := hc.Get(t.url + "/echo")
				if err != nil {
					if ctx.Err() == nil {
						l.failed.Add(1)
						l.firstErr.CompareAndSwap(nil, err.Error())
					}
					continue
				}
				body, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK || err != nil {
					l.failed.Add(1)
					l.firstErr.CompareAndSwap(nil, fmt.Sprintf("%d %s %v", resp.StatusCode, body, err))
					continue
				}
				l.ok.Add(1)
				l.mu.Lock()
				l.by[string(body)]++
				l.mu.Unlock()
			}
		})
	}
	r.tb.Cleanup(func() { l.end(); hc.CloseIdleConnections() })
	return l
}

// served is how many answers id gave.
func (l *load) served(id string) int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.by[id]
}

// end stops the load and waits for its workers.
func (l *load) end() {
	l.stop()
	l.wg.Wait()
}

// A backend process SIGKILLed under load (connections reset mid-request,
// its port refusing, its instance registered until its session's TTL
// runs out) costs beacon proxy no request: GETs are retried elsewhere and
// the dead instance is ejected, then leaves with its session.
func TestProxyBackendSIGKILLedUnderLoad(t *testing.T) {
	rig := newProxyRig(t, testutil.BeaconBinary(t), false)
	bp := rig.targets[0]
	l := rig.startLoad(bp, 8)
	victim := rig.backends[0].id
	testutil.Eventually(t, 30*time.Second, "load reaching "+victim, func() bool { return l.served(victim) > 100 })
	rig.kill(0)
	c := registryClient(t, rig.registry)
	testutil.Eventually(t, 60*time.Second, victim+" leaving the registry with its session", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		snap, err := c.Instances(ctx, "web")
		if err != nil {
			return false
		}
		for _, in := range snap.Instances {
			if in.ID == victim {
				return false
			}
		}
		return true
	})
	after := l.ok.Load()
	testutil.Eventually(t, 30*time.Second, "1000 more answers", func() bool { return l.ok.Load() > after+1000 })
	l.end()
	if n := l.failed.Load(); n != 0 {
		t.Errorf("%d of %d requests failed through beacon proxy after a backend was SIGKILLed, want 0; first: %v", n, n+l.ok.Load(), l.firstErr.Load())
	}
}

// Every backend restarted in turn under load — SIGTERM (the echo service
// drains through lifecycle.Run: DRAINING, the proxy's acknowledgement,
// in-flight requests finished), then a new process — costs no request.
func TestProxyRollingRestart(t *testing.T) {
	rig := newProxyRig(t, testutil.BeaconBinary(t), false)
	bp := rig.targets[0]
	l := rig.startLoad(bp, 8)
	for i := range rig.backends {
		old := rig.backends[i]
		testutil.Eventually(t, 30*time.Second, "load reaching "+old.id, func() bool { return l.served(old.id) > 50 })
		old.p.cmd.Process.Signal(syscall.SIGTERM)
		old.p.await(t, "echo: stopped")
		<-old.p.exited
		rig.startBackend(i)
		fresh := rig.backends[i].id
		testutil.Eventually(t, 60*time.Second, "load reaching the new "+fresh, func() bool { return l.served(fresh) > 50 })
	}
	l.end()
	if n := l.failed.Load(); n != 0 {
		t.Errorf("%d of %d requests failed through a rolling restart, want 0; first: %v", n, n+l.ok.Load(), l.firstErr.Load())
	}
	t.Logf("%d requests through a rolling restart of 3 backends, none failed", l.ok.Load())
}

// registryClient is a beacon client closed when the test ends.
func registryClient(tb testing.TB, addr string) *client.Client {
	tb.Helper()
	c, err := client.New([]string{addr})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close() })
	return c
}

package server_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/internal/testutil"
)

// TestPrometheusHTTPSD runs Debian's prometheus (2.42) against the
// server's /v1/sd/prometheus with an ACL token: it discovers the
// instances the token may read, with their __meta_beacon_* labels,
// scrapes them (at the metadata's metrics port where one is given), and
// drops an instance once it is deregistered.
func TestPrometheusHTTPSD(t *testing.T) {
	bin := prometheusBinary(t)
	srv, _, mgmt := aclServer(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	mustPolicy(t, srv, mgmt, "read-web", "read service default/web")
	token := mustToken(t, srv, mgmt, &beaconv1.AclToken{Policies: []string{"read-web"}})

	// Two processes with metrics: web-1 serves them on its own port,
	// web-2 on the port its metrics_port metadata names. db is not the
	// token's to read: Prometheus must never see it.
	metrics := func(name string) *httptest.Server {
		s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path != "/metrics" {
				http.NotFound(w, r)
				return
			}
			w.Header().Set("Content-Type", "text/plain; version=0.0.4")
			fmt.Fprintf(w, "# TYPE sd_test_info gauge\nsd_test_info{process=%q} 1\n", name)
		}))
		t.Cleanup(s.Close)
		return s
	}
	portOf := func(s *httptest.Server) int32 {
		_, p, _ := net.SplitHostPort(s.Listener.Addr().String())
		n, _ := strconv.Atoi(p)
		return int32(n)
	}
	m1, m2, m3 := metrics("web-1"), metrics("web-2"), metrics("db-1")
	unused, _ := strconv.Atoi(mustPort(t, testutil.FreeAddr(t))) // web-2's service port: nothing listens there
	rc := regClient(srv, mgmt, connect.WithGRPC())
	for _, in := range []*beaconv1.Instance{
		{Service: "web", Id: "web-1", Address: "127.0.0.1", Port: portOf(m1), Zone: "z1", Version: "1.0.0", Tags: []string{"blue"}},
		{Service: "web", Id: "web-2", Address: "127.0.0.1", Port: int32(unused), Zone: "z2", Metadata: map[string]string{"metrics_port": strconv.Itoa(int(portOf(m2)))}},
		{Service: "db", Id: "db-1", Address: "127.0.0.1", Port: portOf(m3)},
	} {
		if _, err := rc.Register(ctx, connect.NewRequest(&beaconv1.RegisterRequest{Instance: in})); err != nil {
			t.Fatalf("Register(%s) = %v", in.GetId(), err)
		}
	}

	prom := startPrometheus(t, bin, fmt.Sprintf(`
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: beacon
    http_sd_configs:
      - url: http://%s/v1/sd/prometheus?service=web&service=db
        refresh_interval: 1s
        authorization:
          credentials: %s
    relabel_configs:
      - source_labels: [__meta_beacon_id]
        target_label: beacon_id
      - source_labels: [__meta_beacon_zone]
        target_label: zone
`, srv.Addr(), token))

	// Discovered with their labels, and scraped.
	testutil.Eventually(t, 60*time.Second, "Prometheus to discover and scrape web-1 and web-2", func() bool {
		targets := prom.targets(ctx)
		if len(targets) != 2 {
			return false
		}
		for _, tg := range targets {
			if tg.Health != "up" {
				return false
			}
		}
		return true
	})
	targets := prom.targets(ctx)
	for i, want := range []struct {
		id, zone, version, tags string
		scrapes                 *httptest.Server
	}{
		{"web-1", "z1", "1.0.0", ",blue,", m1},
		{"web-2", "z2", "", ",,", m2},
	} {
		tg := targets[i]
		d := tg.DiscoveredLabels
		if d["__meta_beacon_id"] != want.id || d["__meta_beacon_service"] != "web" || d["__meta_beacon_namespace"] != "default" ||
			d["__meta_beacon_zone"] != want.zone || d["__meta_beacon_version"] != want.version || d["__meta_beacon_tags"] != want.tags ||
			d["__meta_beacon_health"] != "passing" || d["__meta_beacon_status"] != "UP" || d["__meta_beacon_weight"] != "100" ||
			d["__meta_beacon_routable"] != "true" {
			t.Errorf("target %s: discovered labels %v", want.id, d)
		}
		if wantURL := want.scrapes.URL + "/metrics"; tg.ScrapeURL != wantURL {
			t.Errorf("target %s scrapes %s, want %s", want.id, tg.ScrapeURL, wantURL)
		}
		if tg.Labels["beacon_id"] != want.id || tg.Labels["zone"] != want.zone {
			t.Errorf("target %s: labels after relabeling %v", want.id, tg.Labels)
		}
	}
	testutil.Eventually(t, 60*time.Second, `up{job="beacon"} == 1 for web-1 and web-2`, func() bool {
		return slices.Equal(prom.query(ctx, `up{job="beacon"} == 1`, "beacon_id"), []string{"web-1", "web-2"})
	})
	if got := prom.query(ctx, `sd_test_info`, "process"); !slices.Equal(got, []string{"web-1", "web-2"}) {
		t.Errorf("sd_test_info scraped from %v, want web-1 and web-2", got)
	}

	// Deregistered: Prometheus drops the target.
	if _, err := rc.Deregister(ctx, connect.NewRequest(&beaconv1.DeregisterRequest{Service: "web", Id: "web-2"})); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 60*time.Second, "Prometheus to drop web-2", func() bool {
		targets := prom.targets(ctx)
		return len(targets) == 1 && targets[0].DiscoveredLabels["__meta_beacon_id"] == "web-1"
	})
}

func mustPort(t *testing.T, addr string) string {
	t.Helper()
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	return port
}

// prometheusBinary finds Debian's prometheus on PATH. The test command
// installs it; elsewhere the test is skipped unless
// BEACON_REQUIRE_PROMETHEUS=1 makes its absence a failure.
func prometheusBinary(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("prometheus")
	if err != nil {
		if os.Getenv("BEACON_REQUIRE_PROMETHEUS") == "1" {
			t.Fatalf("prometheus not on PATH and BEACON_REQUIRE_PROMETHEUS=1: %v", err)
		}
		t.Skip("prometheus not on PATH (install Debian's prometheus)")
	}
	return bin
}

// promProcess is a running prometheus process and a client for its API.
type promProcess struct {
	t    *testing.T
	base string
	hc   *http.Client
	last string // the last targets answer, logged if the test fails
}

// startPrometheus runs prometheus with config, everything it writes in a
// temp dir, until the test ends; it waits until it is ready.
func startPrometheus(t *testing.T, bin, config string) *promProcess {
	t.Helper()
	dir := t.TempDir()
	cfgFile := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(cfgFile, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := testutil.FreeAddr(t)
	cmd := exec.Command(bin, "--config.file="+cfgFile, "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+addr, "--web.console.templates="+dir, "--web.console.libraries="+dir, "--log.level=warn")
	cmd.Dir = dir
	out := &promOutput{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &promProcess{t: t, base: "http://" + addr, hc: &http.Client{Transport: &http.Transport{}, Timeout: 10 * time.Second}}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
		p.hc.CloseIdleConnections()
		if t.Failed() {
			t.Logf("prometheus output:\n%s\nlast /api/v1/targets data: %s", out.String(), p.last)
		}
	})
	testutil.Eventually(t, 60*time.Second, "prometheus to be ready", func() bool {
		resp, err := p.hc.Get(p.base + "/-/ready")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	return p
}

// promTarget is an active target of Prometheus's /api/v1/targets.
type promTarget struct {
	DiscoveredLabels map[string]string `json:"discoveredLabels"`
	Labels           map[string]string `json:"labels"`
	ScrapeURL        string            `json:"scrapeUrl"`
	Health           string            `json:"health"`
	LastError        string            `json:"lastError"`
}

// targets returns the active targets, ordered by instance id.
func (p *promProcess) targets(ctx context.Context) []promTarget {
	var data struct {
		ActiveTargets []promTarget `json:"activeTargets"`
	}
	p.last = p.get(ctx, "/api/v1/targets?state=active", &data)
	slices.SortFunc(data.ActiveTargets, func(a, b promTarget) int {
		return strings.Compare(a.DiscoveredLabels["__meta_beacon_id"], b.DiscoveredLabels["__meta_beacon_id"])
	})
	return data.ActiveTargets
}

// query runs an instant query and returns label of each series, sorted.
func (p *promProcess) query(ctx context.Context, q, label string) []string {
	var data struct {
		Result []struct {
			Metric map[string]string `json:"metric"`
		} `json:"result"`
	}
	p.get(ctx, "/api/v1/query?query="+url.QueryEscape(q), &data)
	out := []string{}
	for _, r := range data.Result {
		out = append(out, r.Metric[label])
	}
	slices.Sort(out)
	return out
}

// get decodes the data of an API answer and returns it raw; it fails
// the test on anything but a success.
func (p *promProcess) get(ctx context.Context, path string, data any) string {
	p.t.Helper()
	req, _ := http.NewRequestWithContext(ctx, "GET", p.base+path, nil)
	resp, err := p.hc.Do(req)
	if err != nil {
		p.t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var env struct {
		Status string          `json:"status"`
		Data   json.RawMessage `json:"data"`
	}
	if err := json.Unmarshal(body, &env); err != nil || env.Status != "success" {
		p.t.Fatalf("GET %s = %d %s (%v)", path, resp.StatusCode, body, err)
	}
	if err := json.Unmarshal(env.Data, data); err != nil {
		p.t.Fatalf("GET %s: data %s: %v", path, env.Data, err)
	}
	return string(env.Data)
}

// promOutput collects a child process's output.
type promOutput struct {
	mu  sync.Mutex
	buf bytes.Buffer // guarded by mu
}

func (b *promOutput) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *promOutput) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

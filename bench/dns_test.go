package bench

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
)

// BenchmarkDNS: queries per second and latency of SRV lookups against
// 1,000 services (3 instances each) on a beacon server process, asked by
// dnsperf (Debian's) over UDP, beside the same server's ListInstances over
// HTTP/JSON (what a client without DNS pays: one keep-alive HTTP/1.1 call
// per lookup), by as many concurrent callers, in the same run. The load
// generators share the machine with the server, as they would on one host;
// srv-cores is the server's CPU use during each phase.
//
//	go test -run '^$' -bench DNS -benchtime 1x -timeout 10m ./bench
func BenchmarkDNS(b *testing.B) {
	const (
		services  = 1000
		instances = 3
		phase     = 15 * time.Second
		callers   = 32 // HTTP callers; dnsperf keeps as many queries outstanding per client socket
	)
	dnsperf, err := exec.LookPath("dnsperf")
	if err != nil {
		if os.Getenv("BEACON_REQUIRE_DNS_TOOLS") == "1" {
			b.Fatalf("dnsperf not on PATH and BEACON_REQUIRE_DNS_TOOLS=1: %v", err)
		}
		b.Skip("dnsperf not on PATH (install Debian's dnsperf)")
	}
	for range b.N {
		dnsAddr := testutil.FreeAddr(b)
		p := startServerProcess(b, "--dns-addr", dnsAddr,
			// One loopback client registers 3,000 instances at once.
			"--write-rate", "1e6", "--write-burst", "1000000", "--write-rate-per-ip", "1e6", "--write-burst-per-ip", "1000000")
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		registerServices(ctx, b, p.addr, services, instances)

		// The query file: every service's SRV name, in order; dnsperf
		// loops over it.
		var qf bytes.Buffer
		for i := range services {
			fmt.Fprintf(&qf, "_s%d._tcp.service.consul SRV\n", i)
		}
		file := filepath.Join(b.TempDir(), "queries.txt")
		if err := os.WriteFile(file, qf.Bytes(), 0o600); err != nil {
			b.Fatal(err)
		}
		host, port, _ := net.SplitHostPort(dnsAddr)
		runDNSPerf := func(d time.Duration) dnsperfResult {
			out, err := exec.CommandContext(ctx, dnsperf, "-s", host, "-p", port, "-d", file,
				"-l", strconv.Itoa(int(d/time.Second)), "-c", "4", "-T", "1", "-q", strconv.Itoa(callers)).CombinedOutput()
			if err != nil {
				b.Fatalf("dnsperf: %v\n%s", err, out)
			}
			return parseDNSPerf(b, string(out))
		}
		runDNSPerf(2 * time.Second) // warm-up: the server's buffers and pools
		cpu0 := p.cpuSeconds(b)
		start := time.Now()
		dns := runDNSPerf(phase)
		dnsCores := (p.cpuSeconds(b) - cpu0) / time.Since(start).Seconds()
		if dns.noerror != dns.completed || dns.lost > dns.completed/1000 {
			b.Fatalf("dnsperf: %d of %d answers NOERROR, %d lost; want all NOERROR, lost under 0.1%%:\n%s", dns.noerror, dns.completed, dns.lost, dns.out)
		}

		httpLookups(ctx, b, p.addr, services, callers, 2*time.Second) // warm-up
		cpu0, start = p.cpuSeconds(b), time.Now()
		h := httpLookups(ctx, b, p.addr, services, callers, phase)
		httpCores := (p.cpuSeconds(b) - cpu0) / time.Since(start).Seconds()
		cancel()

		b.ReportMetric(dns.qps, "dns-qps")
		b.ReportMetric(dns.avgLatency*1e3, "dns-mean-ms")
		b.ReportMetric(dns.stddev*1e3, "dns-stddev-ms")
		b.ReportMetric(dnsCores, "dns-srv-cores")
		b.ReportMetric(h.qps, "http-qps")
		b.ReportMetric(h.mean*1e3, "http-mean-ms")
		b.ReportMetric(h.p99*1e3, "http-p99-ms")
		b.ReportMetric(httpCores, "http-srv-cores")
		b.ReportMetric(dns.qps/h.qps, "dns/http")
		b.Logf("dnsperf (%d services, %d SRV records each): %.0f q/s, mean %.3f ms (sd %.3f), server %.2f cores; ListInstances over HTTP: %.0f q/s, mean %.3f ms, p99 %.3f ms, server %.2f cores",
			services, instances, dns.qps, dns.avgLatency*1e3, dns.stddev*1e3, dnsCores, h.qps, h.mean*1e3, h.p99*1e3, httpCores)
	}
}

// registerServices registers services × instances persistent instances,
// s0..s(N-1), 8 callers at a time.
func registerServices(ctx context.Context, b *testing.B, addr string, services, instances int) {
	b.Helper()
	c, err := client.New([]string{addr})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	work := make(chan int)
	var wg sync.WaitGroup
	errc := make(chan error, 8)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				for j := range instances {
					in := registry.Instance{Service: fmt.Sprint("s", i), ID: fmt.Sprint("i", j),
						Address: fmt.Sprintf("10.%d.%d.%d", i/250, i%250, j+1), Port: 8000 + j}
					if _, err := c.Register(ctx, in); err != nil {
						select {
						case errc <- err:
						default:
						}
						return
					}
				}
			}
		}()
	}
	for i := range services {
		select {
		case work <- i:
		case err := <-errc:
			close(work)
			wg.Wait()
			b.Fatal(err)
		}
	}
	close(work)
	wg.Wait()
	select {
	case err := <-errc:
		b.Fatal(err)
	default:
	}
	// The view has them all once the last service lists its instances.
	testutil.Eventually(b, time.Minute, "every service in the server's view", func() bool {
		snap, err := c.Instances(ctx, fmt.Sprint("s", services-1))
		return err == nil && len(snap.Instances) == instances
	})
}

type dnsperfResult struct {
	completed, lost, noerror int
	qps, avgLatency, stddev  float64 // seconds
	out                      string
}

var (
	dnsperfCompleted = regexp.MustCompile(`Queries completed:\s+(\d+)`)
	dnsperfLost      = regexp.MustCompile(`Queries lost:\s+(\d+)`)
	dnsperfNoError   = regexp.MustCompile(`Response codes:.*NOERROR (\d+)`)
	dnsperfQPS       = regexp.MustCompile(`Queries per second:\s+([\d.]+)`)
	dnsperfLatency   = regexp.MustCompile(`Average Latency \(s\):\s+([\d.]+)`)
	dnsperfStddev    = regexp.MustCompile(`Latency StdDev \(s\):\s+([\d.]+)`)
)

func parseDNSPerf(b *testing.B, out string) dnsperfResult {
	b.Helper()
	r := dnsperfResult{out: out}
	num := func(re *regexp.Regexp) float64 {
		m := re.FindStringSubmatch(out)
		if m == nil {
			b.Fatalf("dnsperf output without %s:\n%s", re, out)
		}
		v, _ := strconv.ParseFloat(m[1], 64)
		return v
	}
	r.completed, r.lost, r.noerror = int(num(dnsperfCompleted)), int(num(dnsperfLost)), int(num(dnsperfNoError))
	r.qps, r.avgLatency, r.stddev = num(dnsperfQPS), num(dnsperfLatency), num(dnsperfStddev)
	return r
}

type httpResult struct{ qps, mean, p99 float64 }

// httpLookups calls ListInstances over HTTP/JSON (the Connect protocol, as
// curl or any HTTP client would) from callers goroutines for d, cycling
// through the services.
func httpLookups(ctx context.Context, b *testing.B, addr string, services, callers int, d time.Duration) httpResult {
	b.Helper()
	tr := &http.Transport{MaxIdleConnsPerHost: callers, MaxConnsPerHost: callers}
	defer tr.CloseIdleConnections()
	hc := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	url := "http://" + addr + "/beacon.v1.RegistryService/ListInstances"
	var (
		mu   sync.Mutex
		lats []time.Duration
		wg   sync.WaitGroup
		errc = make(chan error, callers)
	)
	deadline := time.Now().Add(d)
	start := time.Now()
	for w := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []time.Duration
			for i := w; time.Now().Before(deadline) && ctx.Err() == nil; i += callers {
				body := fmt.Sprintf(`{"service":"s%d"}`, i%services)
				t0 := time.Now()
				resp, err := hc.Post(url, "application/json", strings.NewReader(body))
				if err != nil {
					errc <- err
					return
				}
				n, _ := io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK || n == 0 {
					errc <- fmt.Errorf("ListInstances s%d = %d (%d bytes)", i%services, resp.StatusCode, n)
					return
				}
				mine = append(mine, time.Since(t0))
			}
			mu.Lock()
			lats = append(lats, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	select {
	case err := <-errc:
		b.Fatal(err)
	default:
	}
	slices.Sort(lats)
	var sum time.Duration
	for _, l := range lats {
		sum += l
	}
	return httpResult{
		qps:  float64(len(lats)) / elapsed.Seconds(),
		mean: (sum / time.Duration(max(len(lats), 1))).Seconds(),
		p99:  lats[min(len(lats)-1, len(lats)*99/100)].Seconds(),
	}
}

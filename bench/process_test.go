package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
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

	clientv3 "go.etcd.io/etcd/client/v3"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/servertest"
)

// serverProcess runs the beacon binary so its CPU and memory can be read
// from /proc apart from the clients'.
type serverProcess struct {
	cmd            *exec.Cmd
	addr, etcdAddr string
}

func startServerProcess(b testing.TB, extraArgs ...string) *serverProcess {
	b.Helper()
	return startServerProcessFrom(b, buildBeacon(b), extraArgs...)
}

// buildBeacon builds the beacon binary of this tree.
func buildBeacon(b testing.TB) string {
	b.Helper()
	bin := filepath.Join(b.TempDir(), "beacon")
	if out, err := exec.Command("go", "build", "-o", bin, "beacon.dev/beacon/cmd/beacon").CombinedOutput(); err != nil {
		b.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// startServerProcessFrom is startServerProcess with a binary built before.
func startServerProcessFrom(b testing.TB, bin string, extraArgs ...string) *serverProcess {
	b.Helper()
	cfg := servertest.Config(b, "")
	cfg.EtcdClientAddr = testutil.FreeAddr(b) // the benchmarks' own etcd clients
	p := &serverProcess{addr: cfg.Addr, etcdAddr: cfg.EtcdClientAddr}
	args := []string{"server", "--addr", cfg.Addr, "--data-dir", cfg.DataDir,
		"--etcd-client-addr", cfg.EtcdClientAddr, "--etcd-peer-addr", cfg.EtcdPeerAddr, "--log-level", "error", "--console-addr", "off"}
	p.cmd = exec.Command(bin, append(args, extraArgs...)...)
	// Dies with the benchmark, even one killed by its -timeout (whose
	// cleanups do not run): it holds go test's output pipe.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, _ := p.cmd.StdoutPipe()
	p.cmd.Stderr = os.Stderr
	if err := p.cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { p.cmd.Process.Signal(syscall.SIGKILL); p.cmd.Wait() })
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if strings.Contains(sc.Text(), "ready") {
			go io.Copy(io.Discard, out)
			return p
		}
	}
	b.Fatal("server never became ready")
	return nil
}

// cpuSeconds is the process's user+system CPU time so far.
func (p *serverProcess) cpuSeconds(b testing.TB) float64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	if err != nil {
		b.Fatal(err)
	}
	f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
	utime, _ := strconv.ParseFloat(f[11], 64)
	stime, _ := strconv.ParseFloat(f[12], 64)
	return (utime + stime) / 100 // USER_HZ
}

// rssBytes is the process's resident set size.
func (p *serverProcess) rssBytes(b testing.TB) float64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		b.Fatal(err)
	}
	m := regexp.MustCompile(`VmRSS:\s+(\d+) kB`).FindSubmatch(data)
	kb, _ := strconv.ParseFloat(string(m[1]), 64)
	return kb * 1024
}

func (p *serverProcess) metric(b testing.TB, name string) float64 {
	v, ok := testutil.Metric(b, p.addr, name)
	if !ok {
		b.Fatalf("no metric %s", name)
	}
	return v
}

// cpuOver measures the server's CPU use (in cores) over d.
func (p *serverProcess) cpuOver(b *testing.B, d time.Duration) float64 {
	c0, t0 := p.cpuSeconds(b), time.Now()
	time.Sleep(d) // the measurement window itself
	return (p.cpuSeconds(b) - c0) / time.Since(t0).Seconds()
}

// BenchmarkSessions: server CPU and RSS with 10,000 live sessions at the
// default TTL (keepalive every TTL/3), beside 10,000 raw etcd leases kept
// alive by clientv3 against the same server's embedded etcd, same run.
func BenchmarkSessions(b *testing.B) {
	const (
		sessions = 10000
		clients  = 20
		window   = 20 * time.Second
	)
	for range b.N {
		p := startServerProcess(b)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		time.Sleep(3 * time.Second) // let start-up work finish
		idle := p.cpuOver(b, 5*time.Second)

		// Anchor: raw etcd leases, kept alive by clientv3 (one stream per client).
		var clis []*clientv3.Client
		for range clients {
			clis = append(clis, etcdClient(b, p.etcdAddr))
		}
		before, err := clis[0].Leases(ctx)
		if err != nil {
			b.Fatal(err)
		}
		baseLeases := len(before.Leases) // the server's own
		lctx, lcancel := context.WithCancel(ctx)
		var granted atomic.Int64
		var wg sync.WaitGroup
		for c := range clients {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range sessions / clients {
					l, err := clis[c].Grant(ctx, int64(registry.DefaultSessionTTL/time.Second))
					if err != nil {
						b.Error(err)
						return
					}
					ka, err := clis[c].KeepAlive(lctx, l.ID)
					if err != nil {
						b.Error(err)
						return
					}
					go func() {
						for range ka {
						}
					}()
					granted.Add(1)
				}
			}()
		}
		wg.Wait()
		time.Sleep(4 * time.Second)
		rawCPU := p.cpuOver(b, window)
		lcancel()
		for _, c := range clis[1:] {
			c.Close()
		}
		// The raw leases expire, and etcd revokes them at most 1,000 a
		// second: wait until none is left, so that their revocation is not
		// charged to beacon's window below.
		for deadline := time.Now().Add(time.Minute); ; {
			left, err := clis[0].Leases(ctx)
			if err != nil {
				b.Fatal(err)
			}
			if len(left.Leases) <= baseLeases {
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("%d leases left a minute after the anchor's clients closed, %d before they granted theirs", len(left.Leases), baseLeases)
			}
			time.Sleep(time.Second)
		}
		clis[0].Close()
		time.Sleep(4 * time.Second)
		rssBefore := p.rssBytes(b)

		// beacon sessions through the SDK.
		var all []*client.Session
		var mu sync.Mutex
		for range clients {
			wg.Add(1)
			go func() {
				defer wg.Done()
				cl, _ := client.New([]string{p.addr})
				for range sessions / clients {
					s, err := cl.NewSession(ctx)
					if err != nil {
						b.Error(err)
						return
					}
					mu.Lock()
					all = append(all, s)
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		time.Sleep(4 * time.Second)
		beaconCPU := p.cpuOver(b, window)
		rss := p.rssBytes(b)
		live := p.metric(b, "beacon_sessions")
		for _, s := range all {
			s.Close(ctx)
		}
		cancel()

		b.ReportMetric(idle*100, "idle-cpu-%")
		b.ReportMetric(rawCPU*100, "etcd-leases-cpu-%")
		b.ReportMetric(beaconCPU*100, "beacon-sessions-cpu-%")
		b.ReportMetric((beaconCPU-idle)/(rawCPU-idle), "keepalive-cpu-ratio")
		b.ReportMetric(rss/(1<<20), "rss-MiB")
		b.ReportMetric((rss-rssBefore)/sessions, "rss-B/session")
		b.ReportMetric(live, "live-sessions")
		b.ReportMetric(0, "ns/op")
	}
}

// unlimitedWrites lifts the per-connection and per-address write limits
// (protection against one runaway client) for benchmarks whose load comes
// from one client on 127.0.0.1: they would measure the limits, not the
// server.
var unlimitedWrites = []string{"--write-rate", "10000000", "--write-burst", "1048576", "--write-rate-per-ip", "10000000", "--write-burst-per-ip", "1048576"}

// BenchmarkMemoryPerInstance: server memory per registered instance at 10k
// and 100k instances (persistent, 100 services), beside the anchor: the
// same records written straight to the embedded etcd of a second server
// process, under a prefix its view does not hold — what etcd alone costs.
func BenchmarkMemoryPerInstance(b *testing.B) {
	for range b.N {
		rawRSS, rawHeap := rawEtcdMemory(b, 100000)
		p := startServerProcess(b, unlimitedWrites...)
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
		defer cancel()
		time.Sleep(3 * time.Second)
		c, _ := client.New([]string{p.addr})
		defer c.Close()
		register := func(from, to int) {
			parallel(b, from, to, func(i int) error {
				_, err := c.Register(ctx, memoryInstance(i))
				return err
			})
		}
		settle := func() (rss, heap float64) {
			time.Sleep(5 * time.Second)
			return p.rssBytes(b), p.metric(b, "go_memstats_heap_inuse_bytes")
		}
		rss0, heap0 := settle()
		register(0, 10000)
		rss10k, heap10k := settle()
		register(10000, 100000)
		rss100k, heap100k := settle()
		if n := p.metric(b, "beacon_instances"); n != 100000 {
			b.Fatalf("beacon_instances = %v, want 100000", n)
		}
		b.ReportMetric((rss10k-rss0)/10000, "rss-B/instance@10k")
		b.ReportMetric((heap10k-heap0)/10000, "heap-B/instance@10k")
		b.ReportMetric((rss100k-rss0)/100000, "rss-B/instance@100k")
		b.ReportMetric((heap100k-heap0)/100000, "heap-B/instance@100k")
		b.ReportMetric(rss100k/(1<<20), "rss-MiB@100k")
		b.ReportMetric(rawRSS, "etcd-only-rss-B/key@100k")
		b.ReportMetric(rawHeap, "etcd-only-heap-B/key@100k")
		b.ReportMetric((heap100k-heap0)/100000-rawHeap, "beacon-own-heap-B/instance@100k")
		b.ReportMetric(0, "ns/op")
	}
}

// rawEtcdMemory writes n instance records directly to a server's embedded
// etcd outside beacon's prefix and returns the RSS and heap growth per key.
func rawEtcdMemory(b *testing.B, n int) (rssPerKey, heapPerKey float64) {
	p := startServerProcess(b)
	defer func() { p.cmd.Process.Signal(syscall.SIGKILL); p.cmd.Wait() }()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	cli := etcdClient(b, p.etcdAddr)
	time.Sleep(3 * time.Second)
	time.Sleep(5 * time.Second)
	rss0, heap0 := p.rssBytes(b), p.metric(b, "go_memstats_heap_inuse_bytes")
	parallel(b, 0, n, func(i int) error {
		in := memoryInstance(i)
		in.ApplyDefaults()
		_, err := cli.Put(ctx, fmt.Sprintf("/raw/v1/ns/default/svc/%s/inst/%s", in.Service, in.ID), rawRecord(&in))
		return err
	})
	time.Sleep(5 * time.Second)
	return (p.rssBytes(b) - rss0) / float64(n), (p.metric(b, "go_memstats_heap_inuse_bytes") - heap0) / float64(n)
}

func memoryInstance(i int) registry.Instance {
	return registry.Instance{Service: fmt.Sprintf("svc-%d", i%100), ID: fmt.Sprintf("instance-%06d", i),
		Address: "10.1.2.3", Port: 8000 + i%1000, Zone: "zone-a", Tags: []string{"v1"}}
}

// parallel runs op for every i in [from, to) on 64 goroutines.
func parallel(b testing.TB, from, to int, op func(i int) error) {
	var next atomic.Int64
	next.Store(int64(from))
	var wg sync.WaitGroup
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= to {
					return
				}
				if err := op(i); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
}

package bench

import (
	"context"
	"fmt"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
)

// scaleShape is the size of one scale run: sessions × perSession
// instances spread over services, followed by watchers SDK clients (each
// on its own connection) that watch one of those services and the probe
// service, whose changes are timed.
type scaleShape struct {
	sessions, perSession, services int
	holders                        int // SDK clients that hold the sessions
	watchers                       int
	changes                        int           // timed changes of the probe service
	window                         time.Duration // steady-state CPU window (0: not measured)
	heartbeat                      time.Duration // the watchers' watch heartbeat (0: the SDK's default)
}

// scaleProbe is the service every watcher follows besides its own.
const scaleProbe = "scale-probe"

// scaleResult is what a scale run measured.
type scaleResult struct {
	loadTime, syncTime time.Duration // registering everything; every watcher synced
	serverCPU          float64       // the server's process, cores, over the steady window
	clientsCPU         float64       // this process (sessions and watchers), cores, same window
	serverRSS          float64       // bytes, after the window
	// The server's Go heap in use, goroutine stacks and goroutines, after
	// the window.
	serverHeap, serverStacks, serverGoroutines float64
	propagation                                *latencies // the probe's changes
	// After the changes: instances and sessions (beacon's metrics; etcd's
	// keys and the leases granted), and watch streams open (beacon only).
	instances, sessions, watchers float64
	// held[j]: instances of watcher j's own service in the last snapshot
	// it was handed (what it listed, for etcd).
	held []int
}

func scaleInstance(k, services int) registry.Instance {
	return registry.Instance{Service: fmt.Sprintf("svc-%d", k%services), ID: fmt.Sprintf("instance-%06d", k),
		Address: "10.1.2.3", Port: 8000 + k%1000, Zone: "zone-a", Tags: []string{"v1"}}
}

// runScale loads the server at p with shape's sessions, instances and
// watchers (all in this process: the server is another one), measures
// the steady state and then the probe's changes. Everything it starts is
// closed before it returns.
func runScale(ctx context.Context, t testing.TB, p *serverProcess, shape scaleShape) *scaleResult {
	res := &scaleResult{}
	holders := make([]*client.Client, shape.holders)
	for i := range holders {
		c, err := client.New([]string{p.addr})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		holders[i] = c
	}
	// Sessions are closed by their clients' Close, each revoking its lease.
	start := time.Now()
	parallel(t, 0, shape.sessions, func(i int) error {
		s, err := holders[i%len(holders)].NewSession(ctx)
		if err != nil {
			return err
		}
		ins := make([]registry.Instance, shape.perSession)
		for j := range ins {
			ins[j] = scaleInstance(i*shape.perSession+j, shape.services)
		}
		_, err = s.RegisterMany(ctx, ins)
		return err
	})
	res.loadTime = time.Since(start)

	start = time.Now()
	watchers := make([]*client.Watcher, shape.watchers)
	clients := make([]*client.Client, shape.watchers)
	defer func() {
		for j := range watchers {
			if watchers[j] != nil {
				watchers[j].Close()
			}
			if clients[j] != nil {
				clients[j].Close()
			}
		}
	}()
	var opts []client.Option
	if shape.heartbeat > 0 {
		opts = append(opts, client.WithWatchHeartbeat(shape.heartbeat))
	}
	parallel(t, 0, shape.watchers, func(j int) error {
		c, err := client.New([]string{p.addr}, opts...)
		if err != nil {
			return err
		}
		clients[j] = c
		w, err := c.Watch(ctx, []string{fmt.Sprintf("svc-%d", j%shape.services), scaleProbe})
		if err != nil {
			return err
		}
		watchers[j] = w
		select {
		case <-w.Synced():
			return nil
		case <-ctx.Done():
			return fmt.Errorf("watcher %d never synced: %w", j, ctx.Err())
		}
	})
	if t.Failed() {
		return res
	}
	res.syncTime = time.Since(start)

	// Each watcher's reader hands on the probe's revisions and notes the
	// size of its own service. held[j] is written by reader j alone, and
	// read once the readers are done.
	seen := make([]chan applied, shape.watchers)
	res.held = make([]int, shape.watchers)
	var wg sync.WaitGroup
	rctx, rcancel := context.WithCancel(ctx)
	defer func() { rcancel(); wg.Wait() }()
	for j, w := range watchers {
		seen[j] = make(chan applied, shape.changes+16)
		res.held[j] = -1
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				snaps, err := w.Next(rctx)
				if err != nil {
					return
				}
				now := time.Now()
				for _, s := range snaps {
					if s.Service != scaleProbe {
						res.held[j] = len(s.Instances)
						continue
					}
					select {
					case seen[j] <- applied{s.Revision, now}:
					case <-rctx.Done():
						return
					}
				}
			}
		}()
	}

	res.measureSteady(t, p, shape.window)
	writer, err := client.New([]string{p.addr})
	if err != nil {
		t.Fatal(err)
	}
	defer writer.Close()
	res.propagation = timeChanges(ctx, t, seen, shape.changes, func(i int) (int64, error) {
		return writer.Register(ctx, registry.Instance{Service: scaleProbe, ID: fmt.Sprintf("p-%d", i%10), Address: "127.0.0.1", Port: 1 + i})
	})
	res.instances = p.metric(t, "beacon_instances")
	res.sessions = p.metric(t, "beacon_sessions")
	res.watchers = p.metric(t, "beacon_watchers")
	return res
}

// measureSteady measures the server's and this process's CPU over
// window, then the server's memory (nothing when window is 0).
func (res *scaleResult) measureSteady(t testing.TB, p *serverProcess, window time.Duration) {
	if window == 0 {
		return
	}
	time.Sleep(5 * time.Second) // let the load's after-effects settle before the window
	server0, clients0, t0 := p.cpuSeconds(t), processCPU(), time.Now()
	time.Sleep(window) // the measurement window itself
	elapsed := time.Since(t0).Seconds()
	res.serverCPU = (p.cpuSeconds(t) - server0) / elapsed
	res.clientsCPU = (processCPU() - clients0).Seconds() / elapsed
	res.serverRSS = p.rssBytes(t)
	res.serverHeap = p.metric(t, "go_memstats_heap_inuse_bytes")
	res.serverStacks = p.metric(t, "go_memstats_stack_inuse_bytes")
	res.serverGoroutines = p.metric(t, "go_goroutines")
}

// timeChanges makes n changes with write, one at a time, each timed until
// every watcher has applied it (seen: what each watcher applied).
func timeChanges(ctx context.Context, t testing.TB, seen []chan applied, n int, write func(i int) (int64, error)) *latencies {
	l := &latencies{}
	for i := range n {
		start := time.Now()
		rev, err := write(i)
		if err != nil {
			t.Fatal(err)
		}
		collect(ctx, t, seen, rev, start, time.Now(), l)
	}
	return l
}

// rawScalePrefix is where the anchor keeps a service's instances: the
// beacon layout's shape, outside beacon's own prefix.
func rawScalePrefix(service string) string { return "/raw/v1/ns/default/svc/" + service + "/inst/" }

// rawScale is runScale's anchor: the same load straight on the embedded
// etcd of the server at p, as a fleet without a registry would put it
// there. A lease per session kept alive by clientv3, its instances put in
// one transaction; each watcher its own clientv3 client that lists its
// service, then watches it and the probe from the listed revision.
func rawScale(ctx context.Context, t testing.TB, p *serverProcess, shape scaleShape) *scaleResult {
	res := &scaleResult{}
	var clis []*clientv3.Client
	var clisMu sync.Mutex
	defer func() {
		for _, c := range clis {
			c.Close()
		}
	}()
	keep := func(c *clientv3.Client) {
		clisMu.Lock()
		clis = append(clis, c)
		clisMu.Unlock()
	}
	holders := make([]*clientv3.Client, shape.holders)
	for i := range holders {
		c, err := newEtcdClient(p.etcdAddr)
		if err != nil {
			t.Fatal(err)
		}
		keep(c)
		holders[i] = c
	}
	before, err := holders[0].Leases(ctx)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	parallel(t, 0, shape.sessions, func(i int) error {
		c := holders[i%len(holders)]
		l, err := c.Grant(ctx, int64(registry.DefaultSessionTTL/time.Second))
		if err != nil {
			return err
		}
		ka, err := c.KeepAlive(ctx, l.ID) // until the client closes
		if err != nil {
			return err
		}
		go func() {
			for range ka {
			}
		}()
		ops := make([]clientv3.Op, shape.perSession)
		for j := range ops {
			in := scaleInstance(i*shape.perSession+j, shape.services)
			in.ApplyDefaults()
			ops[j] = clientv3.OpPut(rawScalePrefix(in.Service)+in.ID, rawRecord(&in), clientv3.WithLease(l.ID))
		}
		_, err = c.Txn(ctx).Then(ops...).Commit()
		return err
	})
	res.loadTime = time.Since(start)

	start = time.Now()
	seen := make([]chan applied, shape.watchers)
	res.held = make([]int, shape.watchers)
	var wg sync.WaitGroup
	wctx, wcancel := context.WithCancel(ctx)
	defer func() { wcancel(); wg.Wait() }()
	parallel(t, 0, shape.watchers, func(j int) error {
		c, err := newEtcdClient(p.etcdAddr)
		if err != nil {
			return err
		}
		keep(c)
		own := rawScalePrefix(fmt.Sprintf("svc-%d", j%shape.services))
		list, err := c.Get(ctx, own, clientv3.WithPrefix())
		if err != nil {
			return err
		}
		res.held[j] = len(list.Kvs)
		from := clientv3.WithRev(list.Header.Revision + 1)
		ownCh := c.Watch(wctx, own, clientv3.WithPrefix(), from)
		probeCh := c.Watch(wctx, rawScalePrefix(scaleProbe), clientv3.WithPrefix(), from, clientv3.WithCreatedNotify())
		if _, ok := <-probeCh; !ok {
			return fmt.Errorf("watcher %d: the probe's watch ended before it started", j)
		}
		seen[j] = make(chan applied, shape.changes+16)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case resp, ok := <-probeCh:
					if !ok {
						return
					}
					now := time.Now()
					for _, ev := range resp.Events {
						select {
						case seen[j] <- applied{ev.Kv.ModRevision, now}:
						case <-wctx.Done():
							return
						}
					}
				case _, ok := <-ownCh:
					if !ok {
						return
					}
				}
			}
		}()
		return nil
	})
	if t.Failed() {
		return res
	}
	res.syncTime = time.Since(start)

	res.measureSteady(t, p, shape.window)
	res.propagation = timeChanges(ctx, t, seen, shape.changes, func(i int) (int64, error) {
		resp, err := holders[0].Put(ctx, rawScalePrefix(scaleProbe)+fmt.Sprintf("p-%d", i%10), fmt.Sprintf(`{"address":"127.0.0.1","port":%d}`, 1+i))
		if err != nil {
			return 0, err
		}
		return resp.Header.Revision, nil
	})
	count, err := holders[0].Get(ctx, "/raw/v1/", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	res.instances = float64(count.Count)
	leases, err := holders[0].Leases(ctx)
	if err != nil {
		t.Fatal(err)
	}
	res.sessions = float64(len(leases.Leases) - len(before.Leases)) // not the server's own
	return res
}

// scaleServerArgs lift the limits a fleet on one address would meet
// first: connections per address, and write rates.
var scaleServerArgs = append([]string{"--max-conns", "16384", "--max-conns-per-ip", "16384", "--max-watchers", "16384"}, unlimitedWrites...)

// BenchmarkScale (issue 19, goal 6): one beacon server process with
// 100,000 instances in 10,000 sessions and 5,000 watching SDK clients,
// beside its anchor: the same fleet straight on etcd (a lease per
// session, 5,000 clientv3 watchers), on another server process of the
// same binary, in the same run. The clients run in this process, each
// server in its own; all share this machine's cores. Reports each
// server's steady-state CPU and memory and the propagation of a change to
// every watcher, and the ratios, at two watch heartbeats.
func BenchmarkScale(b *testing.B) {
	// The watchers' heartbeat is most of beacon's steady-state cost at this
	// size (etcd's watches have none): the SDK's default, and a longer one.
	for _, heartbeat := range []time.Duration{client.DefaultWatchHeartbeat, 5 * time.Second} {
		b.Run(fmt.Sprintf("heartbeat=%v", heartbeat), func(b *testing.B) {
			benchmarkScale(b, scaleShape{sessions: 10000, perSession: 10, services: 1000, holders: 100, watchers: 5000, changes: 50, window: 20 * time.Second, heartbeat: heartbeat})
		})
	}
}

func benchmarkScale(b *testing.B, shape scaleShape) {
	bin := buildBeacon(b)
	run := func(load func(context.Context, testing.TB, *serverProcess, scaleShape) *scaleResult) (*scaleResult, float64) {
		p := startServerProcessFrom(b, bin, scaleServerArgs...)
		defer func() { p.cmd.Process.Signal(syscall.SIGKILL); p.cmd.Wait() }()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
		defer cancel()
		time.Sleep(3 * time.Second) // let start-up work finish
		idle := p.cpuOver(b, 5*time.Second)
		return load(ctx, b, p, shape), idle
	}
	for range b.N {
		raw, rawIdle := run(rawScale)
		if b.Failed() {
			return
		}
		beacon, idle := run(runScale)
		if b.Failed() {
			return
		}
		report := func(name string, res *scaleResult, idle float64) {
			l := res.propagation
			b.ReportMetric(idle*100, name+"-idle-server-cpu-%")
			b.ReportMetric(res.serverCPU*100, name+"-steady-server-cpu-%")
			b.ReportMetric(res.clientsCPU*100, name+"-steady-clients-cpu-%")
			b.ReportMetric(res.serverRSS/(1<<20), name+"-server-rss-MiB")
			b.ReportMetric(res.serverHeap/(1<<20), name+"-server-heap-MiB")
			b.ReportMetric(res.serverStacks/(1<<20), name+"-server-stacks-MiB")
			b.ReportMetric(res.serverGoroutines, name+"-server-goroutines")
			b.ReportMetric(res.loadTime.Seconds(), name+"-load-s")
			b.ReportMetric(res.syncTime.Seconds(), name+"-watchers-synced-s")
			b.ReportMetric(ms(l.quantile(l.all, 0.5)), name+"-propagation-p50-ms")
			b.ReportMetric(ms(l.quantile(l.all, 0.99)), name+"-propagation-p99-ms")
			b.ReportMetric(ms(l.quantile(l.lastOfStart, 0.5)), name+"-from-start-last-of-N-p50-ms")
			b.ReportMetric(ms(l.quantile(l.lastOfStart, 0.99)), name+"-from-start-last-of-N-p99-ms")
			b.ReportMetric(res.instances, name+"-instances")
		}
		report("beacon", beacon, idle)
		report("etcd", raw, rawIdle)
		b.ReportMetric(beacon.sessions, "beacon-sessions")
		b.ReportMetric(beacon.watchers, "beacon-watchers")
		b.ReportMetric(beacon.serverCPU/raw.serverCPU, "steady-server-cpu-ratio")
		b.ReportMetric(beacon.serverRSS/raw.serverRSS, "server-rss-ratio")
		b.ReportMetric(float64(beacon.propagation.quantile(beacon.propagation.lastOfStart, 0.99))/float64(raw.propagation.quantile(raw.propagation.lastOfStart, 0.99)), "from-start-last-of-N-p99-ratio")
		b.ReportMetric(0, "ns/op")
	}
}

// TestScaleSmoke is BenchmarkScale at a small size, in the suite, for
// beacon and for the anchor: every session and instance is there, every
// watcher holds its whole service, and every watcher applied every change
// of the probe (runScale and rawScale fail otherwise).
func TestScaleSmoke(t *testing.T) {
	shape := scaleShape{sessions: 100, perSession: 10, services: 20, holders: 4, watchers: 50, changes: 5}
	bin := testutil.BeaconBinary(t)
	for _, side := range []struct {
		name string
		load func(context.Context, testing.TB, *serverProcess, scaleShape) *scaleResult
	}{{"beacon", runScale}, {"etcd", rawScale}} {
		t.Run(side.name, func(t *testing.T) {
			p := startServerProcessFrom(t, bin, scaleServerArgs...)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			res := side.load(ctx, t, p, shape)
			if t.Failed() {
				return
			}
			if want := float64(shape.sessions*shape.perSession + min(shape.changes, 10)); res.instances != want {
				t.Errorf("instances = %v, want %v", res.instances, want)
			}
			if res.sessions != float64(shape.sessions) {
				t.Errorf("sessions = %v, want %d", res.sessions, shape.sessions)
			}
			perService := shape.sessions * shape.perSession / shape.services
			for j, n := range res.held {
				if n != perService {
					t.Errorf("watcher %d holds %d instances of its service, want %d", j, n, perService)
				}
			}
		})
	}
}

package bench

import (
	"context"
	"fmt"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server"
	"beacon.dev/beacon/server/servertest"
)

// benchServer starts an in-process server on an embedded etcd with fsync,
// as a user would run it.
func benchServer(b *testing.B) (*server.Server, string) {
	b.Helper()
	return benchServerWith(b, nil)
}

// benchServerWith is benchServer with edit applied to its configuration.
func benchServerWith(b *testing.B, edit func(*server.Config)) (*server.Server, string) {
	b.Helper()
	cfg := servertest.Config(b, "")
	if edit != nil {
		edit(cfg)
	}
	cfg.EtcdClientAddr = testutil.FreeAddr(b) // the benchmarks' own etcd clients, as raw etcd's
	cfg.EtcdUnsafeNoFsync = os.Getenv("BEACON_BENCH_NO_FSYNC") == "1"
	// Every benchmark client is on 127.0.0.1: the per-address and
	// per-connection write limits (protection against one runaway client)
	// would measure themselves, not the server.
	cfg.Limits.WriteRate, cfg.Limits.WriteBurst = 1e7, 1<<20
	cfg.Limits.WriteRatePerIP, cfg.Limits.WriteBurstPerIP = 1e7, 1<<20
	return servertest.Start(b, cfg), cfg.EtcdClientAddr
}

func etcdClient(b *testing.B, addr string) *clientv3.Client {
	b.Helper()
	cli, err := newEtcdClient(addr)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { cli.Close() })
	return cli
}

// newEtcdClient is a benchmark's clientv3 client of addr, closed by the
// caller.
func newEtcdClient(addr string) (*clientv3.Client, error) {
	return clientv3.New(clientv3.Config{Endpoints: []string{addr}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
}

// latencies summarises one side of a propagation run.
type latencies struct {
	all         []time.Duration // every watcher, every change, from the write returning
	lastOf      []time.Duration // per change: the slowest watcher, from the write returning
	lastOfStart []time.Duration // per change: the slowest watcher, from the write starting
	// cpu is the process's CPU time (user + system) over the changes:
	// writer, server, etcd and every watcher together, all in this process.
	cpu time.Duration
}

// processCPU returns the CPU time this process has used.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func (l *latencies) quantile(which []time.Duration, q float64) time.Duration {
	s := slices.Clone(which)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	return s[min(len(s)-1, int(q*float64(len(s))))]
}

func ms(d time.Duration) float64 { return float64(d) / 1e6 }

// BenchmarkPropagation measures the time from a registration returning to
// the change being applied by N watching clients, each on its own
// connection, for beacon's SDK and for raw clientv3 watches on the same
// embedded etcd, in the same run. Run with -benchtime=Nx changes.
func BenchmarkPropagation(b *testing.B) {
	for _, n := range []int{1, 100, 1000} {
		b.Run(fmt.Sprintf("N=%d", n), func(b *testing.B) {
			srv, etcdAddr := benchServer(b)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
			defer cancel()
			beacon := propagationBeacon(ctx, b, func(int) []string { return []string{srv.Addr()} }, n, b.N)
			raw := propagationEtcd(ctx, b, etcdAddr, n, b.N)
			report := func(name string, l *latencies) {
				b.ReportMetric(ms(l.quantile(l.all, 0.5)), name+"-p50-ms")
				b.ReportMetric(ms(l.quantile(l.all, 0.99)), name+"-p99-ms")
				b.ReportMetric(ms(l.quantile(l.lastOf, 0.99)), name+"-last-of-N-p99-ms")
				b.ReportMetric(ms(l.quantile(l.lastOfStart, 0.5)), name+"-from-start-last-of-N-p50-ms")
				b.ReportMetric(ms(l.quantile(l.lastOfStart, 0.99)), name+"-from-start-last-of-N-p99-ms")
				b.ReportMetric(float64(l.cpu.Microseconds())/float64(b.N*n), name+"-cpu-us-per-change-per-watcher")
			}
			report("beacon", beacon)
			report("etcd", raw)
			b.ReportMetric(float64(l99(beacon))/float64(max(l99(raw), time.Microsecond)), "last-of-N-p99-ratio")
			b.ReportMetric(float64(beacon.quantile(beacon.lastOfStart, 0.99))/float64(raw.quantile(raw.lastOfStart, 0.99)), "from-start-last-of-N-p99-ratio")
			// The median beside the goal's p99: with 100 changes the p99 is
			// the slowest change, often a stall both sides share.
			b.ReportMetric(float64(beacon.quantile(beacon.lastOfStart, 0.5))/float64(raw.quantile(raw.lastOfStart, 0.5)), "from-start-last-of-N-p50-ratio")
			b.ReportMetric(0, "ns/op")
		})
	}
}

func l99(l *latencies) time.Duration { return l.quantile(l.lastOf, 0.99) }

// warmUp changes are made and waited for, untimed, before the timed ones,
// on each side alike: without them beacon's first change after the
// servers start took 55–92 ms in 3 of 6 runs (a one-off after start).
const warmUp = 5

// propagationBeacon runs `changes` registrations watched by n SDK clients;
// watcher i dials addrs(i), the writer addrs(0).
func propagationBeacon(ctx context.Context, b *testing.B, addrs func(i int) []string, n, changes int, opts ...client.Option) *latencies {
	var watchers []*client.Watcher
	for i := range n {
		c, err := client.New(addrs(i), opts...)
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		w, err := c.Watch(ctx, []string{"bench"})
		if err != nil {
			b.Fatal(err)
		}
		defer w.Close()
		<-w.Synced()
		watchers = append(watchers, w)
	}
	writer, _ := client.New(addrs(0), opts...)
	defer writer.Close()
	seen := make([]chan applied, n) // per watcher: every revision it applied, and when
	var wg sync.WaitGroup
	wctx, wcancel := context.WithCancel(ctx)
	for i, w := range watchers {
		seen[i] = make(chan applied, changes+16)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				snaps, err := w.Next(wctx)
				if err != nil {
					return
				}
				now := time.Now()
				for _, s := range snaps {
					seen[i] <- applied{s.Revision, now}
				}
			}
		}()
	}
	defer func() { wcancel(); wg.Wait() }()
	write := func(i int) (int64, error) {
		return writer.Register(ctx, registry.Instance{Service: "bench", ID: fmt.Sprintf("i-%d", i%50), Address: "127.0.0.1", Port: 1 + i%60000})
	}
	for i := range warmUp {
		start := time.Now()
		rev, err := write(i)
		if err != nil {
			b.Fatal(err)
		}
		collect(ctx, b, seen, rev, start, time.Now(), &latencies{})
	}
	l := &latencies{}
	b.ResetTimer()
	cpu0 := processCPU()
	defer func() { l.cpu = processCPU() - cpu0 }()
	for i := range changes {
		start := time.Now()
		rev, err := write(i)
		if err != nil {
			b.Fatal(err)
		}
		collect(ctx, b, seen, rev, start, time.Now(), l)
	}
	return l
}

type applied struct {
	rev int64
	at  time.Time
}

// collect waits until every watcher has applied rev and records how long
// after t0 (the write returning) each did, and the slowest from t0 and from
// start (the write starting). A watcher that applied the change before the
// write call returned counts 0 from t0.
func collect(ctx context.Context, b testing.TB, seen []chan applied, rev int64, start, t0 time.Time, l *latencies) {
	var worst, worstStart time.Duration
	for _, ch := range seen {
		for {
			select {
			case a := <-ch:
				if a.rev < rev {
					continue
				}
				d := max(a.at.Sub(t0), 0)
				l.all = append(l.all, d)
				worst = max(worst, d)
				worstStart = max(worstStart, a.at.Sub(start))
			case <-ctx.Done():
				b.Fatal("a watcher never applied the change")
			}
			break
		}
	}
	l.lastOf = append(l.lastOf, worst)
	l.lastOfStart = append(l.lastOfStart, worstStart)
}

// propagationEtcd is the anchor: n clientv3 clients, each on its own
// connection with its own watch, and a Put per change.
func propagationEtcd(ctx context.Context, b *testing.B, addr string, n, changes int) *latencies {
	seen := make([]chan applied, n)
	var wg sync.WaitGroup
	wctx, wcancel := context.WithCancel(ctx)
	defer func() { wcancel(); wg.Wait() }()
	for i := range n {
		cli := etcdClient(b, addr)
		seen[i] = make(chan applied, changes+16)
		wch := cli.Watch(wctx, "/bench/raw/", clientv3.WithPrefix(), clientv3.WithCreatedNotify())
		<-wch // created
		wg.Add(1)
		go func() {
			defer wg.Done()
			for resp := range wch {
				now := time.Now()
				for _, ev := range resp.Events {
					seen[i] <- applied{ev.Kv.ModRevision, now}
				}
			}
		}()
	}
	writer := etcdClient(b, addr)
	for i := range warmUp {
		start := time.Now()
		resp, err := writer.Put(ctx, fmt.Sprintf("/bench/raw/i-%d", i%50), fmt.Sprintf(`{"address":"127.0.0.1","port":%d}`, 1+i%60000))
		if err != nil {
			b.Fatal(err)
		}
		collect(ctx, b, seen, resp.Header.Revision, start, time.Now(), &latencies{})
	}
	l := &latencies{}
	cpu0 := processCPU()
	defer func() { l.cpu = processCPU() - cpu0 }()
	for i := range changes {
		start := time.Now()
		resp, err := writer.Put(ctx, fmt.Sprintf("/bench/raw/i-%d", i%50), fmt.Sprintf(`{"address":"127.0.0.1","port":%d}`, 1+i%60000))
		if err != nil {
			b.Fatal(err)
		}
		collect(ctx, b, seen, resp.Header.Revision, start, time.Now(), l)
	}
	return l
}

// BenchmarkRegisterThroughput: 16 concurrent clients registering ephemeral
// instances through beacon, one per call and then 100 per RegisterMany,
// beside 16 clientv3 clients doing Put with a lease on the same etcd, in
// the same run.
func BenchmarkRegisterThroughput(b *testing.B) {
	const workers = 16
	srv, etcdAddr := benchServer(b)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	sessions := make([]*client.Session, workers)
	for i := range sessions {
		c, _ := client.New([]string{srv.Addr()})
		defer c.Close()
		s, err := c.NewSession(ctx)
		if err != nil {
			b.Fatal(err)
		}
		defer s.Close(context.Background())
		sessions[i] = s
	}
	leases := make([]clientv3.LeaseID, workers)
	clis := make([]*clientv3.Client, workers)
	for i := range clis {
		clis[i] = etcdClient(b, etcdAddr)
		l, err := clis[i].Grant(ctx, 10)
		if err != nil {
			b.Fatal(err)
		}
		ka, err := clis[i].KeepAlive(ctx, l.ID)
		if err != nil {
			b.Fatal(err)
		}
		go func() {
			for range ka {
			}
		}()
		leases[i] = l.ID
	}
	// Each run's rate, and the process's CPU per operation: clients,
	// server and etcd alike are in this process, for both.
	run := func(op func(worker, i int) error) (float64, time.Duration) {
		cpu0 := processCPU()
		rate := throughput(b, workers, b.N, op)
		return rate, (processCPU() - cpu0) / time.Duration(b.N)
	}
	b.ResetTimer()
	beacon, beaconCPU := run(func(w, i int) error {
		_, err := sessions[w].Register(ctx, registry.Instance{Service: fmt.Sprintf("svc-%d", i%20), ID: fmt.Sprintf("i-%d", i%2000), Address: "127.0.0.1", Port: 1 + i%60000})
		return err
	})
	raw, rawCPU := run(func(w, i int) error {
		in := registry.Instance{Service: fmt.Sprintf("svc-%d", i%20), ID: fmt.Sprintf("i-%d", i%2000), Address: "127.0.0.1", Port: 1 + i%60000}
		in.ApplyDefaults()
		_, err := clis[w].Put(ctx, fmt.Sprintf("/bench/raw/ns/default/svc/%s/inst/%s", in.Service, in.ID), rawRecord(&in), clientv3.WithLease(leases[w]))
		return err
	})
	// As many registrations, each session putting batchSize at a time
	// with RegisterMany (one RegisterBatch call).
	const batchSize = 100
	batchRun := func(op func(worker, i int) error) float64 { return throughput(b, workers, max(1, b.N/batchSize), op) }
	batches := batchRun(func(w, i int) error {
		ins := make([]registry.Instance, batchSize)
		for j := range ins {
			k := (i*batchSize + j) % 2000
			ins[j] = registry.Instance{Service: fmt.Sprintf("svc-%d", k%20), ID: fmt.Sprintf("i-%d", k), Address: "127.0.0.1", Port: 1 + k}
		}
		_, err := sessions[w].RegisterMany(ctx, ins)
		return err
	})
	b.StopTimer()
	b.ReportMetric(beacon, "beacon-registrations/s")
	b.ReportMetric(raw, "etcd-puts/s")
	b.ReportMetric(beacon/raw, "ratio")
	b.ReportMetric(float64(beaconCPU)/1e3, "beacon-cpu-µs/registration")
	b.ReportMetric(float64(rawCPU)/1e3, "etcd-cpu-µs/put")
	b.ReportMetric(batches*batchSize, "beacon-batched-registrations/s")
	b.ReportMetric(batches*batchSize/raw, "batched-ratio")
	b.ReportMetric(0, "ns/op")
}

// throughput runs n operations on workers goroutines (op gets the
// worker's index and the operation's, from 1) and returns operations per
// second.
func throughput(b *testing.B, workers, n int, op func(worker, i int) error) float64 {
	var next atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1))
				if i > n {
					return
				}
				if err := op(w, i); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	return float64(n) / time.Since(start).Seconds()
}

func rawRecord(in *registry.Instance) string {
	return fmt.Sprintf(`{"address":%q,"port":%d,"weight":%d,"status":"UP","health":"PASSING"}`, in.Address, in.Port, in.Weight)
}

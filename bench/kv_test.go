package bench

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/config"
)

// BenchmarkKVPut: 16 concurrent clients writing KV keys through beacon
// (each write also appends the key's history record, in the same etcd
// transaction) beside 16 clientv3 clients doing plain Puts on the same
// etcd, in the same run.
func BenchmarkKVPut(b *testing.B) {
	const workers = 16
	srv, etcdAddr := benchServer(b)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	value := []byte(strings.Repeat("v", 200))
	kvs := make([]*client.KV, workers)
	for i := range kvs {
		c, err := client.New([]string{srv.Addr()})
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		kvs[i] = c.KV()
	}
	clis := make([]*clientv3.Client, workers)
	for i := range clis {
		clis[i] = etcdClient(b, etcdAddr)
	}
	b.ResetTimer()
	beacon := throughput(b, workers, b.N, func(w, i int) error {
		_, err := kvs[w].Put(ctx, fmt.Sprintf("bench/key-%d", i%500), value)
		return err
	})
	raw := throughput(b, workers, b.N, func(w, i int) error {
		_, err := clis[w].Put(ctx, fmt.Sprintf("/bench/raw/key-%d", i%500), string(value))
		return err
	})
	b.StopTimer()
	b.ReportMetric(beacon, "beacon-puts/s")
	b.ReportMetric(raw, "etcd-puts/s")
	b.ReportMetric(beacon/raw, "ratio")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkKVWatchPropagation: a config change → applied by the last of
// N config.Bind clients (each on its own connection: watch, decode,
// validate, atomic swap), beside N clientv3 watches of the same etcd, in
// the same run. Run with -benchtime=Nx changes.
func BenchmarkKVWatchPropagation(b *testing.B) {
	for _, n := range []int{1, 100, 1000} {
		b.Run(fmt.Sprintf("N=%d", n), func(b *testing.B) {
			srv, etcdAddr := benchServer(b)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
			defer cancel()
			beacon := propagationKV(ctx, b, srv.Addr(), n, b.N)
			raw := propagationEtcd(ctx, b, etcdAddr, n, b.N)
			for name, l := range map[string]*latencies{"beacon": beacon, "etcd": raw} {
				b.ReportMetric(ms(l.quantile(l.lastOfStart, 0.5)), name+"-from-start-last-of-N-p50-ms")
				b.ReportMetric(ms(l.quantile(l.lastOfStart, 0.99)), name+"-from-start-last-of-N-p99-ms")
				b.ReportMetric(float64(l.cpu.Microseconds())/float64(b.N*n), name+"-cpu-us-per-change-per-watcher")
			}
			b.ReportMetric(float64(beacon.quantile(beacon.lastOfStart, 0.99))/float64(raw.quantile(raw.lastOfStart, 0.99)), "from-start-last-of-N-p99-ratio")
			b.ReportMetric(0, "ns/op")
		})
	}
}

func propagationKV(ctx context.Context, b *testing.B, addr string, n, changes int) *latencies {
	type flag struct {
		Port int `json:"port"`
	}
	seen := make([]chan applied, n)
	for i := range n {
		c, err := client.New([]string{addr})
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		seen[i] = make(chan applied, changes+warmUp+16)
		ch := seen[i]
		bound, err := config.Bind(ctx, c, "bench/flag", config.Default(flag{}),
			config.Validate(func(f flag) error {
				if f.Port < 0 {
					return fmt.Errorf("port %d", f.Port)
				}
				return nil
			}),
			config.OnEvent(func(e config.Event[flag]) {
				if e.New != nil {
					ch <- applied{e.Revision, time.Now()}
				}
			}))
		if err != nil {
			b.Fatal(err)
		}
		defer bound.Close()
	}
	writer, err := client.New([]string{addr})
	if err != nil {
		b.Fatal(err)
	}
	defer writer.Close()
	kv := writer.KV()
	write := func(i int) int64 {
		rev, err := kv.Put(ctx, "bench/flag", fmt.Appendf(nil, `{"port":%d}`, 1+i%60000))
		if err != nil {
			b.Fatal(err)
		}
		return rev
	}
	for i := range warmUp {
		start := time.Now()
		collect(ctx, b, seen, write(i), start, time.Now(), &latencies{})
	}
	l := &latencies{}
	b.ResetTimer()
	cpu0 := processCPU()
	defer func() { l.cpu = processCPU() - cpu0 }()
	for i := range changes {
		start := time.Now()
		rev := write(i)
		collect(ctx, b, seen, rev, start, time.Now(), l)
	}
	return l
}

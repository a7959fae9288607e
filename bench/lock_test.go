package bench

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/client/v3/concurrency"

	"beacon.dev/beacon/client"
)

// BenchmarkLock: an uncontended lock acquired and released by beacon's
// SDK (client.Mutex, fencing token included) beside etcd's
// concurrency.Mutex on the same etcd, in the same run: latency per
// acquire+release, and throughput with 8 contenders on one lock.
func BenchmarkLock(b *testing.B) {
	srv, etcdAddr := benchServer(b)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	beaconCycle := func(m *client.Mutex) error {
		h, err := m.Lock(ctx)
		if err != nil {
			return err
		}
		return h.Unlock(ctx)
	}
	etcdCycle := func(m *concurrency.Mutex) error {
		if err := m.Lock(ctx); err != nil {
			return err
		}
		return m.Unlock(ctx)
	}
	// Uncontended latency.
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	s, err := c.NewSession(ctx)
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close(ctx)
	es, err := concurrency.NewSession(etcdClient(b, etcdAddr), concurrency.WithTTL(10))
	if err != nil {
		b.Fatal(err)
	}
	defer es.Close()
	bm, em := c.Mutex(s, "bench/lock"), concurrency.NewMutex(es, "/bench/raw/lock")
	b.ResetTimer()
	var bl, el []time.Duration
	for range b.N {
		t0 := time.Now()
		if err := beaconCycle(bm); err != nil {
			b.Fatal(err)
		}
		bl = append(bl, time.Since(t0))
		t0 = time.Now()
		if err := etcdCycle(em); err != nil {
			b.Fatal(err)
		}
		el = append(el, time.Since(t0))
	}
	b.StopTimer()
	p50 := func(d []time.Duration) float64 { slices.Sort(d); return ms(d[len(d)/2]) }
	bp, ep := p50(bl), p50(el)
	b.ReportMetric(bp, "beacon-acquire-release-p50-ms")
	b.ReportMetric(ep, "etcd-acquire-release-p50-ms")
	b.ReportMetric(bp/ep, "latency-ratio")

	// Contended throughput: 8 sessions on one lock, b.N cycles each side.
	const contenders = 8
	run := func(cycle func(i int) error) float64 {
		var wg sync.WaitGroup
		per := max(1, b.N/contenders)
		start := time.Now()
		for i := range contenders {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range per {
					if err := cycle(i); err != nil {
						b.Error(err)
						return
					}
				}
			}()
		}
		wg.Wait()
		return float64(per*contenders) / time.Since(start).Seconds()
	}
	bms := make([]*client.Mutex, contenders)
	ems := make([]*concurrency.Mutex, contenders)
	for i := range contenders {
		ci, err := client.New([]string{srv.Addr()})
		if err != nil {
			b.Fatal(err)
		}
		defer ci.Close()
		si, err := ci.NewSession(ctx)
		if err != nil {
			b.Fatal(err)
		}
		bms[i] = ci.Mutex(si, "bench/contended")
		esi, err := concurrency.NewSession(etcdClient(b, etcdAddr), concurrency.WithTTL(10))
		if err != nil {
			b.Fatal(err)
		}
		defer esi.Close()
		ems[i] = concurrency.NewMutex(esi, "/bench/raw/contended")
	}
	bt := run(func(i int) error { return beaconCycle(bms[i]) })
	et := run(func(i int) error { return etcdCycle(ems[i]) })
	b.ReportMetric(bt, "beacon-contended-locks/s")
	b.ReportMetric(et, "etcd-contended-locks/s")
	b.ReportMetric(bt/et, "throughput-ratio")
	b.ReportMetric(0, "ns/op")
}

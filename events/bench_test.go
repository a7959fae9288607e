package events_test

import (
	"context"
	"encoding/binary"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"beacon.dev/beacon/events"
)

// BenchmarkConsume: b.N events already on a 4-partition topic of
// franz-go's kfake cluster, run in a process of its own (as a broker is),
// consumed by a group from the start, beside franz-go
// used directly in the same run (a group consumer polling, handling each
// poll's records in turn and committing them: what an application without
// beacon writes). handler=none handles nothing: the machinery's cost.
// handler=1ms-wait waits 1 ms per event, as a handler calling a database
// does: there beacon's workers (4 per partition, by key) work at once.
func BenchmarkConsume(b *testing.B) {
	b.Run("handler=none", func(b *testing.B) { benchConsume(b, func() {}) })
	b.Run("handler=1ms-wait", func(b *testing.B) { benchConsume(b, func() { time.Sleep(time.Millisecond) }) })
}

func benchConsume(b *testing.B, work func()) {
	brokers := newBrokerProcess(b, "load")
	p := newProducer(b, brokers)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	n := b.N
	for i := 0; i < n; i += 1000 {
		batch := make([]*events.Event, 0, 1000)
		for j := i; j < min(n, i+1000); j++ {
			batch = append(batch, &events.Event{Topic: "load", Key: binary.AppendUvarint(nil, uint64(j%64)), Value: make([]byte, 100)})
		}
		if err := p.Publish(ctx, batch...); err != nil {
			b.Fatal(err)
		}
	}
	// A first group reads everything, untimed: both runs below find the
	// cluster warm.
	warm, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ConsumerGroup("warm"), kgo.ConsumeTopics("load"))
	if err != nil {
		b.Fatal(err)
	}
	for got := 0; got < n && ctx.Err() == nil; {
		got += len(warm.PollRecords(ctx, 10000).Records())
	}
	warm.Close()
	b.ResetTimer()
	cpu0 := cpuNow()
	start := time.Now()
	var handled atomic.Int64
	done := make(chan struct{})
	c, err := events.NewConsumer(events.ConsumerConfig{Config: events.Config{Brokers: brokers}, Group: "beacon", Topics: []string{"load"},
		Handler: func(context.Context, *events.Event) error {
			work()
			if handled.Add(1) == int64(n) {
				close(done)
			}
			return nil
		}})
	if err != nil {
		b.Fatal(err)
	}
	rctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { c.Run(rctx) })
	select {
	case <-done:
	case <-ctx.Done():
		b.Fatal("beacon's consumer did not finish")
	}
	beacon := time.Since(start)
	cpu1 := cpuNow()
	stop()
	wg.Wait()
	cpu2 := cpuNow()

	start = time.Now()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ConsumerGroup("raw"), kgo.ConsumeTopics("load"), kgo.DisableAutoCommit())
	if err != nil {
		b.Fatal(err)
	}
	got := 0
	for got < n && ctx.Err() == nil {
		fs := cl.PollRecords(ctx, events.DefaultMaxPollRecords)
		recs := fs.Records()
		for range recs {
			work()
		}
		got += len(recs)
		if err := cl.CommitRecords(ctx, recs...); err != nil {
			b.Fatal(err)
		}
	}
	raw := time.Since(start)
	cpu3 := cpuNow()
	cl.Close()
	b.StopTimer()
	b.ReportMetric(float64(n)/beacon.Seconds(), "beacon-events/s")
	b.ReportMetric(float64(n)/raw.Seconds(), "franz-go-events/s")
	b.ReportMetric(raw.Seconds()/beacon.Seconds(), "throughput-ratio")
	// The process's CPU per event (the broker runs in another).
	b.ReportMetric(float64((cpu1-cpu0).Nanoseconds())/float64(n), "beacon-cpu-ns/event")
	b.ReportMetric(float64((cpu3-cpu2).Nanoseconds())/float64(n), "franz-go-cpu-ns/event")
	b.ReportMetric(0, "ns/op")
}

// BenchmarkPublishToHandled: one event at a time, published and waited
// for until its handler ran, through beacon's producer and consumer, and
// through franz-go's producer and a group consumer used directly, in the
// same run: p50 and p99 from Publish's start to the handler.
func BenchmarkPublishToHandled(b *testing.B) {
	brokers := newBrokerProcess(b, "lat-beacon", "lat-raw")
	p := newProducer(b, brokers)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	arrived := make(chan struct{}, 1)
	c, err := events.NewConsumer(events.ConsumerConfig{Config: events.Config{Brokers: brokers}, Group: "beacon", Topics: []string{"lat-beacon"},
		Handler: func(context.Context, *events.Event) error { arrived <- struct{}{}; return nil }})
	if err != nil {
		b.Fatal(err)
	}
	rctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { c.Run(rctx) })
	defer func() { stop(); wg.Wait() }()

	raw, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ConsumerGroup("raw"), kgo.ConsumeTopics("lat-raw"), kgo.DisableAutoCommit(),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		b.Fatal(err)
	}
	defer raw.Close()
	rawProducer, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		b.Fatal(err)
	}
	defer rawProducer.Close()
	rawArrived := make(chan struct{}, 1)
	wg.Go(func() {
		for rctx.Err() == nil {
			fs := raw.PollRecords(rctx, events.DefaultMaxPollRecords)
			recs := fs.Records()
			for range recs {
				rawArrived <- struct{}{}
			}
			_ = raw.CommitRecords(context.WithoutCancel(rctx), recs...)
		}
	})
	measure := func(send func() error, wait chan struct{}) []time.Duration {
		var out []time.Duration
		for range b.N + 5 { // 5 untimed first events: the group joins
			start := time.Now()
			if err := send(); err != nil {
				b.Fatal(err)
			}
			select {
			case <-wait:
			case <-ctx.Done():
				b.Fatal("an event was not handled")
			}
			out = append(out, time.Since(start))
		}
		out = out[5:]
		slices.Sort(out)
		return out
	}
	b.ResetTimer()
	bl := measure(func() error {
		return p.Publish(ctx, &events.Event{Topic: "lat-beacon", Key: []byte("k"), Value: []byte("v")})
	}, arrived)
	rl := measure(func() error {
		return rawProducer.ProduceSync(ctx, &kgo.Record{Topic: "lat-raw", Key: []byte("k"), Value: []byte("v")}).FirstErr()
	}, rawArrived)
	b.StopTimer()
	q := func(d []time.Duration, f float64) float64 {
		return float64(d[int(f*float64(len(d)-1))].Microseconds()) / 1000
	}
	b.ReportMetric(q(bl, 0.5), "beacon-p50-ms")
	b.ReportMetric(q(bl, 0.99), "beacon-p99-ms")
	b.ReportMetric(q(rl, 0.5), "franz-go-p50-ms")
	b.ReportMetric(q(rl, 0.99), "franz-go-p99-ms")
	b.ReportMetric(q(bl, 0.99)/q(rl, 0.99), "p99-ratio")
	b.ReportMetric(0, "ns/op")
}

// cpuNow is the CPU time this process used so far.
func cpuNow() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

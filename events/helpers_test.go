package events_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"beacon.dev/beacon/events"
	"beacon.dev/beacon/policy"
)

// newCluster starts franz-go's in-process Kafka cluster (it speaks the
// Kafka protocol on 127.0.0.1) with the topics, 4 partitions each, and
// their dead-letter topics.
func newCluster(t testing.TB, topics ...string) []string {
	t.Helper()
	var all []string
	for _, tp := range topics {
		all = append(all, tp, tp+events.DefaultDeadLetterSuffix)
	}
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(4, all...))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c.ListenAddrs()
}

// newBrokerProcess runs the in-process cluster of newCluster in a child
// process of this binary, for benchmarks: a real broker is never in its
// consumers' heap, and kfake's store (every event published) in the
// benchmark's own would make each of its garbage collections mark it.
func newBrokerProcess(t testing.TB, topics ...string) []string {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"=broker", childTopicsEnv+"="+strings.Join(topics, ","))
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	// The child serves until its stdin closes: at the cleanup, or when
	// this process dies without one.
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = in.Close(); _ = cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("broker process: %v", err)
	}
	return strings.Split(strings.TrimSpace(line), ",")
}

// runBroker is the child of newBrokerProcess: it prints the cluster's
// addresses and serves until its stdin closes (its parent is done, or
// gone).
func runBroker() int {
	var all []string
	for _, tp := range strings.Split(os.Getenv(childTopicsEnv), ",") {
		all = append(all, tp, tp+events.DefaultDeadLetterSuffix)
	}
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(4, all...))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer c.Close()
	fmt.Println(strings.Join(c.ListenAddrs(), ","))
	_, _ = io.Copy(io.Discard, os.Stdin)
	return 0
}

const childTopicsEnv = "BEACON_EVENTS_TOPICS"

func newProducer(t testing.TB, brokers []string) *events.Producer {
	t.Helper()
	p, err := events.NewProducer(events.Config{Brokers: brokers})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

// fastRetry retries quickly, with no budget cap, for tests.
func fastRetry(attempts int) policy.RetryConfig {
	b, _ := policy.NewBudget(policy.BudgetConfig{Ratio: 1, MinPerSecond: 1000})
	return policy.RetryConfig{MaxAttempts: attempts, BaseBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond, Budget: b}
}

// running is a consumer running in the background until stop.
type running struct {
	c    *events.Consumer
	stop context.CancelFunc
	done chan error
	once sync.Once
}

func startConsumer(t testing.TB, cfg events.ConsumerConfig) *running {
	t.Helper()
	c, err := events.NewConsumer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{c: c, stop: cancel, done: make(chan error, 1)}
	go func() { r.done <- c.Run(ctx) }()
	t.Cleanup(func() { r.Stop(t) })
	return r
}

// Stop drains the consumer and waits for Run to return.
func (r *running) Stop(t testing.TB) {
	r.once.Do(func() {
		r.stop()
		select {
		case err := <-r.done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(2 * time.Minute): // liveness only
			t.Error("the consumer did not stop")
		}
	})
}

// tally records what handlers saw, safe for concurrent use.
type tally struct {
	mu    sync.Mutex
	byKey map[string][]string // values in handling order
	ids   map[string]int      // handlings per event id
}

func newTally() *tally { return &tally{byKey: map[string][]string{}, ids: map[string]int{}} }

func (tl *tally) add(ev *events.Event) {
	tl.mu.Lock()
	defer tl.mu.Unlock()
	tl.byKey[string(ev.Key)] = append(tl.byKey[string(ev.Key)], string(ev.Value))
	tl.ids[ev.ID]++
}

func (tl *tally) distinct() int {
	tl.mu.Lock()
	defer tl.mu.Unlock()
	return len(tl.ids)
}

func (tl *tally) total() int {
	tl.mu.Lock()
	defer tl.mu.Unlock()
	n := 0
	for _, c := range tl.ids {
		n += c
	}
	return n
}

// publishSeq publishes n events over keys k0…k(keys-1), each key's values
// numbered 0, 1, … in publishing order.
func publishSeq(t testing.TB, p *events.Producer, topic string, n, keys int) []*events.Event {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	next := make([]int, keys)
	var out []*events.Event
	for i := 0; i < n; i += 100 {
		var batch []*events.Event
		for j := i; j < min(n, i+100); j++ {
			k := j % keys
			batch = append(batch, &events.Event{Topic: topic, Key: fmt.Appendf(nil, "k%d", k), Value: fmt.Appendf(nil, "%d", next[k])})
			next[k]++
		}
		if err := p.Publish(ctx, batch...); err != nil {
			t.Fatal(err)
		}
		out = append(out, batch...)
	}
	return out
}

// readAll reads every record of topic from the start until want records
// came (or a minute passed).
func readAll(t testing.TB, brokers []string, topic string, want int) []*kgo.Record {
	t.Helper()
	return readUntil(t, brokers, topic, time.Minute, func(recs []*kgo.Record) bool { return len(recs) >= want })
}

// readUntil reads topic from the start until done says so (or the
// liveness bound passed), and returns what it read.
func readUntil(t testing.TB, brokers []string, topic string, bound time.Duration, done func([]*kgo.Record) bool) []*kgo.Record {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ConsumeTopics(topic))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	var out []*kgo.Record
	for !done(out) && ctx.Err() == nil {
		cl.PollFetches(ctx).EachRecord(func(r *kgo.Record) { out = append(out, r) })
	}
	return out
}

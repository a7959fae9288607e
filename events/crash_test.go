package events_test

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/events"
	"beacon.dev/beacon/internal/testutil"
)

const (
	childEnv         = "BEACON_EVENTS_CHILD"
	childBrokersEnv  = "BEACON_EVENTS_BROKERS"
	childRegistryEnv = "BEACON_EVENTS_REGISTRY"
)

// runChild runs the child process the environment asks for.
func runChild() int {
	switch os.Getenv(childEnv) {
	case "relay":
		return runRelay()
	case "broker":
		return runBroker()
	}
	return runTracking()
}

// runTracking is a tracking consumer process: it counts each user's events
// into beacon KV (agg/USER), once per event, until SIGTERM.
func runTracking() int {
	c, err := client.New([]string{os.Getenv(childRegistryEnv)})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer c.Close()
	d, err := events.NewKVDedup(c.KV(), "dedup/tracking/", 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	cons, err := events.NewConsumer(events.ConsumerConfig{
		Config: events.Config{Brokers: strings.Split(os.Getenv(childBrokersEnv), ","), Logger: slog.New(slog.NewTextHandler(os.Stderr, nil))},
		Group:  "tracking", Topics: []string{"behaviour"}, MaxPollRecords: 100,
		Handler: func(ctx context.Context, ev *events.Event) error {
			_, err := countOnce(ctx, c.KV(), d, "agg/"+string(ev.Key), ev)
			return err
		},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	if err := cons.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Printf("drained: %+v\n", cons.Stats())
	return 0
}

type child struct {
	cmd  *exec.Cmd
	out  *bytes.Buffer
	mu   *sync.Mutex // guards out
	done chan error
}

// output is what the child printed so far.
func (ch *child) output() string {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	return ch.out.String()
}

func startChild(t *testing.T, brokers []string, registry string) *child {
	t.Helper()
	return startChildAs(t, "tracking", brokers, registry)
}

func startChildAs(t *testing.T, role string, brokers []string, registry string) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+role, childBrokersEnv+"="+strings.Join(brokers, ","), childRegistryEnv+"="+registry)
	ch := &child{cmd: cmd, out: &bytes.Buffer{}, mu: &sync.Mutex{}, done: make(chan error, 1)}
	cmd.Stdout, cmd.Stderr = lockedWriter{ch.mu, ch.out}, lockedWriter{ch.mu, ch.out}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { ch.done <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-ch.done
	})
	return ch
}

type lockedWriter struct {
	mu *sync.Mutex
	w  *bytes.Buffer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// wait waits for the child to exit (a liveness bound only).
func (ch *child) wait(t *testing.T) error {
	t.Helper()
	select {
	case err := <-ch.done:
		ch.done <- err // for the cleanup
		return err
	case <-time.After(2 * time.Minute):
		t.Fatalf("the child process did not exit:\n%s", ch.output())
		return nil
	}
}

// aggregates reads every user's count.
func aggregates(ctx context.Context, kv *client.KV) (map[string]int, int, error) {
	kvs, _, err := kv.List(ctx, "agg/")
	if err != nil {
		return nil, 0, err
	}
	m, sum := map[string]int{}, 0
	for _, e := range kvs {
		n, _ := strconv.Atoi(string(e.Value))
		m[strings.TrimPrefix(e.Key, "agg/")] = n
		sum += n
	}
	return m, sum, nil
}

// The seeds' tracking consumers as real processes: one is SIGKILLed while
// it handles a batch; its partitions move to the others, its unfinished
// events are delivered again and the dedup absorbs those it had applied:
// every user's count is exact over 10,000 events.
func TestKilledConsumerLosesNothingAndCountsNothingTwice(t *testing.T) {
	if testing.Short() {
		t.Skip("starts consumer processes")
	}
	brokers := newCluster(t, "behaviour")
	srv := testutil.StartBeacon(t)
	c := newKV(t, srv.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	a := startChild(t, brokers, srv.Addr())
	b := startChild(t, brokers, srv.Addr())
	const total, users = 10000, 50
	p := newProducer(t, brokers)
	want := map[string]int{}
	for i := 0; i < total; i += 500 {
		batch := make([]*events.Event, 0, 500)
		for j := i; j < i+500; j++ {
			u := "u" + strconv.Itoa(j%users)
			want[u]++
			batch = append(batch, &events.Event{Topic: "behaviour", Key: []byte(u), Value: []byte("view")})
		}
		if err := p.Publish(ctx, batch...); err != nil {
			t.Fatal(err)
		}
	}
	var atKill int
	testutil.Eventually(t, 3*time.Minute, "a fifth of the events counted", func() bool {
		_, sum, err := aggregates(ctx, c.KV())
		atKill = sum
		return err == nil && sum >= total/5
	})
	if err := a.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	a.wait(t)
	if atKill >= total {
		t.Fatalf("every event was counted before the kill (%d): the test proves nothing", atKill)
	}
	c3 := startChild(t, brokers, srv.Addr())
	defer func() {
		if t.Failed() {
			_, sum, err := aggregates(ctx, c.KV())
			t.Logf("counted %d (%v); the consumers said:\n--- b:\n%s\n--- c3:\n%s", sum, err, b.output(), c3.output())
		}
	}()
	testutil.Eventually(t, 4*time.Minute, "every event counted", func() bool {
		_, sum, err := aggregates(ctx, c.KV())
		return err == nil && sum >= total
	})
	// The survivors drain and exit cleanly; then nothing may move.
	for _, ch := range []*child{b, c3} {
		_ = ch.cmd.Process.Signal(syscall.SIGTERM)
		if err := ch.wait(t); err != nil {
			t.Errorf("consumer exited with %v:\n%s", err, ch.output())
		}
	}
	got, sum, err := aggregates(ctx, c.KV())
	if err != nil {
		t.Fatal(err)
	}
	if sum != total {
		t.Errorf("counted %d events, want %d", sum, total)
	}
	for u, n := range want {
		if got[u] != n {
			t.Errorf("user %s: %d, want %d", u, got[u], n)
		}
	}
	t.Logf("killed one consumer at %d of %d counted; survivors: %s%s", atKill, total, b.output(), c3.output())
}

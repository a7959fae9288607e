package events_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/events"
	"beacon.dev/beacon/internal/testutil"
)

const outboxPrefix = "outbox/orders/"

// runRelay is an outbox relay process: it says its session, then relays
// until SIGTERM.
func runRelay() int {
	c, err := client.New([]string{os.Getenv(childRegistryEnv)})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer c.Close()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	sess, err := c.NewSession(ctx, client.WithTTL(2*time.Second))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	p, err := events.NewProducer(events.Config{Brokers: strings.Split(os.Getenv(childBrokersEnv), ",")})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer p.Close()
	o, err := events.NewOutbox(c.KV(), outboxPrefix, 0, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Printf("session %d\n", sess.ID())
	if err := o.Relay(ctx, c, sess, p); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// The outbox's promise with real relay processes: orders are written with
// their events in one transaction while the leading relay is SIGKILLed;
// another takes over and every event reaches the topic, each key's in the
// order written (a republished duplicate may follow, with the same id).
func TestOutboxLosesNothingWhenItsRelayIsKilled(t *testing.T) {
	if testing.Short() {
		t.Skip("starts relay processes")
	}
	brokers := newCluster(t, "orders")
	srv := testutil.StartBeacon(t)
	c := newKV(t, srv.Addr())
	o, err := events.NewOutbox(c.KV(), outboxPrefix, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	relays := []*child{startChildAs(t, "relay", brokers, srv.Addr()), startChildAs(t, "relay", brokers, srv.Addr())}

	const total, keys = 600, 10
	var ids []string
	put := func(n int) {
		ev := &events.Event{Topic: "orders", Key: fmt.Appendf(nil, "k%d", n%keys), Value: []byte(strconv.Itoa(n / keys))}
		if _, err := o.Put(ctx, []client.KVOp{client.OpPut("orders/"+strconv.Itoa(n), []byte("placed"))}, ev); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, ev.ID)
	}
	for n := range total / 3 {
		put(n)
	}
	// Kill the leader once it has published some.
	testutil.Eventually(t, 2*time.Minute, "events published", func() bool { return len(readAll(t, brokers, "orders", 1)) > 0 })
	var leader *child
	testutil.Eventually(t, time.Minute, "a relay leads", func() bool {
		l, ok, err := c.Leader(ctx, outboxPrefix+"relay")
		if err != nil || !ok {
			return false
		}
		for _, r := range relays {
			if strings.Contains(r.output(), fmt.Sprintf("session %d\n", l.SessionID)) {
				leader = r
			}
		}
		return leader != nil
	})
	_ = leader.cmd.Process.Signal(syscall.SIGKILL)
	leader.wait(t)
	pending := 0
	if kvs, _, err := c.KV().List(ctx, outboxPrefix); err == nil {
		for _, kv := range kvs {
			pending += strings.Count(string(kv.Value), `"id"`)
		}
	}
	for n := total / 3; n < total; n++ {
		put(n)
	}
	startChildAs(t, "relay", brokers, srv.Addr())

	// Read until every id came (duplicates make more records).
	seen := map[string]bool{}
	var order []string
	recs := readUntil(t, brokers, "orders", 3*time.Minute, func(recs []*kgo.Record) bool {
		seen, order = map[string]bool{}, nil
		for _, r := range recs {
			id := headers(r)[events.HeaderID]
			if !seen[id] {
				seen[id] = true
				order = append(order, string(r.Key)+"="+string(r.Value))
			}
		}
		return len(seen) >= total
	})
	for _, id := range ids {
		if !seen[id] {
			t.Fatalf("event %s never published", id)
		}
	}
	next := map[string]int{}
	for _, kv := range order {
		k, v, _ := strings.Cut(kv, "=")
		if n, _ := strconv.Atoi(v); n != next[k] {
			t.Fatalf("key %s: value %d came where %d was due", k, n, next[k])
		}
		next[k]++
	}
	testutil.Eventually(t, time.Minute, "the outbox emptied", func() bool {
		kvs, _, err := c.KV().List(ctx, outboxPrefix)
		if err != nil {
			return false
		}
		for _, kv := range kvs {
			if strings.Contains(string(kv.Value), `"id"`) {
				return false
			}
		}
		return true
	})
	t.Logf("%d events, %d pending when the leader was killed, %d records on the topic (%d published again)", total, pending, len(recs), len(recs)-total)
}

// Put is all or nothing: a failing compare among the state change's ops
// enqueues nothing; a full shard refuses, naming the limit.
func TestOutboxPutIsAllOrNothing(t *testing.T) {
	srv := testutil.StartBeacon(t)
	c := newKV(t, srv.Addr())
	o, err := events.NewOutbox(c.KV(), "outbox/t/", 1, 2048)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err = o.Put(ctx, []client.KVOp{client.OpPut("state", []byte("x")).IfRevision(12345)}, &events.Event{Topic: "t", Value: []byte("e")})
	if !errors.Is(err, client.ErrCompareFailed) {
		t.Fatalf("Put with a failing compare = %v, want ErrCompareFailed", err)
	}
	if kvs, _, _ := c.KV().List(ctx, "outbox/t/"); len(kvs) != 0 {
		t.Errorf("the failed Put enqueued %v", kvs)
	}
	if _, err := c.KV().Get(ctx, "state"); !errors.Is(err, client.ErrNotFound) {
		t.Errorf("the failed Put wrote the state: %v", err)
	}
	// An event that could never fit is invalid; one that does not fit
	// behind those waiting makes the outbox full.
	_, err = o.Put(ctx, nil, &events.Event{Topic: "t", Value: make([]byte, 1500)})
	if !errors.Is(err, events.ErrInvalidEvent) || !strings.Contains(err.Error(), "2048") {
		t.Errorf("Put of an event larger than a shard = %v, want ErrInvalidEvent naming 2048", err)
	}
	if _, err := o.Put(ctx, nil, &events.Event{Topic: "t", Value: make([]byte, 800)}); err != nil {
		t.Fatal(err)
	}
	_, err = o.Put(ctx, nil, &events.Event{Topic: "t", Value: make([]byte, 800)})
	if !errors.Is(err, events.ErrOutboxFull) || !strings.Contains(err.Error(), "2048") {
		t.Errorf("Put over the shard's bytes = %v, want ErrOutboxFull naming 2048", err)
	}
	if _, err := o.Put(ctx, []client.KVOp{client.OpPut("state", []byte("x"))}, &events.Event{Topic: "t", Value: []byte("e")}); err != nil {
		t.Fatal(err)
	}
}

// An event refused for good (larger than the relay's producer takes) is
// parked, with the reason, and the events behind it in its shard go on.
func TestOutboxParksAnEventItCanNeverPublish(t *testing.T) {
	brokers := newCluster(t, "orders")
	srv := testutil.StartBeacon(t)
	c := newKV(t, srv.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	o, err := events.NewOutbox(c.KV(), "outbox/p/", 1, 0)
	if err != nil {
		t.Fatal(err)
	}
	p, err := events.NewProducer(events.Config{Brokers: brokers, MaxEventBytes: 1024})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	sess, err := c.NewSession(ctx, client.WithTTL(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	for _, ev := range []*events.Event{
		{Topic: "orders", Key: []byte("k"), Value: []byte("first")},
		{Topic: "orders", Key: []byte("k"), Value: make([]byte, 2000)},
		{Topic: "orders", Key: []byte("k"), Value: []byte("second")},
	} {
		if _, err := o.Put(ctx, nil, ev); err != nil {
			t.Fatal(err)
		}
	}
	rctx, stop := context.WithCancel(ctx)
	relayed := make(chan error, 1)
	go func() { relayed <- o.Relay(rctx, c, sess, p) }()
	var parked []events.Parked
	testutil.Eventually(t, 2*time.Minute, "the event parked", func() bool {
		parked, err = o.ParkedEvents(ctx)
		return err == nil && len(parked) > 0
	})
	if len(parked) != 1 || len(parked[0].Event.Value) != 2000 || !strings.Contains(parked[0].Error, "max event bytes") {
		t.Fatalf("parked %+v, want the 2000-byte event with its reason", parked)
	}
	// The events around it reach the topic in order (the one before it
	// may come twice: the relay publishes one by one to find the culprit).
	var order []string
	readUntil(t, brokers, "orders", 2*time.Minute, func(recs []*kgo.Record) bool {
		seen := map[string]bool{}
		order = nil
		for _, r := range recs {
			if id := headers(r)[events.HeaderID]; !seen[id] {
				seen[id] = true
				order = append(order, string(r.Value))
			}
		}
		return len(order) >= 2
	})
	stop()
	if err := <-relayed; err != nil {
		t.Errorf("Relay: %v", err)
	}
	if !slices.Equal(order, []string{"first", "second"}) {
		t.Fatalf("the topic holds %v, want [first second]", order)
	}
}

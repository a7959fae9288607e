package events_test

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"beacon.dev/beacon/events"
	"beacon.dev/beacon/internal/testutil"
)

// inOrder reports the first key whose values were not handled in
// publishing order (redeliveries may repeat a suffix: a value may come
// again, never one before it was first handled).
func inOrder(tl *tally) (string, bool) {
	tl.mu.Lock()
	defer tl.mu.Unlock()
	for k, vs := range tl.byKey {
		next := 0 // the value expected next for the first time
		for _, v := range vs {
			n, _ := strconv.Atoi(v)
			if n > next {
				return k + ": " + strings.Join(vs, ","), false
			}
			if n == next {
				next++
			}
		}
	}
	return "", true
}

// Two members share a group's partitions; a third joins midway and one
// leaves: every event is handled, each key's events in publishing order.
func TestGroupHandlesEveryEventInKeyOrder(t *testing.T) {
	brokers := newCluster(t, "orders")
	p := newProducer(t, brokers)
	tl := newTally()
	handler := func(_ context.Context, ev *events.Event) error {
		tl.add(ev)
		return nil
	}
	cfg := events.ConsumerConfig{Config: events.Config{Brokers: brokers}, Group: "g", Topics: []string{"orders"}, Handler: handler, MaxPollRecords: 50}
	a := startConsumer(t, cfg)
	b := startConsumer(t, cfg)
	published := publishSeq(t, p, "orders", 1000, 40)
	testutil.Eventually(t, time.Minute, "some events handled", func() bool { return tl.distinct() > 100 })
	c := startConsumer(t, cfg)
	a.Stop(t)
	published = append(published, publishSeq(t, p, "orders", 1000, 40)...)
	_ = b
	_ = c
	testutil.Eventually(t, 2*time.Minute, "every event handled", func() bool { return tl.distinct() == len(published) })
	if k, ok := inOrder(tl); !ok {
		t.Errorf("key %s handled out of order", k)
	}
	for _, ev := range published {
		if ev.ID == "" || ev.Offset < 0 {
			t.Fatalf("published event without id or offset: %+v", ev)
		}
	}
	t.Logf("handled %d events %d times", tl.distinct(), tl.total())
}

// An event whose handler always fails goes to the dead-letter topic after
// MaxAttempts, with where it came from and why; its partition moves on.
// A panicking handler counts as failing and the consumer survives it.
func TestPoisonEventGoesToDeadLetter(t *testing.T) {
	brokers := newCluster(t, "orders")
	p := newProducer(t, brokers)
	tl := newTally()
	var attempts atomic.Int64
	handler := func(_ context.Context, ev *events.Event) error {
		switch string(ev.Value) {
		case "poison":
			attempts.Add(1)
			return errors.New("cannot parse poison")
		case "panic":
			panic("handler bug")
		case "permanent":
			return events.Permanent(errors.New("not for us"))
		}
		tl.add(ev)
		return nil
	}
	r := startConsumer(t, events.ConsumerConfig{Config: events.Config{Brokers: brokers}, Group: "g", Topics: []string{"orders"}, Handler: handler, Retry: fastRetry(3)})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	key := []byte("same-key") // one partition, one worker: the poison is in the way
	evs := []*events.Event{{Topic: "orders", Key: key, Value: []byte("before")}, {Topic: "orders", Key: key, Value: []byte("poison")},
		{Topic: "orders", Key: key, Value: []byte("panic")}, {Topic: "orders", Key: key, Value: []byte("permanent")}, {Topic: "orders", Key: key, Value: []byte("after")}}
	if err := p.Publish(ctx, evs...); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, time.Minute, "the event after the poison handled", func() bool { return tl.distinct() == 2 })
	if got := tl.byKey["same-key"]; !slices.Equal(got, []string{"before", "after"}) {
		t.Errorf("handled %v, want [before after]", got)
	}
	if n := attempts.Load(); n != 3 {
		t.Errorf("the poison was tried %d times, want 3", n)
	}
	dead := readAll(t, brokers, "orders.dlq", 3)
	if len(dead) != 3 {
		t.Fatalf("%d dead letters, want 3", len(dead))
	}
	want := []struct{ value, attempts, err string }{{"poison", "3", "cannot parse poison"}, {"panic", "3", "handler panicked: handler bug"}, {"permanent", "1", "not for us"}}
	for i, d := range dead {
		h := headers(d)
		if string(d.Value) != want[i].value || h[events.HeaderDLQAttempts] != want[i].attempts || !strings.Contains(h[events.HeaderDLQError], want[i].err) ||
			h[events.HeaderDLQTopic] != "orders" || h[events.HeaderDLQOffset] != strconv.FormatInt(evs[i+1].Offset, 10) || h[events.HeaderID] != evs[i+1].ID {
			t.Errorf("dead letter %d: %q %v, want %+v from offset %d", i, d.Value, h, want[i], evs[i+1].Offset)
		}
	}
	r.Stop(t)
	if s := r.c.Stats(); s.DeadLettered != 3 || s.Handled != 2 || s.Retries != 4 {
		t.Errorf("stats %+v, want 2 handled, 4 retries, 3 dead-lettered", s)
	}
}

func headers(r *kgo.Record) map[string]string {
	m := map[string]string{}
	for _, h := range r.Headers {
		m[h.Key] = string(h.Value)
	}
	return m
}

// A record whose event id header is malformed (another producer's) is
// dead-lettered with the reason, not handled.
func TestMalformedEventIDIsDeadLettered(t *testing.T) {
	brokers := newCluster(t, "orders")
	tl := newTally()
	startConsumer(t, events.ConsumerConfig{Config: events.Config{Brokers: brokers}, Group: "g", Topics: []string{"orders"},
		Handler: func(_ context.Context, ev *events.Event) error { tl.add(ev); return nil }})
	raw, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	recs := []*kgo.Record{
		{Topic: "orders", Value: []byte("bad id"), Headers: []kgo.RecordHeader{{Key: events.HeaderID, Value: []byte("has a space")}}},
		{Topic: "orders", Value: []byte("no id")}, // a foreign producer's: handled, without an id
	}
	if err := raw.ProduceSync(ctx, recs...).FirstErr(); err != nil {
		t.Fatal(err)
	}
	dead := readAll(t, brokers, "orders.dlq", 1)
	if len(dead) != 1 || string(dead[0].Value) != "bad id" || !strings.Contains(headers(dead[0])[events.HeaderDLQError], events.HeaderID) {
		t.Fatalf("dead letters %v, want the bad id's, naming the header", dead)
	}
	testutil.Eventually(t, time.Minute, "the event without an id handled", func() bool { return tl.distinct() == 1 })
}

// A drain finishes what is in flight, commits it and leaves the group: the
// member that takes the partitions over handles none of it again. (One
// worker per partition: with more, an event finished after an earlier
// one of its partition that the drain left unstarted is past the
// committed offset, and is handled again — at least once.)
func TestDrainCommitsWhatItFinished(t *testing.T) {
	brokers := newCluster(t, "orders")
	p := newProducer(t, brokers)
	first, second := newTally(), newTally()
	release := make(chan struct{})
	var started atomic.Int64
	a := startConsumer(t, events.ConsumerConfig{Config: events.Config{Brokers: brokers}, Group: "g", Topics: []string{"orders"}, MaxPollRecords: 20, Workers: 1,
		Handler: func(ctx context.Context, ev *events.Event) error {
			started.Add(1)
			select {
			case <-release: // held until the drain starts
			case <-ctx.Done():
				return ctx.Err()
			}
			first.add(ev)
			return nil
		}})
	published := publishSeq(t, p, "orders", 400, 20)
	testutil.Eventually(t, time.Minute, "handlers in flight", func() bool { return started.Load() > 0 })
	a.stop()       // the drain begins: nothing new starts …
	close(release) // … and the handlers in flight finish
	a.Stop(t)
	startConsumer(t, events.ConsumerConfig{Config: events.Config{Brokers: brokers}, Group: "g", Topics: []string{"orders"},
		Handler: func(_ context.Context, ev *events.Event) error { second.add(ev); return nil }})
	testutil.Eventually(t, time.Minute, "every event handled", func() bool { return first.distinct()+second.distinct() >= len(published) })
	for id := range first.ids {
		if second.ids[id] > 0 {
			t.Fatalf("event %s finished in the drain was handled again", id)
		}
	}
	if first.distinct() == 0 {
		t.Fatal("the drain finished nothing: the test proves nothing")
	}
	if got := first.distinct() + second.distinct(); got != len(published) {
		t.Errorf("%d events handled, want %d", got, len(published))
	}
}

// Bad events are refused before anything is sent, each naming its field
// and limit.
func TestPublishRefusesBadEvents(t *testing.T) {
	brokers := newCluster(t, "orders")
	p, err := events.NewProducer(events.Config{Brokers: brokers, MaxEventBytes: 1024})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	many := make([]events.Header, events.MaxHeaders+1)
	for i := range many {
		many[i] = events.Header{Key: "h" + strconv.Itoa(i)}
	}
	for _, c := range []struct {
		ev   events.Event
		want string
	}{
		{events.Event{Topic: "orders", Value: make([]byte, 2000)}, "max event bytes"},
		{events.Event{Value: []byte("x")}, "topic"},
		{events.Event{Topic: "orders", Headers: many}, "MaxHeaders"},
		{events.Event{Topic: "orders", Headers: []events.Header{{Key: ""}}}, "headers[0].key"},
		{events.Event{Topic: "orders", Headers: []events.Header{{Key: events.HeaderID, Value: []byte("x")}}}, events.HeaderID},
		{events.Event{Topic: "orders", ID: "not ascii é"}, events.HeaderID},
		{events.Event{Topic: "orders", ID: strings.Repeat("x", events.MaxIDBytes+1)}, events.HeaderID},
	} {
		good := &events.Event{Topic: "orders", Value: []byte("good")}
		bad := c.ev
		if err := p.Publish(ctx, good, &bad); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("Publish(%.40v) = %v, want an error naming %q", c.ev, err, c.want)
		}
	}
	// Nothing was sent: the only record on the topic is the next good one.
	if err := p.Publish(ctx, &events.Event{Topic: "orders", Value: []byte("only")}); err != nil {
		t.Fatal(err)
	}
	if recs := readAll(t, brokers, "orders", 1); len(recs) != 1 || string(recs[0].Value) != "only" {
		t.Errorf("the topic holds %d records, want only the last good one", len(recs))
	}
}

func TestConsumerConfigErrorsNameTheField(t *testing.T) {
	h := func(context.Context, *events.Event) error { return nil }
	for _, c := range []struct {
		cfg  events.ConsumerConfig
		want string
	}{
		{events.ConsumerConfig{Group: "g", Topics: []string{"t"}, Handler: h}, "brokers"},
		{events.ConsumerConfig{Config: events.Config{Brokers: []string{"x:1"}}, Topics: []string{"t"}, Handler: h}, "group"},
		{events.ConsumerConfig{Config: events.Config{Brokers: []string{"x:1"}}, Group: "g", Handler: h}, "topics"},
		{events.ConsumerConfig{Config: events.Config{Brokers: []string{"x:1"}}, Group: "g", Topics: []string{"t"}}, "handler"},
		{events.ConsumerConfig{Config: events.Config{Brokers: []string{"x:1"}}, Group: "g", Topics: []string{"t"}, Handler: h, Workers: 1000}, "workers"},
	} {
		if _, err := events.NewConsumer(c.cfg); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("NewConsumer = %v, want an error naming %q", err, c.want)
		}
	}
}

package events_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	promtest "github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

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
	var where sync.Map // id → "partition/offset" as consumed
	handler := func(_ context.Context, ev *events.Event) error {
		tl.add(ev)
		where.Store(ev.ID, fmt.Sprintf("%d/%d", ev.Partition, ev.Offset))
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
	// Publish said where each event went, and it is where it was read.
	for _, ev := range published {
		if got, _ := where.Load(ev.ID); got != fmt.Sprintf("%d/%d", ev.Partition, ev.Offset) {
			t.Fatalf("event %s: published at %d/%d, consumed at %v", ev.ID, ev.Partition, ev.Offset, got)
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

// A consumer without its dead-letter topic does not start: Run says which
// topic is missing, instead of stopping at the first poison event.
func TestMissingDeadLetterTopicStopsRun(t *testing.T) {
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, "orders"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	cons, err := events.NewConsumer(events.ConsumerConfig{Config: events.Config{Brokers: c.ListenAddrs()}, Group: "g", Topics: []string{"orders"},
		Handler: func(context.Context, *events.Event) error { return nil }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := cons.Run(ctx); err == nil || !strings.Contains(err.Error(), `"orders.dlq"`) {
		t.Errorf("Run without orders.dlq = %v, want an error naming it", err)
	}
}

// A member joining while another handles a long round does not wait for
// that round: the rebalance hurries it (no new event starts, what finished
// is committed), so the newcomer gets its partition while the round is
// far from done.
func TestRebalanceHurriesTheRound(t *testing.T) {
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(2, "orders", "orders.dlq"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close) // after the consumers' (cleanups run last first)
	brokers := c.ListenAddrs()
	p := newProducer(t, brokers)
	published := publishSeq(t, p, "orders", 2000, 50)
	var a, b atomic.Int64
	var slow atomic.Bool // the first member's events are slow until the newcomer began
	slow.Store(true)
	tl := newTally()
	cfg := func(n *atomic.Int64) events.ConsumerConfig {
		return events.ConsumerConfig{Config: events.Config{Brokers: brokers}, Group: "g", Topics: []string{"orders"}, Workers: 1, MaxPollRecords: 400,
			Handler: func(ctx context.Context, ev *events.Event) error {
				n.Add(1)
				if n == &a && slow.Load() {
					select { // a slow handler: a whole round takes a minute
					case <-time.After(200 * time.Millisecond):
					case <-ctx.Done():
					}
				}
				tl.add(ev)
				return nil
			}}
	}
	startConsumer(t, cfg(&a))
	testutil.Eventually(t, time.Minute, "the first member handling", func() bool { return a.Load() > 0 })
	startConsumer(t, cfg(&b))
	var atJoin int64
	testutil.Eventually(t, 2*time.Minute, "the newcomer handling", func() bool {
		atJoin = a.Load()
		return b.Load() > 0
	})
	slow.Store(false)
	// A round is up to 400 events (two workers, 200 ms each: 40 s): without
	// the hurry the first member would have handled all of it before the
	// newcomer got anything.
	if atJoin >= 300 {
		t.Errorf("the first member handled %d events before the newcomer got its partition: its round was not hurried", atJoin)
	}
	// What the hurried round left undone is handled — by its member, which
	// fetches those events again, or by the newcomer.
	testutil.Eventually(t, 2*time.Minute, "every event handled", func() bool { return tl.distinct() == len(published) })
	t.Logf("the first member had handled %d events when the newcomer began", atJoin)
}

// An attempt that hangs ends at HandlerTimeout: its context is cancelled,
// the event is retried and then dead-lettered — the partition goes on.
func TestHandlerTimeoutEndsAHungAttempt(t *testing.T) {
	brokers := newCluster(t, "orders")
	p := newProducer(t, brokers)
	var attempts atomic.Int64
	r := startConsumer(t, events.ConsumerConfig{Config: events.Config{Brokers: brokers}, Group: "g", Topics: []string{"orders"},
		HandlerTimeout: 50 * time.Millisecond, Retry: fastRetry(2),
		Handler: func(ctx context.Context, ev *events.Event) error {
			attempts.Add(1)
			<-ctx.Done() // hung until the consumer gives up on the attempt
			return ctx.Err()
		}})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := p.Publish(ctx, &events.Event{Topic: "orders", Value: []byte("hangs")}); err != nil {
		t.Fatal(err)
	}
	dead := readAll(t, brokers, "orders.dlq", 1)
	if len(dead) != 1 || !strings.Contains(headers(dead[0])[events.HeaderDLQError], "context canceled") {
		t.Fatalf("dead letters %v, want the hung event's", dead)
	}
	r.Stop(t)
	if n := attempts.Load(); n != 2 {
		t.Errorf("%d attempts, want 2", n)
	}
}

// Stats.Lag says how many events wait past what the member finished, and
// reaches 0 once it caught up.
func TestStatsReportLag(t *testing.T) {
	brokers := newCluster(t, "orders")
	p := newProducer(t, brokers)
	release := make(chan struct{})
	var seen atomic.Int64
	r := startConsumer(t, events.ConsumerConfig{Config: events.Config{Brokers: brokers}, Group: "g", Topics: []string{"orders"}, MaxPollRecords: 10,
		Handler: func(ctx context.Context, ev *events.Event) error {
			if seen.Add(1) > 20 { // the first rounds finish; then it waits
				select {
				case <-release:
				case <-ctx.Done():
				}
			}
			return nil
		}})
	publishSeq(t, p, "orders", 400, 4)
	testutil.Eventually(t, time.Minute, "a lag reported", func() bool { return r.c.Stats().Lag > 0 })
	close(release)
	testutil.Eventually(t, time.Minute, "the member caught up", func() bool {
		st := r.c.Stats()
		return st.Handled == 400 && st.Lag == 0
	})
	// The same figures as Prometheus metrics.
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(r.c)
	// Another group's consumer registers beside it.
	other, err := events.NewConsumer(events.ConsumerConfig{Config: events.Config{Brokers: brokers}, Group: "h", Topics: []string{"orders"},
		Handler: func(context.Context, *events.Event) error { return nil }})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if err := reg.Register(other); err != nil {
		t.Fatalf("a second group's consumer: %v", err)
	}
	want := `
# HELP beacon_events_handled_total Events whose handler succeeded.
# TYPE beacon_events_handled_total counter
beacon_events_handled_total{group="g"} 400
beacon_events_handled_total{group="h"} 0
# HELP beacon_events_lag Events of this member's partitions waiting on the brokers past what it finished, as of its last round.
# TYPE beacon_events_lag gauge
beacon_events_lag{group="g"} 0
beacon_events_lag{group="h"} 0
`
	if err := promtest.GatherAndCompare(reg, strings.NewReader(want), "beacon_events_handled_total", "beacon_events_lag"); err != nil {
		t.Error(err)
	}
}

// Slow handlers wait side by side: every lane of a round (4 partitions ×
// 4 workers) has an event in its handler at once — also after quick
// events, when the lanes of a round share fewer goroutines.
func TestSlowHandlersRunSideBySide(t *testing.T) {
	brokers := newCluster(t, "work")
	p := newProducer(t, brokers)
	var inFlight, most atomic.Int64
	var handled atomic.Int64
	slow := atomic.Bool{}
	cfg := events.ConsumerConfig{Config: events.Config{Brokers: brokers}, Group: "g", Topics: []string{"work"}, Workers: 4,
		Handler: func(context.Context, *events.Event) error {
			defer handled.Add(1)
			if !slow.Load() {
				return nil
			}
			n := inFlight.Add(1)
			defer inFlight.Add(-1)
			for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
			}
			time.Sleep(time.Millisecond) // the work of a handler that waits on a database
			return nil
		}}
	startConsumer(t, cfg)
	publishSeq(t, p, "work", 2000, 256) // quick: rounds go to fewer goroutines
	testutil.Eventually(t, time.Minute, "the quick events handled", func() bool { return handled.Load() == 2000 })
	slow.Store(true)
	publishSeq(t, p, "work", 4000, 256)
	testutil.Eventually(t, 2*time.Minute, "the slow events handled", func() bool { return handled.Load() == 6000 })
	if got := most.Load(); got < 16 {
		t.Errorf("at most %d slow events in their handlers at once, want 16 (every lane of a round)", got)
	}
	t.Logf("at most %d slow events at once", most.Load())
}

// An idle member — it handled events, and now waits for more that do not
// come — does not hold up a rebalance: a newcomer gets its partitions at
// once. (The rebalance timeout is 10 minutes, so a member that held the
// rebalance until it was removed would keep the newcomer waiting past
// the test's bound.)
func TestIdleMemberLetsARebalanceGo(t *testing.T) {
	brokers := newCluster(t, "orders")
	p := newProducer(t, brokers)
	var a, b atomic.Int64
	cfg := func(n *atomic.Int64) events.ConsumerConfig {
		return events.ConsumerConfig{Config: events.Config{Brokers: brokers, Opts: []kgo.Opt{kgo.RebalanceTimeout(10 * time.Minute)}},
			Group: "g", Topics: []string{"orders"},
			Handler: func(context.Context, *events.Event) error { n.Add(1); return nil }}
	}
	startConsumer(t, cfg(&a))
	publishSeq(t, p, "orders", 200, 50)
	testutil.Eventually(t, time.Minute, "the first member handled every event", func() bool { return a.Load() == 200 })
	startConsumer(t, cfg(&b))
	admin, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	testutil.Eventually(t, 2*time.Minute, "both members own partitions", func() bool {
		return membersWithPartitions(t, admin, "g") == 2
	})
	publishSeq(t, p, "orders", 400, 50)
	testutil.Eventually(t, time.Minute, "every event handled, by both", func() bool { return a.Load()+b.Load() >= 600 && b.Load() > 0 })
	t.Logf("first member %d events, newcomer %d", a.Load(), b.Load())
}

// membersWithPartitions is how many members of a stable group own a
// partition, as the group's coordinator describes it (0 while it
// rebalances).
func membersWithPartitions(t *testing.T, cl *kgo.Client, group string) int {
	req := kmsg.NewPtrDescribeGroupsRequest()
	req.Groups = []string{group}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := req.RequestWith(ctx, cl)
	if err != nil || len(resp.Groups) != 1 || resp.Groups[0].State != "Stable" {
		return 0
	}
	n := 0
	for _, m := range resp.Groups[0].Members {
		var as kmsg.ConsumerMemberAssignment
		if err := as.ReadFrom(m.MemberAssignment); err != nil {
			t.Fatalf("member %s: assignment: %v", m.MemberID, err)
		}
		for _, tp := range as.Topics {
			if len(tp.Partitions) > 0 {
				n++
				break
			}
		}
	}
	return n
}

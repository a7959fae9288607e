package events_test

import (
	"context"
	"errors"
	"log"
	"net"
	"net/http"
	"strconv"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/events"
	"beacon.dev/beacon/lifecycle"
	"beacon.dev/beacon/registry"
)

// Example_publish is docs/events.md's "Publishing", compiled (not run: it
// needs brokers).
func Example_publish() {
	ctx := context.Background()
	p, err := events.NewProducer(events.Config{Brokers: []string{"127.0.0.1:9092"}})
	if err != nil {
		log.Fatal(err)
	}
	defer p.Close()
	ev := &events.Event{Topic: "behaviour", Key: []byte("user-42"), Value: []byte(`{"kind":"view","item":"sku-7"}`)}
	if err := p.Publish(ctx, ev); err != nil {
		log.Fatal(err) // not all were acknowledged: publish them again (same ids)
	}
	log.Printf("event %s at partition %d offset %d", ev.ID, ev.Partition, ev.Offset)
}

// Example_consume is docs/events.md's "Consuming": a tracking service that
// counts each user's events in beacon KV, exactly once per event, and
// drains its consumer with the service (lifecycle.Run).
func Example_consume() {
	ctx := context.Background()
	c, err := client.New([]string{"127.0.0.1:8970"})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	kv := c.KV()
	dedup, err := events.NewKVDedup(kv, "dedup/tracking/", 0)
	if err != nil {
		log.Fatal(err)
	}
	count := func(ctx context.Context, ev *events.Event) error {
		key := "agg/" + string(ev.Key)
		cur, err := kv.Get(ctx, key)
		if err != nil && !errors.Is(err, client.ErrNotFound) {
			return err // retried
		}
		n, _ := strconv.Atoi(string(cur.Value))
		// The new count and the event's mark, in one transaction; nothing
		// when the event was applied before.
		_, err = dedup.Apply(ctx, ev, client.OpPut(key, []byte(strconv.Itoa(n+1))).IfRevision(cur.ModRevision))
		return err // a moved counter (ErrCompareFailed) is retried
	}
	consumer, err := events.NewConsumer(events.ConsumerConfig{
		Config:  events.Config{Brokers: []string{"127.0.0.1:9092"}},
		Group:   "tracking",
		Topics:  []string{"behaviour"},
		Handler: count,
	})
	if err != nil {
		log.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:8080")
	if err != nil {
		log.Fatal(err)
	}
	_, err = lifecycle.Run(ctx, lifecycle.Config{
		Client:       c,
		Instance:     registry.Instance{Service: "tracking"},
		HTTP:         &http.Server{Handler: http.NotFoundHandler()}, // its read API
		HTTPListener: ln,
		Workers:      []func(context.Context) error{consumer.Run},
	})
	if err != nil {
		log.Fatal(err)
	}
}

// Example_outbox is docs/events.md's "Transactional outbox": the order's
// state and its event in one KV transaction, and a relay on every
// instance (one leads) that publishes the events.
func Example_outbox() {
	ctx := context.Background()
	c, err := client.New([]string{"127.0.0.1:8970"})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	p, err := events.NewProducer(events.Config{Brokers: []string{"127.0.0.1:9092"}})
	if err != nil {
		log.Fatal(err)
	}
	defer p.Close()
	outbox, err := events.NewOutbox(c.KV(), "outbox/orders/", 0, 0)
	if err != nil {
		log.Fatal(err)
	}
	// Both or neither: the order is placed and its event will be published.
	_, err = outbox.Put(ctx, []client.KVOp{client.OpPut("orders/o-1", []byte(`{"state":"placed"}`)).IfRevision(0)},
		&events.Event{Topic: "orders", Key: []byte("o-1"), Value: []byte(`{"kind":"placed","order":"o-1"}`)})
	if err != nil {
		log.Fatal(err)
	}
	sess, err := c.NewSession(ctx)
	if err != nil {
		log.Fatal(err)
	}
	relay := func(ctx context.Context) error { return outbox.Relay(ctx, c, sess, p) }
	_ = relay // lifecycle.Config{…, Workers: []func(context.Context) error{relay}}
}

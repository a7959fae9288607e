package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"os/signal"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/events"
	"beacon.dev/beacon/policy"
)

// The seeds' user-behaviour tracking: the gateway publishes what users do
// (view, add to cart, order) to the topic "behaviour", keyed by user; the
// tracking service consumes it in the consumer group "tracking" (run 2 or
// more) and keeps per-user and per-item counts in beacon KV, each event
// applied once (events.KVDedup) however often it is delivered.

const (
	behaviourTopic = "behaviour"
	trackingGroup  = "tracking"
	// aggPrefix holds one aggregate per topic partition: a partition is
	// handled by one member at a time, so its aggregate has one writer.
	aggPrefix = "shop/tracking/agg/"
	// maxUsersPerPartition bounds a partition's aggregate (a KV value is
	// at most 512 KiB): events of more users are counted per item and in
	// OtherUsers.
	maxUsersPerPartition = 2000
)

// behaviour is one user-behaviour event.
type behaviour struct {
	User     string `json:"user"`
	Kind     string `json:"kind"` // view, cart, order
	Item     string `json:"item"`
	Quantity int32  `json:"quantity,omitempty"`
}

var userName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

func (b behaviour) validate() error {
	switch {
	case !userName.MatchString(b.User):
		return fmt.Errorf("user %q: 1-64 letters, digits, '_' or '-'", clipped(b.User))
	case b.Kind != "view" && b.Kind != "cart" && b.Kind != "order":
		return fmt.Errorf("kind %q: view, cart or order", clipped(b.Kind))
	case !knownItem(b.Item):
		return fmt.Errorf("item %q: one of %s", clipped(b.Item), strings.Join(items, ", "))
	case b.Quantity < 0 || b.Quantity > 1000:
		return fmt.Errorf("quantity %d: 0 to 1000", b.Quantity)
	}
	return nil
}

// clipped keeps an echoed value short.
func clipped(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}

func knownItem(item string) bool {
	for _, i := range items {
		if i == item {
			return true
		}
	}
	return false
}

// counts are what a user or an item did.
type counts struct {
	Views  int64 `json:"views"`
	Carts  int64 `json:"carts"`
	Orders int64 `json:"orders"`
	Units  int64 `json:"units"` // ordered
}

func (c *counts) add(b behaviour) {
	switch b.Kind {
	case "view":
		c.Views++
	case "cart":
		c.Carts++
	case "order":
		c.Orders++
		c.Units += int64(b.Quantity)
	}
}

func (c *counts) merge(o *counts) {
	c.Views, c.Carts, c.Orders, c.Units = c.Views+o.Views, c.Carts+o.Carts, c.Orders+o.Orders, c.Units+o.Units
}

// aggregate is one partition's counts.
type aggregate struct {
	Users      map[string]*counts `json:"users"`
	Items      map[string]*counts `json:"items"`
	OtherUsers counts             `json:"other_users"`
}

func (a *aggregate) add(b behaviour) {
	if a.Users == nil {
		a.Users, a.Items = map[string]*counts{}, map[string]*counts{}
	}
	u := a.Users[b.User]
	if u == nil && len(a.Users) < maxUsersPerPartition {
		u = &counts{}
		a.Users[b.User] = u
	}
	if u != nil {
		u.add(b)
	} else {
		a.OtherUsers.add(b)
	}
	it := a.Items[b.Item]
	if it == nil {
		it = &counts{}
		a.Items[b.Item] = it
	}
	it.add(b)
}

// tracker is the gateway's publisher of behaviour events (nil: none).
type tracker struct {
	p      *events.Producer
	log    *slog.Logger
	failed atomic.Int64
}

// track publishes b, waiting at most 2 s for the brokers; a failure is
// logged and counted, never the request's.
// id, if not empty, is the event's id: the same fact published twice (a
// retried order) is then counted once.
func (t *tracker) track(ctx context.Context, b behaviour, id string) bool {
	if t == nil {
		return false
	}
	v, _ := json.Marshal(b)
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	if err := t.p.Publish(ctx, &events.Event{Topic: behaviourTopic, Key: []byte(b.User), Value: v, ID: id}); err != nil {
		if n := t.failed.Add(1); n == 1 || n%100 == 0 {
			t.log.Warn("behaviour event not published", "failed so far", n, "err", err)
		}
		return false
	}
	return true
}

// trackingService consumes behaviour events and serves the counts.
type trackingService struct {
	kv       *client.KV
	dedup    *events.KVDedup
	consumer *events.Consumer
	id       string
	dupes    atomic.Int64
	metrics  http.Handler // the consumer's Prometheus metrics
}

// handle applies one event to its partition's aggregate, once.
func (s *trackingService) handle(ctx context.Context, ev *events.Event) error {
	var b behaviour
	if err := json.Unmarshal(ev.Value, &b); err != nil {
		return events.Permanent(fmt.Errorf("not a behaviour event: %w", err))
	}
	if err := b.validate(); err != nil {
		return events.Permanent(err)
	}
	key := aggPrefix + ev.Topic + "/" + strconv.Itoa(int(ev.Partition))
	var agg aggregate
	var rev int64
	cur, err := s.kv.Get(ctx, key)
	switch {
	case errors.Is(err, client.ErrNotFound):
	case err != nil:
		return err
	default:
		if err := json.Unmarshal(cur.Value, &agg); err != nil {
			return fmt.Errorf("aggregate %s: %w", key, err)
		}
		rev = cur.ModRevision
	}
	agg.add(b)
	v, _ := json.Marshal(&agg)
	// The aggregate compared on the revision read: a member that lost the
	// partition and goes on cannot overwrite the new owner's counts.
	dup, err := s.dedup.Apply(ctx, ev, client.OpPut(key, v).IfRevision(rev))
	if dup {
		s.dupes.Add(1)
	}
	return err
}

// aggregates reads every partition's aggregate.
func (s *trackingService) aggregates(ctx context.Context) ([]aggregate, error) {
	kvs, _, err := s.kv.List(ctx, aggPrefix)
	if err != nil {
		return nil, err
	}
	out := make([]aggregate, 0, len(kvs))
	for _, kv := range kvs {
		var a aggregate
		if err := json.Unmarshal(kv.Value, &a); err == nil {
			out = append(out, a)
		}
	}
	return out, nil
}

// ServeHTTP is the read API: GET /users/USER, GET /items/ITEM (counts
// over every partition), GET /stats (this member's consumer) and GET
// /metrics (the same for Prometheus).
func (s *trackingService) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		http.Error(w, "GET /users/USER, /items/ITEM or /stats", http.StatusMethodNotAllowed)
		return
	}
	if r.URL.Path == "/metrics" {
		s.metrics.ServeHTTP(w, r)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	if r.URL.Path == "/stats" {
		st := s.consumer.Stats()
		_ = json.NewEncoder(w).Encode(map[string]any{"id": s.id, "handled": st.Handled, "lag": st.Lag, "retries": st.Retries,
			"dead_lettered": st.DeadLettered, "duplicates": s.dupes.Load()})
		return
	}
	kind, name, ok := strings.Cut(strings.TrimPrefix(r.URL.Path, "/"), "/")
	if !ok || kind != "users" && kind != "items" {
		http.Error(w, "GET /users/USER, /items/ITEM, /stats or /metrics", http.StatusNotFound)
		return
	}
	if !userName.MatchString(name) {
		http.Error(w, fmt.Sprintf("%s %q: 1-64 letters, digits, '_' or '-'", strings.TrimSuffix(kind, "s"), clipped(name)), http.StatusBadRequest)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
	defer cancel()
	aggs, err := s.aggregates(ctx)
	if err != nil {
		http.Error(w, err.Error(), http.StatusServiceUnavailable)
		return
	}
	var total counts
	found := false
	for _, a := range aggs {
		m := a.Users
		if kind == "items" {
			m = a.Items
		}
		if c := m[name]; c != nil {
			total.merge(c)
			found = true
		}
	}
	if !found {
		http.Error(w, fmt.Sprintf("no events of %s %q yet", strings.TrimSuffix(kind, "s"), name), http.StatusNotFound)
		return
	}
	_ = json.NewEncoder(w).Encode(&total)
}

func runTracking(args []string) error {
	fs := flag.NewFlagSet("tracking", flag.ExitOnError)
	var c common
	c.bind(fs, "127.0.0.1:0")
	brokers := fs.String("brokers", "127.0.0.1:9092", "Kafka brokers, comma-separated")
	sessionTimeout := fs.Duration("group-session-timeout", 6*time.Second, "how long the group waits for a silent member before giving its partitions to the others (Kafka's session.timeout.ms; franz-go's default is 45 s)")
	_ = fs.Parse(args)
	log := logger("tracking")
	peers, err := c.peers(log)
	if err != nil {
		return err
	}
	defer peers.Close()
	s := &trackingService{kv: peers.Client.KV()}
	if s.dedup, err = events.NewKVDedup(s.kv, "shop/tracking/dedup/", 0); err != nil {
		return err
	}
	s.consumer, err = events.NewConsumer(events.ConsumerConfig{
		Config: events.Config{Brokers: strings.Split(*brokers, ","), Logger: log, TracerProvider: c.tp,
			Opts: []kgo.Opt{kgo.SessionTimeout(*sessionTimeout), kgo.HeartbeatInterval(max(*sessionTimeout/6, 100*time.Millisecond))}},
		Group:   trackingGroup,
		Topics:  []string{behaviourTopic},
		Handler: s.handle,
		Workers: 1, // a partition's aggregate is one key: its events one at a time
		// Only a malformed event is a dead letter: a registry outage (or a
		// member that lost its partition racing this one) is waited out,
		// the lag growing, rather than losing counts.
		Retry: policy.RetryConfig{MaxAttempts: math.MaxInt32},
	})
	if err != nil {
		return err
	}
	defer s.consumer.Close()
	reg := prometheus.NewRegistry()
	reg.MustRegister(s.consumer) // beacon_events_handled_total, beacon_events_lag, …
	s.metrics = promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
	return serve(&c, "tracking", peers, log, nil, s, func(id string) { s.id = id }, s.consumer.Run)
}

// runBroker runs the demo's Kafka broker: franz-go's kfake, an in-process
// cluster speaking the Kafka protocol, keeping its log in memory (no
// Kafka package exists for this machine; docs/events.md). It creates the
// topic "behaviour" and its dead-letter topic, 4 partitions each.
func runBroker(args []string) error {
	fs := flag.NewFlagSet("broker", flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:9092", "listen address")
	_ = fs.Parse(args)
	_, portStr, err := net.SplitHostPort(*addr)
	if err != nil {
		return err
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return fmt.Errorf("--addr %q: %w", *addr, err)
	}
	cl, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.Ports(port), kfake.SeedTopics(4, behaviourTopic, behaviourTopic+".dlq"))
	if err != nil {
		return err
	}
	defer cl.Close()
	fmt.Printf("shop: serving {\"service\":\"broker\",\"addr\":%q,\"pid\":\"%d\"}\n", cl.ListenAddrs()[0], os.Getpid())
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	fmt.Println("shop: stopped broker")
	return nil
}

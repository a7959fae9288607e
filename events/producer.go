package events

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/twmb/franz-go/pkg/kgo"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
)

// Config is what producers and consumers share.
type Config struct {
	// Brokers are the seed brokers, host:port.
	Brokers []string
	// ClientID names the process to the brokers (default "beacon-events").
	ClientID string
	// MaxEventBytes bounds an event (key, value, id and headers; default
	// DefaultMaxEventBytes). Keep it at or below the brokers'
	// message.max.bytes.
	MaxEventBytes int
	// TracerProvider, when set, traces publishing and handling and carries
	// W3C trace context in the events' headers.
	TracerProvider trace.TracerProvider
	Logger         *slog.Logger
	// Opts are more franz-go options, after beacon's: TLS (kgo.DialTLSConfig),
	// SASL, timeouts.
	Opts []kgo.Opt
}

func (c *Config) setDefaults() error {
	if len(c.Brokers) == 0 {
		return errors.New("events: brokers: none given")
	}
	if c.ClientID == "" {
		c.ClientID = "beacon-events"
	}
	if c.MaxEventBytes == 0 {
		c.MaxEventBytes = DefaultMaxEventBytes
	}
	if c.MaxEventBytes < 0 {
		return fmt.Errorf("events: max event bytes: %d, must be positive", c.MaxEventBytes)
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// kafkaOpts are the options every beacon client sets.
func (c *Config) kafkaOpts() []kgo.Opt {
	opts := []kgo.Opt{kgo.SeedBrokers(c.Brokers...), kgo.ClientID(c.ClientID)}
	if need := c.MaxEventBytes + batchOverhead; need > kafkaDefaultBatchBytes {
		// Events above the default: batches must grow (and the brokers'
		// message.max.bytes with them).
		opts = append(opts, kgo.ProducerBatchMaxBytes(int32(need)))
	}
	return opts
}

// franz-go's default batch limit, under Kafka's default message.max.bytes
// (1,048,588), and room for a record's framing and dead-letter headers.
const (
	kafkaDefaultBatchBytes = 1_000_012
	batchOverhead          = 8 << 10
)

// tracer returns the package's tracer, nil without a provider.
func (c *Config) tracer() trace.Tracer {
	if c.TracerProvider == nil {
		return nil
	}
	return c.TracerProvider.Tracer("beacon.dev/beacon/events")
}

// Span names and attributes (OpenTelemetry's messaging conventions).
const (
	SpanPublish = "events.publish"
	SpanHandle  = "events.handle"
)

var (
	attrSystem    = attribute.String("messaging.system", "kafka")
	attrTopic     = attribute.Key("messaging.destination.name")
	attrPartition = attribute.Key("messaging.destination.partition.id")
	attrOffset    = attribute.Key("messaging.kafka.offset")
	attrID        = attribute.Key("messaging.message.id")
	attrCount     = attribute.Key("messaging.batch.message_count")
	attrAttempt   = attribute.Key("beacon.attempt")
)

// traceContext is the W3C propagator; the application's global one is
// never touched.
var traceContext propagation.TraceContext

// headerCarrier adapts a record's headers to OpenTelemetry's propagators.
type headerCarrier struct{ hs *[]kgo.RecordHeader }

func (c headerCarrier) Get(key string) string {
	for _, h := range *c.hs {
		if h.Key == key {
			return string(h.Value)
		}
	}
	return ""
}

func (c headerCarrier) Set(key, value string) {
	for i, h := range *c.hs {
		if h.Key == key {
			(*c.hs)[i].Value = []byte(value)
			return
		}
	}
	*c.hs = append(*c.hs, kgo.RecordHeader{Key: key, Value: []byte(value)})
}

func (c headerCarrier) Keys() []string {
	out := make([]string, len(*c.hs))
	for i, h := range *c.hs {
		out[i] = h.Key
	}
	return out
}

// Producer publishes events: acknowledged by every in-sync replica
// (acks=all) and idempotent, so a retried produce neither duplicates nor
// reorders within a partition.
type Producer struct {
	cl     *kgo.Client
	cfg    Config
	tracer trace.Tracer
}

// NewProducer connects lazily to cfg.Brokers.
func NewProducer(cfg Config) (*Producer, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	opts := append(cfg.kafkaOpts(), kgo.RequiredAcks(kgo.AllISRAcks()))
	cl, err := kgo.NewClient(append(opts, cfg.Opts...)...)
	if err != nil {
		return nil, fmt.Errorf("events: %w", err)
	}
	return &Producer{cl: cl, cfg: cfg, tracer: cfg.tracer()}, nil
}

// Publish sends evs and returns once the brokers acknowledged every one
// (or the first error). An event without an ID gets one; on success each
// event's Partition and Offset are set. Invalid events are refused before
// anything is sent, naming the field and the limit.
func (p *Producer) Publish(ctx context.Context, evs ...*Event) error {
	for _, ev := range evs {
		if ev.ID == "" {
			ev.ID = newID()
		}
		if err := ev.check(p.cfg.MaxEventBytes); err != nil {
			return err
		}
	}
	var span trace.Span
	if p.tracer != nil {
		ctx, span = p.tracer.Start(ctx, SpanPublish, trace.WithSpanKind(trace.SpanKindProducer),
			trace.WithAttributes(attrSystem, attrCount.Int(len(evs))))
		if len(evs) > 0 {
			span.SetAttributes(attrTopic.String(evs[0].Topic))
		}
		defer span.End()
	}
	recs := make([]*kgo.Record, len(evs))
	for i, ev := range evs {
		recs[i] = toRecord(ev)
		if span != nil {
			traceContext.Inject(ctx, headerCarrier{&recs[i].Headers})
		}
	}
	res := p.cl.ProduceSync(ctx, recs...)
	if err := res.FirstErr(); err != nil {
		if span != nil {
			span.SetStatus(codes.Error, err.Error())
		}
		return fmt.Errorf("events: publish: %w", err)
	}
	// The results come in the order the produces completed, not the
	// events'; each record carries its own partition and offset.
	for i, r := range recs {
		evs[i].Partition, evs[i].Offset = r.Partition, r.Offset
	}
	return nil
}

// Close flushes nothing (Publish is synchronous) and disconnects.
func (p *Producer) Close() { p.cl.Close() }

func toRecord(ev *Event) *kgo.Record {
	hs := make([]kgo.RecordHeader, 0, len(ev.Headers)+2)
	hs = append(hs, kgo.RecordHeader{Key: HeaderID, Value: []byte(ev.ID)})
	for _, h := range ev.Headers {
		hs = append(hs, kgo.RecordHeader{Key: h.Key, Value: h.Value})
	}
	return &kgo.Record{Topic: ev.Topic, Key: ev.Key, Value: ev.Value, Headers: hs}
}

// fillEvent makes ev the event of a consumed record (sharing its bytes);
// a malformed id is returned as an error (the event is then
// dead-lettered).
func fillEvent(ev *Event, r *kgo.Record) error {
	*ev = Event{Topic: r.Topic, Key: r.Key, Value: r.Value, Partition: r.Partition, Offset: r.Offset, Time: r.Timestamp}
	var idErr error
	for _, h := range r.Headers {
		if h.Key == HeaderID && ev.ID == "" && idErr == nil {
			if idErr = checkID(string(h.Value)); idErr == nil {
				ev.ID = string(h.Value)
			}
			continue
		}
		ev.Headers = append(ev.Headers, Header{Key: h.Key, Value: h.Value})
	}
	return idErr
}

package events

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"beacon.dev/beacon/internal/backoff"
	"beacon.dev/beacon/policy"
)

// Handler handles one event. It must honour ctx: the consumer cancels it
// at HandlerTimeout, and when a drain runs out of time. An error retries
// the event (Permanent: straight to the dead-letter topic); a panic counts
// as an error. The events of a lane are allocated together: an Event kept
// after its handler keeps its lane's (at most a round) in memory.
type Handler func(ctx context.Context, ev *Event) error

// ConsumerConfig configures a Consumer.
type ConsumerConfig struct {
	Config
	// Group is the consumer group; Topics the topics it consumes.
	Group   string
	Topics  []string
	Handler Handler
	// Workers handle a partition's events at once (default 4): events
	// with the same key always go to the same worker, in offset order.
	Workers int
	// MaxPollRecords bounds the events of a round (default 500); the
	// next round starts when every one of them is handled, dead-lettered
	// or left to a drain, so a slow handler slows consumption.
	// FetchMaxBytes bounds a fetch (default 16 MiB): the client buffers
	// at most one per broker and the consumer's backlog at most one more,
	// plus less than a round.
	MaxPollRecords int
	FetchMaxBytes  int32
	// HandlerTimeout bounds one attempt (default 30 s).
	HandlerTimeout time.Duration
	// Retry: attempts per event including the first (default 5), the
	// backoff between them (default 100 ms doubling to 5 s, ±20 %) and a
	// budget capping retries to a share of events (default
	// policy.DefaultBudget). A retry the budget refuses waits, it is not
	// dropped: a failing dependency slows consumption instead of sending
	// everything to the dead-letter topic. RetryOn classifies errors
	// (default: all but Permanent).
	Retry policy.RetryConfig
	// DeadLetterSuffix names each topic's dead-letter topic (default
	// ".dlq": orders → orders.dlq). It must exist on the brokers.
	DeadLetterSuffix string
	// DrainTimeout is how long in-flight handlers may finish after Run's
	// context ends (default 10 s); then their contexts are cancelled.
	DrainTimeout time.Duration
}

// Defaults of ConsumerConfig.
const (
	DefaultWorkers          = 4
	DefaultMaxPollRecords   = 500
	DefaultFetchMaxBytes    = 16 << 20
	DefaultHandlerTimeout   = 30 * time.Second
	DefaultMaxAttempts      = 5
	DefaultDeadLetterSuffix = ".dlq"
	DefaultDrainTimeout     = 10 * time.Second
	maxWorkers              = 256
)

func (c *ConsumerConfig) setDefaults() error {
	if err := c.Config.setDefaults(); err != nil {
		return err
	}
	switch {
	case c.Group == "":
		return errors.New("events: group: empty")
	case len(c.Topics) == 0:
		return errors.New("events: topics: none given")
	case c.Handler == nil:
		return errors.New("events: handler: nil")
	case c.Workers < 0 || c.Workers > maxWorkers:
		return fmt.Errorf("events: workers: %d, must be 1 to %d", c.Workers, maxWorkers)
	case c.MaxPollRecords < 0 || c.FetchMaxBytes < 0 || c.HandlerTimeout < 0 || c.DrainTimeout < 0 || c.Retry.MaxAttempts < 0:
		return errors.New("events: max poll records, fetch max bytes, handler timeout, drain timeout and retry attempts must not be negative")
	}
	if c.Workers == 0 {
		c.Workers = DefaultWorkers
	}
	if c.MaxPollRecords == 0 {
		c.MaxPollRecords = DefaultMaxPollRecords
	}
	if c.FetchMaxBytes == 0 {
		c.FetchMaxBytes = DefaultFetchMaxBytes
	}
	if c.HandlerTimeout == 0 {
		c.HandlerTimeout = DefaultHandlerTimeout
	}
	if c.DrainTimeout == 0 {
		c.DrainTimeout = DefaultDrainTimeout
	}
	if c.DeadLetterSuffix == "" {
		c.DeadLetterSuffix = DefaultDeadLetterSuffix
	}
	if c.Retry.MaxAttempts == 0 {
		c.Retry.MaxAttempts = DefaultMaxAttempts
	}
	if c.Retry.BaseBackoff == 0 {
		c.Retry.BaseBackoff = 100 * time.Millisecond
	}
	if c.Retry.MaxBackoff == 0 {
		c.Retry.MaxBackoff = max(5*time.Second, c.Retry.BaseBackoff)
	}
	if c.Retry.RetryOn == nil {
		c.Retry.RetryOn = func(error) bool { return true }
	}
	if c.Retry.Budget == nil {
		b, err := policy.NewBudget(policy.DefaultBudget)
		if err != nil {
			return err
		}
		c.Retry.Budget = b
	}
	for _, t := range c.Topics {
		if t == "" {
			return errors.New("events: topics: an empty name")
		}
	}
	return nil
}

// permanent marks an error not worth retrying.
type permanent struct{ err error }

func (p permanent) Error() string { return p.err.Error() }
func (p permanent) Unwrap() error { return p.err }

// Permanent wraps err so that the consumer sends the event to the
// dead-letter topic without retrying it.
func Permanent(err error) error { return permanent{err} }

// IsPermanent reports whether err was wrapped by Permanent.
func IsPermanent(err error) bool {
	var p permanent
	return errors.As(err, &p)
}

// Stats counts what a consumer did.
type Stats struct {
	Handled      int64 // events whose handler succeeded
	Retries      int64 // attempts after a failure
	DeadLettered int64 // events sent to a dead-letter topic
	Committed    int64 // offset commits made
	// Lag is how many events of this member's partitions wait on the
	// brokers past what it finished, as of its last round (each
	// partition's high watermark then, less its finished offset).
	Lag int64
}

// Consumer handles a consumer group's events at least once: an event's
// offset is committed only after its handler succeeded or it reached the
// dead-letter topic, so a consumer that dies leaves its unfinished events
// to the member that takes its partitions over. Rebalances wait for the
// round being handled (franz-go's BlockRebalanceOnPoll), so a commit is
// never made for a partition this member no longer owns.
type Consumer struct {
	cfg    ConsumerConfig
	cl     *kgo.Client
	dlq    *kgo.Client // produces dead letters
	tracer trace.Tracer

	handled, retries, deadLettered, committed atomic.Int64

	lanesMu sync.Mutex
	workers []*worker    // guarded by lanesMu: every worker made, for the watchdog
	idle    []*worker    // guarded by lanesMu: the workers not running a lane
	clock   atomic.Int64 // Unix ns, kept by the watchdog
	metrics consumerMetrics

	// A rebalance waiting for the round in hand hurries it: no new event
	// starts, waits end, what finished is committed.
	hurryMu sync.Mutex
	hurry   context.CancelFunc // the round's; nil between rounds
	hurried bool               // a rebalance waits (until AllowRebalance)

	quickHandler bool // the last round's events were quick (handleRound's own)

	fatal atomic.Pointer[error] // why the consumer must stop (a dead letter that cannot be written)
	ran   atomic.Bool

	lagMu sync.Mutex
	lag   map[topicPartition]int64 // guarded by lagMu: per partition owned, as of its last round
}

type topicPartition struct {
	topic     string
	partition int32
}

// NewConsumer joins cfg.Group when Run starts polling.
func NewConsumer(cfg ConsumerConfig) (*Consumer, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	c := &Consumer{cfg: cfg, tracer: cfg.tracer(), lag: map[topicPartition]int64{}, metrics: newConsumerMetrics(cfg.Group)}
	opts := append(cfg.kafkaOpts(),
		kgo.OnPartitionsCallbackBlocked(func(context.Context, *kgo.Client) { c.hurryUp() }),
		// Revoked or lost partitions are another member's lag. (No
		// commit here: every round commits before a rebalance may go.)
		kgo.OnPartitionsRevoked(func(_ context.Context, _ *kgo.Client, gone map[string][]int32) { c.forgetLag(gone) }),
		kgo.OnPartitionsLost(func(_ context.Context, _ *kgo.Client, gone map[string][]int32) { c.forgetLag(gone) }),
		kgo.ConsumerGroup(cfg.Group),
		kgo.ConsumeTopics(cfg.Topics...),
		kgo.DisableAutoCommit(),
		kgo.BlockRebalanceOnPoll(),
		kgo.FetchMaxBytes(cfg.FetchMaxBytes),
		kgo.FetchMaxPartitionBytes(min(cfg.FetchMaxBytes, int32(max(cfg.MaxEventBytes+64<<10, 1<<20)))),
	)
	cl, err := kgo.NewClient(append(opts, cfg.Opts...)...)
	if err != nil {
		return nil, fmt.Errorf("events: %w", err)
	}
	dlq, err := kgo.NewClient(append(append(cfg.kafkaOpts(), kgo.RequiredAcks(kgo.AllISRAcks())), cfg.Opts...)...)
	if err != nil {
		cl.Close()
		return nil, fmt.Errorf("events: %w", err)
	}
	c.cl, c.dlq = cl, dlq
	return c, nil
}

// Close releases a Consumer that was never Run (Run closes its own).
func (c *Consumer) Close() {
	if !c.ran.Swap(true) {
		c.cl.Close()
		c.dlq.Close()
	}
}

// hurryUp ends the round in hand early: a rebalance is waiting for it.
func (c *Consumer) hurryUp() {
	c.hurryMu.Lock()
	defer c.hurryMu.Unlock()
	c.hurried = true
	if c.hurry != nil {
		c.hurry()
	}
}

// roundContext is the context of a round: it ends with ctx, or when a
// rebalance waits for the round.
func (c *Consumer) roundContext(ctx context.Context) (context.Context, context.CancelFunc) {
	rctx, cancel := context.WithCancel(ctx)
	c.hurryMu.Lock()
	defer c.hurryMu.Unlock()
	c.hurry = cancel
	if c.hurried {
		cancel()
	}
	return rctx, cancel
}

// rebalanceWaits reports whether a rebalance waits for this member.
func (c *Consumer) rebalanceWaits() bool {
	c.hurryMu.Lock()
	defer c.hurryMu.Unlock()
	return c.hurried
}

// allowRebalance lets a waiting rebalance go, between rounds.
func (c *Consumer) allowRebalance() {
	c.hurryMu.Lock()
	c.hurry, c.hurried = nil, false
	c.hurryMu.Unlock()
	c.cl.AllowRebalance()
}

// fail records why the consumer must stop; the first reason wins.
func (c *Consumer) fail(err error) { c.fatal.CompareAndSwap(nil, &err) }

func (c *Consumer) failed() error {
	if e := c.fatal.Load(); e != nil {
		return *e
	}
	return nil
}

// Stats returns the counts so far.
func (c *Consumer) Stats() Stats {
	st := Stats{Handled: c.handled.Load(), Retries: c.retries.Load(), DeadLettered: c.deadLettered.Load(), Committed: c.committed.Load()}
	c.lagMu.Lock()
	defer c.lagMu.Unlock()
	for _, l := range c.lag {
		st.Lag += l
	}
	return st
}

func (c *Consumer) forgetLag(gone map[string][]int32) {
	c.lagMu.Lock()
	defer c.lagMu.Unlock()
	for t, ps := range gone {
		for _, p := range ps {
			delete(c.lag, topicPartition{t, p})
		}
	}
}

// noteLag records, after a round, each partition's lag: its high
// watermark at the fetch less the offset after its finished prefix.
func (c *Consumer) noteLag(parts [][]*kgo.Record, hw []int64, done []*kgo.Record) {
	c.lagMu.Lock()
	defer c.lagMu.Unlock()
	for i, recs := range parts {
		next := recs[0].Offset
		if done[i] != nil {
			next = done[i].Offset + 1
		}
		c.lag[topicPartition{recs[0].Topic, recs[0].Partition}] = max(0, hw[i]-next)
	}
}

// Run consumes until ctx ends, then drains: it stops fetching, lets the
// handlers in flight finish (DrainTimeout), commits what is done and
// leaves the group, so its partitions move at once. It returns nil after
// a drain, and an error when it cannot go on (its dead-letter topic is
// missing or refuses writes, or commits keep failing); the Consumer cannot
// run again.
func (c *Consumer) Run(ctx context.Context) error {
	if c.ran.Swap(true) {
		return errors.New("events: the consumer already ran")
	}
	defer func() {
		c.allowRebalance()
		c.cl.Close() // leaves the group
		c.dlq.Close()
	}()
	if err := c.checkDeadLetterTopics(ctx); err != nil {
		return err
	}
	// Handlers run in a context that outlives ctx by DrainTimeout.
	hctx, hcancel := context.WithCancel(context.WithoutCancel(ctx))
	var watching sync.WaitGroup
	c.clock.Store(time.Now().UnixNano())
	watching.Go(func() { c.watch(hctx) }) // the handlers' timeouts, the lanes' clock
	defer func() {
		hcancel()
		watching.Wait()
	}()
	stop := context.AfterFunc(ctx, func() {
		t := time.AfterFunc(c.cfg.DrainTimeout, hcancel)
		context.AfterFunc(hctx, func() { t.Stop() })
	})
	defer stop()
	// Rounds overlap with what surrounds them: while a round is handled,
	// the client's buffer is drained into the backlog when it runs low (so
	// the next fetch from the brokers is under way), and the round
	// before's commit goes out. The commit in flight is waited for before
	// the next is sent (commits stay in order) and before a rebalance may
	// go (none is made for a partition this member no longer owns).
	var inflight chan error
	settle := func() error {
		if inflight != nil {
			if err := <-inflight; err != nil {
				c.fail(err)
			}
			inflight = nil
		}
		return c.failed()
	}
	defer settle()
	var queued backlog
	for ctx.Err() == nil {
		if c.rebalanceWaits() {
			if err := settle(); err != nil {
				return err
			}
			c.rewind(queued.drop())
			c.allowRebalance()
		}
		if queued.n == 0 {
			// This poll may wait for events as long as none come: no
			// rebalance may wait for it (the earlier polls' hold ends).
			if err := settle(); err != nil {
				return err
			}
			c.allowRebalance()
			fetches, err := c.poll(ctx)
			if err != nil {
				return err
			}
			queued.add(fetches)
			if queued.n == 0 {
				continue
			}
		}
		cur := queued.take(c.cfg.MaxPollRecords)
		rctx, cancel := c.roundContext(ctx)
		var done, undone []*kgo.Record
		handled := make(chan struct{})
		pctx, stopPolling := context.WithCancel(rctx)
		go func() {
			defer close(handled)
			defer stopPolling() // a poll waiting for events ends with the round
			done, undone = c.handleRound(rctx, hctx, cur.parts)
		}()
		if queued.n < c.cfg.MaxPollRecords {
			fetches, err := c.poll(pctx)
			if err != nil {
				<-handled
				cancel()
				return err
			}
			queued.add(fetches)
		}
		<-handled
		cancel()
		if err := settle(); err != nil {
			return err
		}
		// Before a rebalance may go: its revocation forgets the lag of
		// the partitions this member loses.
		c.noteLag(cur.parts, cur.hw, done)
		if slices.ContainsFunc(undone, func(r *kgo.Record) bool { return r != nil }) || c.rebalanceWaits() || ctx.Err() != nil {
			// Cut short, or a rebalance waits: commit what finished,
			// fetch the rest and the backlog again, let the rebalance go.
			if err := c.commit(ctx, done); err != nil {
				c.fail(err)
			}
			c.rewind(append(undone, queued.drop()...))
			c.allowRebalance()
		} else {
			inflight = make(chan error, 1)
			go func(ch chan<- error) { ch <- c.commit(ctx, done) }(inflight)
		}
		if err := c.failed(); err != nil {
			return err
		}
	}
	return nil
}

// round is what the consumer handles at once: each partition's records
// (at least one) and its high watermark at their fetch.
type round struct {
	parts [][]*kgo.Record
	hw    []int64
}

// poll takes everything the client has buffered, waiting for events
// until ctx ends; an error means the client was closed.
func (c *Consumer) poll(ctx context.Context) (kgo.Fetches, error) {
	fetches := c.cl.PollFetches(ctx)
	if fetches.IsClientClosed() {
		return nil, errors.New("events: consumer closed")
	}
	fetches.EachError(func(topic string, p int32, err error) {
		if !errors.Is(err, context.Canceled) {
			c.cfg.Logger.Warn("events: fetch", "topic", topic, "partition", p, "err", err)
		}
	})
	return fetches, nil
}

// checkDeadLetterTopics asks the brokers for every dead-letter topic: a
// missing one would stop the consumer at the first poison event, so it
// stops it now, saying which.
func (c *Consumer) checkDeadLetterTopics(ctx context.Context) error {
	req := kmsg.NewPtrMetadataRequest()
	for _, t := range c.cfg.Topics {
		rt := kmsg.NewMetadataRequestTopic()
		rt.Topic = kmsg.StringPtr(t + c.cfg.DeadLetterSuffix)
		req.Topics = append(req.Topics, rt)
	}
	mctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	resp, err := req.RequestWith(mctx, c.dlq)
	if err != nil {
		if ctx.Err() != nil {
			return nil // stopped before it started
		}
		return fmt.Errorf("events: reading the dead-letter topics' metadata: %w", err)
	}
	for _, t := range resp.Topics {
		if err := kerr.ErrorForCode(t.ErrorCode); err != nil {
			name := ""
			if t.Topic != nil {
				name = *t.Topic
			}
			return fmt.Errorf("events: dead-letter topic %q: %w (create it: every consumed topic needs one)", name, err)
		}
	}
	return nil
}

// rewind makes the client fetch again from each partition's first
// unfinished record (a hurried round's): the client's position has moved
// past the whole round, and a partition this member keeps through the
// rebalance would otherwise skip them — and a later commit pass them.
// Called before AllowRebalance, as franz-go asks; a partition that moves
// is fetched by its new owner from the committed offset anyway.
func (c *Consumer) rewind(undone []*kgo.Record) {
	to := map[string]map[int32]kgo.EpochOffset{}
	for _, r := range undone {
		if r == nil {
			continue
		}
		if to[r.Topic] == nil {
			to[r.Topic] = map[int32]kgo.EpochOffset{}
		}
		if at, ok := to[r.Topic][r.Partition]; ok && at.Offset <= r.Offset {
			continue // an earlier record of the partition is undone too
		}
		to[r.Topic][r.Partition] = kgo.EpochOffset{Epoch: r.LeaderEpoch, Offset: r.Offset}
	}
	c.cl.SetOffsets(to)
}

// handleRound handles a round's records: each partition's are split by
// key into Workers lanes, and the lanes run at once on the round's
// goroutines, each lane's events one after the other. It returns, per
// partition, the last record of the prefix that is finished (nil when the
// first is not) — only that much may be committed — and the first record
// that is not (nil when all are).
//
// How many goroutines run the lanes adapts to the handler: one per lane
// while events take long (a handler waiting on a database: the lanes
// wait side by side), GOMAXPROCS while they are quick, where a goroutine
// per lane cost more than the handling (a fast handler gains nothing
// from waiting side by side). The previous round decides.
func (c *Consumer) handleRound(ctx, hctx context.Context, parts [][]*kgo.Record) (last, undone []*kgo.Record) {
	type lane struct {
		part int
		recs []int // indexes into parts[part], in offset order
	}
	done := make([][]bool, len(parts))
	var lanes []lane
	events := 0
	for pi, recs := range parts {
		done[pi] = make([]bool, len(recs))
		events += len(recs)
		byKey := make([][]int, c.cfg.Workers)
		for i, r := range recs {
			l := laneOf(r.Key, r.Offset, c.cfg.Workers)
			byKey[l] = append(byKey[l], i)
		}
		for _, idx := range byKey {
			if len(idx) > 0 {
				lanes = append(lanes, lane{pi, idx})
			}
		}
	}
	goroutines := len(lanes)
	if c.quickHandler {
		goroutines = min(goroutines, runtime.GOMAXPROCS(0))
	}
	var next atomic.Int64
	run := func() {
		w := c.takeWorker(hctx)
		defer c.returnWorker(w)
		for {
			k := int(next.Add(1)) - 1
			if k >= len(lanes) {
				return
			}
			ln := lanes[k]
			// Counted, and the events allocated, once per lane: shared
			// counters and an allocation per event were a good part of
			// the consumer's own cost.
			c.cfg.Retry.Budget.RequestN(c.clock.Load(), len(ln.recs)) // the watchdog's time: at most a second old
			evs := make([]Event, len(ln.recs))
			for j, i := range ln.recs {
				if !c.handle(ctx, w, parts[ln.part][i], &evs[j]) {
					return // draining: the rest stays for the next owner
				}
				done[ln.part][i] = true
			}
		}
	}
	start := time.Now()
	var wg sync.WaitGroup
	for range goroutines - 1 {
		wg.Go(run)
	}
	run()
	wg.Wait()
	if ctx.Err() == nil { // a round cut short says nothing of its handler
		// Quick: under quickEventTime per event and goroutine.
		c.quickHandler = time.Since(start)*time.Duration(goroutines) < quickEventTime*time.Duration(events)
	}

	last, undone = make([]*kgo.Record, len(parts)), make([]*kgo.Record, len(parts))
	for pi, recs := range parts {
		for i, r := range recs {
			if !done[pi][i] {
				undone[pi] = r
				break
			}
			last[pi] = r
		}
	}
	return last, undone
}

// quickEventTime is the handling time per event under which the lanes of
// a round share GOMAXPROCS goroutines instead of one each.
const quickEventTime = 20 * time.Microsecond

// laneOf picks a partition's worker for a record: by key, so that a key's
// events stay in order; keyless records spread by offset.
func laneOf(key []byte, offset int64, n int) int {
	if key == nil {
		return int(offset % int64(n))
	}
	h := uint32(2166136261) // 32-bit FNV-1a
	for _, b := range key {
		h = (h ^ uint32(b)) * 16777619
	}
	return int(h % uint32(n))
}

// commit commits the finished prefix of each partition of the round,
// retrying until it is accepted: the next round starts only then, so a
// member that dies later replays at most one round (KVDedup's window
// counts on it). A refusal because the group moved on (this member's
// generation is over) ends the attempts — the partitions are another's,
// who replays the round; a minute of failures is an error.
func (c *Consumer) commit(ctx context.Context, last []*kgo.Record) error {
	var recs []*kgo.Record
	for _, r := range last {
		if r != nil {
			recs = append(recs, r)
		}
	}
	if len(recs) == 0 {
		return nil
	}
	// A commit during a drain still goes out: it is what keeps the next
	// owner from handling these events again (for at most 10 s then, the
	// drain's own bound — also for a commit the drain found in flight).
	const drainLimit = 10 * time.Second
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	limit := time.Minute
	if ctx.Err() != nil {
		limit = drainLimit
		cctx, cancel = context.WithTimeout(cctx, drainLimit)
		defer cancel()
	} else {
		// (A timer left armed after the commit only cancels cctx again.)
		defer context.AfterFunc(ctx, func() { time.AfterFunc(drainLimit, cancel) })()
	}
	bo := backoff.New(backoff.Config{Base: 100 * time.Millisecond, Max: 5 * time.Second})
	for {
		err := c.cl.CommitRecords(cctx, recs...)
		switch {
		case err == nil:
			c.committed.Add(1)
			return nil
		case errors.Is(err, kerr.IllegalGeneration), errors.Is(err, kerr.UnknownMemberID), errors.Is(err, kerr.RebalanceInProgress), errors.Is(err, kerr.FencedInstanceID):
			c.cfg.Logger.Warn("events: commit refused, the group moved on; the partitions' next owner handles the round again", "err", err)
			return nil
		}
		c.cfg.Logger.Warn("events: commit failed; retrying", "err", err)
		if bo.Wait(cctx) != nil {
			return fmt.Errorf("events: commits failed for %v: %w", limit, err)
		}
	}
}

// handle runs the handler on r with retries, on worker w, and
// dead-letters it when they are spent. It reports whether r is finished;
// false only when ctx ended (a drain) first.
func (c *Consumer) handle(ctx context.Context, w *worker, r *kgo.Record, ev *Event) bool {
	if ctx.Err() != nil || c.fatal.Load() != nil {
		return false // draining, hurried or failed: start nothing new
	}
	if idErr := fillEvent(ev, r); idErr != nil {
		return c.deadLetter(ctx, r, 0, idErr)
	}
	var span trace.Span
	if c.tracer != nil {
		parent := traceContext.Extract(w.parent, headerCarrier{&r.Headers})
		_, span = c.tracer.Start(parent, SpanHandle, trace.WithSpanKind(trace.SpanKindConsumer),
			trace.WithAttributes(attrSystem, attrTopic.String(r.Topic), attrPartition.String(strconv.Itoa(int(r.Partition))),
				attrOffset.Int64(r.Offset), attrID.String(ev.ID)))
		defer span.End()
	}
	retry := c.cfg.Retry
	var bo *backoff.Backoff // made at the first failure
	var err error
	for attempt := 1; ; attempt++ {
		ev.Attempt = attempt
		if err = w.attempt(span, c, ev); err == nil {
			w.handled++
			if span != nil {
				span.SetAttributes(attrAttempt.Int(attempt))
			}
			return true
		}
		if span != nil {
			span.AddEvent("beacon.events.attempt_failed", trace.WithAttributes(attrAttempt.Int(attempt)))
		}
		if IsPermanent(err) || !retry.RetryOn(err) || attempt >= retry.MaxAttempts {
			break
		}
		// Paid from the budget; refused, it waits MaxBackoff and goes
		// anyway: the budget slows retries down, it never drops an event
		// (nor waits for new events that a stuck round will not fetch).
		if !retry.Budget.TryRetry(time.Now().UnixNano()) && backoff.Sleep(ctx, retry.MaxBackoff) != nil {
			return false
		}
		if bo == nil {
			bo = backoff.New(backoff.Config{Base: retry.BaseBackoff, Max: retry.MaxBackoff, Jitter: retry.Jitter})
		}
		if bo.Wait(ctx) != nil {
			return false
		}
		c.retries.Add(1)
	}
	if span != nil {
		span.SetStatus(codes.Error, err.Error())
	}
	return c.deadLetter(ctx, r, ev.Attempt, err)
}

// call runs the handler once, turning a panic into an error.
func (c *Consumer) call(ctx context.Context, ev *Event) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("events: handler panicked: %v", p)
		}
	}()
	return c.cfg.Handler(ctx, ev)
}

// errHandlerTimeout is the cause of an attempt's context ending at
// HandlerTimeout.
var errHandlerTimeout = errors.New("events: handler timeout")

// worker bounds a lane's handler attempts by HandlerTimeout without a
// timer or a context per event (at a million events a second they were
// most of the consumer's cost): the lane counts its attempts (seq, odd
// while one runs) and the consumer's watchdog cancels the lane's context
// when it sees the same attempt running for HandlerTimeout; the next
// attempt gets a fresh context.
type worker struct {
	parent context.Context
	seq    atomic.Uint64 // attempts begun and ended: odd while one runs
	mu     sync.Mutex    // the context against the watchdog's cancel
	ctx    context.Context
	cancel context.CancelCauseFunc

	handled int64 // events handled, added to the consumer's count when the lane ends

	// The watchdog's own: the attempt it last saw and since when.
	seenSeq uint64
	seenAt  time.Time
}

func newWorker(parent context.Context) *worker {
	w := &worker{parent: parent}
	w.renew()
	return w
}

func (w *worker) renew() {
	w.ctx, w.cancel = context.WithCancelCause(w.parent)
}

// attempt runs c's handler on ev in the lane's context (with span, when
// tracing); the watchdog ends it at the timeout.
func (w *worker) attempt(span trace.Span, c *Consumer, ev *Event) error {
	ctx := w.ctx // only this goroutine changes it
	if span != nil {
		ctx = trace.ContextWithSpan(ctx, span)
	}
	w.seq.Add(1)
	err := c.call(ctx, ev)
	w.seq.Add(1)
	// Under the lock: a cancel the watchdog decided on for this attempt
	// is seen here, not by the next attempt.
	w.mu.Lock()
	if w.ctx.Err() != nil {
		w.cancel(nil)
		w.renew()
	}
	w.mu.Unlock()
	return err
}

// check is the watchdog's look at the lane at now.
func (w *worker) check(now time.Time, timeout time.Duration) {
	s := w.seq.Load()
	if s%2 == 0 || s != w.seenSeq {
		w.seenSeq, w.seenAt = s, now
		return
	}
	if now.Sub(w.seenAt) < timeout {
		return
	}
	w.mu.Lock()
	if w.seq.Load() == s { // still that attempt
		w.cancel(errHandlerTimeout)
	}
	w.mu.Unlock()
}

// watch is the consumer's watchdog: every eighth of HandlerTimeout (at
// most a second) it ends the attempts that have run for HandlerTimeout,
// and keeps the clock the lanes count their events by for the retry
// budget (a clock read per event cost more than a no-op handler).
func (c *Consumer) watch(ctx context.Context) {
	t := time.NewTicker(min(max(c.cfg.HandlerTimeout/8, time.Millisecond), time.Second))
	defer t.Stop()
	var ws []*worker
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			c.clock.Store(now.UnixNano())
			c.lanesMu.Lock()
			ws = append(ws[:0], c.workers...)
			c.lanesMu.Unlock()
			for _, w := range ws {
				w.check(now, c.cfg.HandlerTimeout)
			}
		}
	}
}

// takeWorker returns an idle worker for a lane, or a new one. Workers
// are kept for the consumer's life (as many as lanes ran at once), so a
// round makes no contexts and registers nothing with the watchdog; their
// contexts end with hctx, the parent of all.
func (c *Consumer) takeWorker(hctx context.Context) *worker {
	c.lanesMu.Lock()
	defer c.lanesMu.Unlock()
	if n := len(c.idle); n > 0 {
		w := c.idle[n-1]
		c.idle = c.idle[:n-1]
		return w
	}
	w := newWorker(hctx)
	c.workers = append(c.workers, w)
	return w
}

// returnWorker makes w idle again after its lane, counting what it handled.
func (c *Consumer) returnWorker(w *worker) {
	c.handled.Add(w.handled)
	w.handled = 0
	c.lanesMu.Lock()
	c.idle = append(c.idle, w)
	c.lanesMu.Unlock()
}

// deadLetter publishes r, as it came, to its topic's dead-letter topic
// with where it came from and why. A record the brokers find too large
// goes again without its value (header HeaderDLQValueDropped); one that
// cannot be written in three tries stops the consumer (fail), as does
// ctx's end — either way r stays uncommitted.
func (c *Consumer) deadLetter(ctx context.Context, r *kgo.Record, attempts int, cause error) bool {
	msg := cause.Error()
	if len(msg) > 1024 {
		msg = msg[:1024]
	}
	hs := append(append([]kgo.RecordHeader(nil), r.Headers...),
		kgo.RecordHeader{Key: HeaderDLQTopic, Value: []byte(r.Topic)},
		kgo.RecordHeader{Key: HeaderDLQPartition, Value: []byte(strconv.Itoa(int(r.Partition)))},
		kgo.RecordHeader{Key: HeaderDLQOffset, Value: []byte(strconv.FormatInt(r.Offset, 10))},
		kgo.RecordHeader{Key: HeaderDLQAttempts, Value: []byte(strconv.Itoa(attempts))},
		kgo.RecordHeader{Key: HeaderDLQError, Value: []byte(msg)})
	dead := &kgo.Record{Topic: r.Topic + c.cfg.DeadLetterSuffix, Key: r.Key, Value: r.Value, Headers: hs}
	bo := backoff.New(backoff.Config{Base: 100 * time.Millisecond, Max: 5 * time.Second})
	var err error
	for try := 0; try < 3; try++ {
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err = c.dlq.ProduceSync(pctx, dead).FirstErr()
		cancel()
		if err == nil {
			c.deadLettered.Add(1)
			c.cfg.Logger.Warn("events: dead-lettered", "topic", r.Topic, "partition", r.Partition, "offset", r.Offset, "attempts", attempts, "err", msg)
			return true
		}
		if ctx.Err() != nil {
			return false
		}
		if errors.Is(err, kerr.MessageTooLarge) && dead.Value != nil {
			dead = &kgo.Record{Topic: dead.Topic, Key: dead.Key, Headers: append(dead.Headers, kgo.RecordHeader{Key: HeaderDLQValueDropped, Value: []byte(strconv.Itoa(len(r.Value)))})}
			continue
		}
		c.cfg.Logger.Warn("events: dead-letter publish failed", "topic", dead.Topic, "err", err)
		if bo.Wait(ctx) != nil {
			return false
		}
	}
	c.fail(fmt.Errorf("events: dead-letter topic %q refuses %s/%d@%d: %w", dead.Topic, r.Topic, r.Partition, r.Offset, err))
	return false
}

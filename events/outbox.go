package events

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/backoff"
)

// Outbox is a transactional outbox in beacon KV: Put writes a service's
// state change and the events it causes in one KV transaction — both or
// neither — and Relay publishes the events, in order, and removes them
// once the brokers acknowledged them. Crash anywhere and nothing is lost:
// an event is removed only after it was published, so a relay that dies
// in between leaves it to the next one, which publishes it again (same
// id: the consumers' KVDedup absorbs it).
//
// The events wait in a fixed set of shard keys (prefix + "shard-N"), an
// event's shard chosen by its key, so a key's events stay in one list in
// the order they were put; no key is created per event, so the KV's key
// count and history stay bounded however many events pass through.
type Outbox struct {
	kv       *client.KV
	prefix   string
	shards   int
	maxBytes int
	opts     []client.CallOption
}

// Outbox defaults.
const (
	DefaultOutboxShards = 8
	// DefaultOutboxShardBytes bounds the shards one Put rewrites,
	// together: half the server's default limit on a transaction's values
	// (512 KiB), the rest left to the caller's own. A Put past it is
	// refused (ErrOutboxFull) until the relay catches up.
	DefaultOutboxShardBytes = 256 << 10
)

// MaxOutboxShards leaves room, in the server's 32 operations per KV
// transaction, for the caller's own. Changing a service's shard count
// moves keys between shards: let the relay empty the outbox first, or a
// key's waiting events may be published out of order.
const MaxOutboxShards = 16

// ErrOutboxFull refuses a Put whose events do not fit in their shard.
var ErrOutboxFull = errors.New("events: outbox shard full (max outbox shard bytes); the relay is behind")

// NewOutbox keeps the outbox under prefix (for example "outbox/orders/")
// in shards keys (0: DefaultOutboxShards) of at most shardBytes each (0:
// DefaultOutboxShardBytes). opts (client.InNamespace) apply to every call.
func NewOutbox(kv *client.KV, prefix string, shards, shardBytes int, opts ...client.CallOption) (*Outbox, error) {
	if shards == 0 {
		shards = DefaultOutboxShards
	}
	if shardBytes == 0 {
		shardBytes = DefaultOutboxShardBytes
	}
	switch {
	case prefix == "":
		return nil, errors.New("events: outbox prefix: empty")
	case shards < 1 || shards > MaxOutboxShards:
		return nil, fmt.Errorf("events: outbox shards: %d, must be 1 to %d", shards, MaxOutboxShards)
	case shardBytes < 1024:
		return nil, fmt.Errorf("events: outbox shard bytes: %d, must be at least 1024", shardBytes)
	}
	return &Outbox{kv: kv, prefix: prefix, shards: shards, maxBytes: shardBytes, opts: opts}, nil
}

// pending is an event as it waits in the outbox.
type pending struct {
	ID      string   `json:"id"`
	Topic   string   `json:"topic"`
	Key     []byte   `json:"key,omitempty"`
	Value   []byte   `json:"value,omitempty"`
	Headers []Header `json:"headers,omitempty"`
}

type shardList struct {
	Events []pending `json:"events"`
}

func (o *Outbox) shardKey(ev *Event) string {
	h := fnv.New32a()
	if ev.Key != nil {
		h.Write(ev.Key)
	} else {
		h.Write([]byte(ev.ID))
	}
	return o.prefix + "shard-" + strconv.Itoa(int(h.Sum32()%uint32(o.shards)))
}

func decodeShard(b []byte) (shardList, error) {
	var l shardList
	if len(b) == 0 {
		return l, nil
	}
	err := json.Unmarshal(b, &l)
	return l, err
}

// Put applies ops (the state change: client.OpPut …) and enqueues evs in
// one transaction. Events get their ids here (the ids the consumers will
// see). A compare among ops that fails returns client.ErrCompareFailed
// and enqueues nothing.
func (o *Outbox) Put(ctx context.Context, ops []client.KVOp, evs ...*Event) (revision int64, err error) {
	byShard := map[string][]pending{}
	for _, ev := range evs {
		if ev.ID == "" {
			ev.ID = newID()
		}
		// What a relay's producer accepts by default: a bigger event
		// would wait in the outbox for ever.
		if err := ev.check(min(o.maxBytes, DefaultMaxEventBytes)); err != nil {
			return 0, err
		}
		pe := pending{ID: ev.ID, Topic: ev.Topic, Key: ev.Key, Value: ev.Value, Headers: ev.Headers}
		if b, _ := json.Marshal(shardList{Events: []pending{pe}}); len(b) > o.maxBytes {
			return 0, fmt.Errorf("%w: event on %q: %d bytes in the outbox (base64), at most %d (max outbox shard bytes)", ErrInvalidEvent, ev.Topic, len(b), o.maxBytes)
		}
		k := o.shardKey(ev)
		byShard[k] = append(byShard[k], pe)
	}
	keys := make([]string, 0, len(byShard))
	for k := range byShard {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	bo := backoff.New(backoff.Config{Base: 2 * time.Millisecond, Max: 100 * time.Millisecond, Jitter: 0.5})
	for range 64 {
		all := append([]client.KVOp(nil), ops...)
		revs := make([]int64, len(keys))
		written := 0 // the server bounds a transaction's values together
		for i, k := range keys {
			cur, rev, err := o.read(ctx, k)
			if err != nil {
				return 0, err
			}
			cur.Events = append(cur.Events, byShard[k]...)
			b, _ := json.Marshal(cur)
			if written += len(b); written > o.maxBytes {
				return 0, fmt.Errorf("%w: the shards this Put rewrites would hold %d bytes, at most %d", ErrOutboxFull, written, o.maxBytes)
			}
			revs[i] = rev
			all = append(all, client.OpPut(k, b).IfRevision(rev))
		}
		rev, err := o.kv.Txn(ctx, all, o.opts...)
		if err == nil || !errors.Is(err, client.ErrCompareFailed) {
			return rev, err
		}
		// A shard moved (another Put, the relay) or the caller's compare
		// failed: if no shard moved, it was the caller's.
		moved := false
		for i, k := range keys {
			_, rev, rerr := o.read(ctx, k)
			if rerr != nil {
				return 0, rerr
			}
			moved = moved || rev != revs[i]
		}
		if !moved {
			return 0, err
		}
		if bo.Wait(ctx) != nil {
			return 0, ctx.Err()
		}
	}
	return 0, errors.New("events: outbox shards kept changing; try again")
}

// read returns a shard's list and revision (0: absent).
func (o *Outbox) read(ctx context.Context, key string) (shardList, int64, error) {
	kv, err := o.kv.Get(ctx, key, o.opts...)
	if errors.Is(err, client.ErrNotFound) {
		return shardList{}, 0, nil
	}
	if err != nil {
		return shardList{}, 0, err
	}
	l, err := decodeShard(kv.Value)
	if err != nil {
		return shardList{}, 0, fmt.Errorf("events: outbox shard %q: %w", key, err)
	}
	return l, kv.ModRevision, nil
}

// Relay publishes the outbox through p until ctx ends. Run it on every
// instance of the service: one relay at a time leads (a beacon election,
// prefix + "relay", on sess), the others wait their turn. The leader
// publishes each shard's events in order, one shard's list per produce
// (an idempotent producer keeps their order per partition), then removes
// them with its fencing token, so a deposed leader can remove nothing.
func (o *Outbox) Relay(ctx context.Context, c *client.Client, sess *client.Session, p *Producer) error {
	el := c.Election(sess, o.prefix+"relay", o.opts...)
	bo := backoff.New(backoff.Config{Base: 100 * time.Millisecond, Max: 5 * time.Second})
	for ctx.Err() == nil {
		held, err := el.Campaign(ctx, nil)
		if err != nil {
			select {
			case <-sess.Done():
				return fmt.Errorf("events: outbox relay: its session ended: %w", sess.Err())
			default:
			}
			if ctx.Err() == nil {
				p.cfg.Logger.Warn("events: outbox relay campaign", "err", err)
				_ = bo.Wait(ctx)
			}
			continue
		}
		led := time.Now()
		err = o.lead(ctx, held, p)
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		_ = held.Unlock(uctx)
		cancel()
		if err != nil && ctx.Err() == nil {
			p.cfg.Logger.Warn("events: outbox relay lost its lead", "err", err)
			// A lead that failed at once (its watch refused, say) must not
			// turn into a tight campaign-and-fail loop.
			if time.Since(led) > time.Minute {
				bo.Reset()
			}
			_ = bo.Wait(ctx)
		}
	}
	return nil
}

// lead publishes while held leads: a pass over every shard after each
// change under the prefix.
func (o *Outbox) lead(ctx context.Context, held *client.Held, p *Producer) error {
	lctx, cancel := context.WithCancel(ctx)
	defer cancel()
	context.AfterFunc(held.Context(), cancel)
	w, err := o.kv.Watch(lctx, o.prefix, true, o.opts...)
	if err != nil {
		return err
	}
	defer w.Close()
	bo := backoff.New(backoff.Config{Base: 100 * time.Millisecond, Max: 5 * time.Second})
	var st client.KVState
	for again := false; ; {
		if !again {
			if st, err = w.Next(lctx); err != nil {
				return err
			}
		}
		keys := make([]string, 0, len(st.Values))
		for k := range st.Values {
			if isShard(k, o.prefix) {
				keys = append(keys, k)
			}
		}
		slices.Sort(keys)
		// A shard that fails waits for the next pass; the others go on.
		again = false
		for _, k := range keys {
			if err := o.drainShard(lctx, k, held, p); err != nil {
				if lctx.Err() != nil {
					return lctx.Err()
				}
				p.cfg.Logger.Warn("events: outbox relay", "shard", k, "err", err)
				again = true
			}
		}
		if !again {
			bo.Reset()
		} else if bo.Wait(lctx) != nil {
			return lctx.Err()
		}
	}
}

func isShard(key, prefix string) bool {
	n, ok := strings.CutPrefix(key, prefix+"shard-")
	if !ok {
		return false
	}
	_, err := strconv.Atoi(n)
	return err == nil
}

// relayChunk bounds the events published before they are removed: what a
// relay that dies in between leaves to be published again, well inside
// KVDedup's default window.
const relayChunk = 200

// drainShard publishes a shard's events, a chunk at a time, and removes
// each chunk once the brokers acknowledged it. An event the brokers or
// the producer refuse for good (too large, unknown or forbidden topic) is
// moved to the parked list (prefix + "parked", ParkedEvents) so that the
// events after it go on.
func (o *Outbox) drainShard(ctx context.Context, key string, held *client.Held, p *Producer) error {
	for {
		l, _, err := o.read(ctx, key)
		if err != nil || len(l.Events) == 0 {
			return err
		}
		chunk := l.Events[:min(len(l.Events), relayChunk)]
		err = p.Publish(ctx, toEvents(chunk)...)
		if err == nil {
			if err := o.remove(ctx, key, held, chunk, nil); err != nil {
				return err
			}
			continue
		}
		if !refusedForGood(err) {
			return err
		}
		// One at a time, to find the event refused: those before it are
		// published, it is parked.
		refused := false
		for i := range chunk {
			perr := p.Publish(ctx, toEvents(chunk[i:i+1])...)
			if perr == nil {
				continue
			}
			if !refusedForGood(perr) {
				return perr
			}
			p.cfg.Logger.Error("events: outbox event refused for good; parked", "id", chunk[i].ID, "topic", chunk[i].Topic, "err", perr)
			if err := o.remove(ctx, key, held, chunk[:i+1], &parkedEvent{Event: chunk[i], Error: perr.Error()}); err != nil {
				return err
			}
			refused = true
			break
		}
		if !refused { // the batch was refused, each event alone was not
			if err := o.remove(ctx, key, held, chunk, nil); err != nil {
				return err
			}
		}
	}
}

func toEvents(ps []pending) []*Event {
	evs := make([]*Event, len(ps))
	for i, e := range ps {
		evs[i] = &Event{ID: e.ID, Topic: e.Topic, Key: e.Key, Value: e.Value, Headers: e.Headers}
	}
	return evs
}

// refusedForGood tells a refusal of the event itself, which trying again
// cannot change (its contents against the producer's or the brokers'
// limits), from a failure — brokers down, a topic not created yet or not
// authorized yet — after which the shard waits and tries again: an
// operator's fix then lets everything through, and nothing is set aside.
func refusedForGood(err error) bool {
	var ke *kerr.Error
	if errors.Is(err, ErrInvalidEvent) {
		return true
	}
	if !errors.As(err, &ke) || ke.Retriable {
		return false
	}
	switch ke {
	case kerr.TopicAuthorizationFailed, kerr.ClusterAuthorizationFailed, kerr.GroupAuthorizationFailed,
		kerr.TransactionalIDAuthorizationFailed, kerr.SaslAuthenticationFailed:
		return false
	}
	return true
}

// parkedEvent is an event the relay could never publish, and why.
type parkedEvent struct {
	Event pending `json:"event"`
	Error string  `json:"error"`
}

// remove takes done, the head of the shard's list, off it — and, with
// parked, sets that event aside under prefix + "parked/" + its id in the
// same transaction — fenced by the lead: a deposed relay removes nothing.
func (o *Outbox) remove(ctx context.Context, key string, held *client.Held, done []pending, parked *parkedEvent) error {
	if parked != nil {
		n, err := o.parkedCount(ctx)
		if err != nil {
			return err
		}
		if n >= MaxParked {
			return fmt.Errorf("events: outbox: %d events parked already (MaxParked); the shard waits until an operator clears them", n)
		}
	}
	bo := backoff.New(backoff.Config{Base: 5 * time.Millisecond, Max: 200 * time.Millisecond, Jitter: 0.5})
	for {
		cur, rev, err := o.read(ctx, key)
		if err != nil {
			return err
		}
		n := len(done)
		if len(cur.Events) < n || cur.Events[0].ID != done[0].ID || cur.Events[n-1].ID != done[n-1].ID {
			return fmt.Errorf("events: outbox shard %q changed under its relay (another leader?)", key)
		}
		cur.Events = cur.Events[n:]
		b, _ := json.Marshal(cur)
		ops := []client.KVOp{client.OpPut(key, b).IfRevision(rev)}
		if parked != nil {
			pb, _ := json.Marshal(parked)
			ops = append(ops, client.OpPut(o.prefix+"parked/"+parked.Event.ID, pb))
		}
		_, err = o.kv.Txn(ctx, ops, append(slices.Clone(o.opts), client.Fenced(held))...)
		if !errors.Is(err, client.ErrCompareFailed) {
			return err
		}
		// A Put appended meanwhile: again, after a short wait so that a
		// stream of Puts cannot starve the removal.
		if bo.Wait(ctx) != nil {
			return ctx.Err()
		}
	}
}

// MaxParked bounds the events set aside; at the bound, a shard whose head
// is refused waits (logged) instead of dropping anything.
const MaxParked = 100

func (o *Outbox) parkedCount(ctx context.Context) (int, error) {
	kvs, _, err := o.kv.List(ctx, o.prefix+"parked/", o.opts...)
	return len(kvs), err
}

// Parked is an event the relay could never publish.
type Parked struct {
	Event *Event
	Error string
}

// ParkedEvents lists the events the relay set aside because the brokers
// or the producer refused them for good (at most MaxParked), for an
// operator to fix and Put again; deleting their keys
// (prefix + "parked/" + id) clears them.
func (o *Outbox) ParkedEvents(ctx context.Context) ([]Parked, error) {
	kvs, _, err := o.kv.List(ctx, o.prefix+"parked/", o.opts...)
	if err != nil {
		return nil, err
	}
	out := make([]Parked, 0, len(kvs))
	for _, kv := range kvs {
		var pe parkedEvent
		if err := json.Unmarshal(kv.Value, &pe); err != nil {
			return out, fmt.Errorf("events: outbox parked event %q: %w", kv.Key, err)
		}
		out = append(out, Parked{Event: toEvents([]pending{pe.Event})[0], Error: pe.Error})
	}
	return out, nil
}

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
	// DefaultOutboxShardBytes keeps a shard under the server's default
	// --max-kv-value-bytes (512 KiB): a Put that would pass it is refused
	// (ErrOutboxFull) until the relay catches up.
	DefaultOutboxShardBytes = 256 << 10
)

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
	case shards < 1 || shards > 256:
		return nil, fmt.Errorf("events: outbox shards: %d, must be 1 to 256", shards)
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
		k := o.shardKey(ev)
		byShard[k] = append(byShard[k], pending{ID: ev.ID, Topic: ev.Topic, Key: ev.Key, Value: ev.Value, Headers: ev.Headers})
	}
	keys := make([]string, 0, len(byShard))
	for k := range byShard {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for range 64 {
		all := append([]client.KVOp(nil), ops...)
		revs := make([]int64, len(keys))
		for i, k := range keys {
			cur, rev, err := o.read(ctx, k)
			if err != nil {
				return 0, err
			}
			cur.Events = append(cur.Events, byShard[k]...)
			b, _ := json.Marshal(cur)
			if len(b) > o.maxBytes {
				return 0, fmt.Errorf("%w: %s would hold %d bytes, at most %d", ErrOutboxFull, k, len(b), o.maxBytes)
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
			if ctx.Err() == nil {
				p.cfg.Logger.Warn("events: outbox relay campaign", "err", err)
				_ = bo.Wait(ctx)
			}
			continue
		}
		bo.Reset()
		if err := o.lead(ctx, held, p); err != nil && ctx.Err() == nil {
			p.cfg.Logger.Warn("events: outbox relay lost its lead", "err", err)
		}
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		_ = held.Unlock(uctx)
		cancel()
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
	for {
		st, err := w.Next(lctx)
		if err != nil {
			return err
		}
		keys := make([]string, 0, len(st.Values))
		for k := range st.Values {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			if !isShard(k, o.prefix) {
				continue
			}
			for {
				err := o.drainShard(lctx, k, held, p)
				if err == nil {
					bo.Reset()
					break
				}
				if lctx.Err() != nil {
					return lctx.Err()
				}
				p.cfg.Logger.Warn("events: outbox relay", "shard", k, "err", err)
				if bo.Wait(lctx) != nil {
					return lctx.Err()
				}
			}
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

// drainShard publishes a shard's events and removes them from it.
func (o *Outbox) drainShard(ctx context.Context, key string, held *client.Held, p *Producer) error {
	l, _, err := o.read(ctx, key)
	if err != nil || len(l.Events) == 0 {
		return err
	}
	evs := make([]*Event, len(l.Events))
	for i, e := range l.Events {
		evs[i] = &Event{ID: e.ID, Topic: e.Topic, Key: e.Key, Value: e.Value, Headers: e.Headers}
	}
	if err := p.Publish(ctx, evs...); err != nil {
		return err
	}
	// Remove what was published: still the list's head (only the leader
	// removes; Puts append), fenced by the lead.
	for {
		cur, rev, err := o.read(ctx, key)
		if err != nil {
			return err
		}
		n := len(evs)
		if len(cur.Events) < n || cur.Events[n-1].ID != evs[n-1].ID || cur.Events[0].ID != evs[0].ID {
			return fmt.Errorf("events: outbox shard %q changed under its relay (another leader?)", key)
		}
		cur.Events = cur.Events[n:]
		b, _ := json.Marshal(cur)
		_, err = o.kv.Txn(ctx, []client.KVOp{client.OpPut(key, b).IfRevision(rev)}, append(slices.Clone(o.opts), client.Fenced(held))...)
		if errors.Is(err, client.ErrCompareFailed) {
			continue // a Put appended meanwhile
		}
		return err
	}
}

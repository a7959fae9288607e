package events

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"strconv"
	"sync"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/backoff"
)

// KVDedup makes a handler's effect in beacon KV happen once per event:
// Apply writes the handler's operations and the event's mark in one KV
// transaction, or nothing when the event was applied before. A
// redelivered event (a member died before committing) and a republished
// one (an outbox relay died before marking it sent: same id, new offset)
// are both recognised, so aggregates stay exact through crashes.
//
// The mark is the hash of the event's id (of its offset when it has none)
// in a ring of the last Window events applied in its partition, stored
// at one key per topic partition, compared on its revision in the same
// transaction: a member that lost the partition and still applies an
// event finds the new owner's ring and does nothing twice. Window must
// cover what can come back: at least twice the consumer's MaxPollRecords
// (a redelivery replays at most the two rounds not yet committed), and the
// distance, in events of a partition, at which a republished duplicate
// may follow its original.
type KVDedup struct {
	kv     *client.KV
	prefix string
	window int
	opts   []client.CallOption

	mu    sync.Mutex
	rings map[string]*ring         // by state key: the last state seen, guarded by mu
	turns map[string]chan struct{} // by state key: whose turn it is in this process, guarded by mu
}

// DefaultDedupWindow is three times DefaultMaxPollRecords (a member that
// dies replays at most two rounds, and one more is the margin for a
// republished duplicate); MaxDedupWindow keeps
// the ring (8 bytes an event) at 256 KiB, half the server's default limit
// on a transaction's values, leaving the rest to the handler's own.
const (
	DefaultDedupWindow = 3 * DefaultMaxPollRecords
	MaxDedupWindow     = 1 << 15
)

// NewKVDedup keeps its state under prefix (for example
// "events/dedup/GROUP/") in the client's KV; window 0 means
// DefaultDedupWindow. opts (client.InNamespace) apply to every call.
func NewKVDedup(kv *client.KV, prefix string, window int, opts ...client.CallOption) (*KVDedup, error) {
	if window == 0 {
		window = DefaultDedupWindow
	}
	if window < 1 || window > MaxDedupWindow {
		return nil, fmt.Errorf("events: dedup window: %d, must be 1 to %d", window, MaxDedupWindow)
	}
	if prefix == "" {
		return nil, errors.New("events: dedup prefix: empty")
	}
	return &KVDedup{kv: kv, prefix: prefix, window: window, opts: opts, rings: map[string]*ring{}, turns: map[string]chan struct{}{}}, nil
}

// ErrDedupContention is returned when the partition's state kept changing
// under Apply until its context ended (its other workers, or another
// member, applying the same partition's events).
var ErrDedupContention = errors.New("events: dedup state kept changing")

// Apply applies ops (puts, deletes, checks: client.OpPut …) and marks ev
// applied, all in one transaction; duplicate is true, and nothing is
// written, when ev was applied before. A compare among ops that fails
// returns client.ErrCompareFailed, as KV.Txn does.
func (d *KVDedup) Apply(ctx context.Context, ev *Event, ops ...client.KVOp) (duplicate bool, err error) {
	key := d.prefix + ev.Topic + "/" + strconv.Itoa(int(ev.Partition))
	mark := markOf(ev)
	// A partition's workers in this process take turns on its ring (each
	// would otherwise make the others' compares fail and read again: a
	// round trip wasted per conflict). The turn is taken with ctx, so a
	// wait for it ends with the handler's.
	turn := d.turn(key)
	select {
	case turn <- struct{}{}:
		defer func() { <-turn }()
	case <-ctx.Done():
		return false, ctx.Err()
	}
	// Another process on the same partition (one that lost it and goes
	// on) can still race: jittered waits between its tries.
	bo := backoff.New(backoff.Config{Base: time.Millisecond, Max: 20 * time.Millisecond, Jitter: 0.5})
	for {
		r, err := d.state(ctx, key)
		if err != nil {
			return false, err
		}
		if r.has(mark) {
			return true, nil
		}
		next := r.with(mark, d.window)
		all := append(append([]client.KVOp(nil), ops...), client.OpPut(key, next.encode()).IfRevision(r.revision))
		rev, err := d.kv.Txn(ctx, all, d.opts...)
		if err == nil {
			next.revision = rev
			d.remember(key, next)
			return false, nil
		}
		if !errors.Is(err, client.ErrCompareFailed) {
			return false, err
		}
		// Ours or the caller's compare failed: read the ring itself (not
		// the cache, which a concurrent read may have refilled with the
		// old one); if it did not move, the caller's compare failed.
		d.forget(key)
		fresh, ferr := d.read(ctx, key)
		if ferr != nil {
			return false, ferr
		}
		if fresh.revision == r.revision {
			return false, err
		}
		d.remember(key, fresh)
		if bo.Wait(ctx) != nil {
			return false, fmt.Errorf("%w: %w", ErrDedupContention, ctx.Err())
		}
	}
}

// turn returns the partition's turn in this process.
func (d *KVDedup) turn(key string) chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	t := d.turns[key]
	if t == nil {
		t = make(chan struct{}, 1)
		d.turns[key] = t
	}
	return t
}

func (d *KVDedup) remember(key string, r *ring) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if old := d.rings[key]; old == nil || old.revision < r.revision {
		d.rings[key] = r
	}
}

func (d *KVDedup) forget(key string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.rings, key)
}

// state returns the partition's ring: the last one seen, or read.
func (d *KVDedup) state(ctx context.Context, key string) (*ring, error) {
	d.mu.Lock()
	r := d.rings[key]
	d.mu.Unlock()
	if r != nil {
		return r, nil
	}
	r, err := d.read(ctx, key)
	if err != nil {
		return nil, err
	}
	d.remember(key, r)
	return r, nil
}

// read reads the partition's ring from the KV.
func (d *KVDedup) read(ctx context.Context, key string) (*ring, error) {
	kv, err := d.kv.Get(ctx, key, d.opts...)
	switch {
	case errors.Is(err, client.ErrNotFound):
		return &ring{}, nil
	case err != nil:
		return nil, err
	}
	r, err := decodeRing(kv.Value)
	if err != nil {
		return nil, fmt.Errorf("events: dedup state %q: %w", key, err)
	}
	r.revision = kv.ModRevision
	return r, nil
}

// markOf is the 64-bit hash an event is recognised by.
func markOf(ev *Event) uint64 {
	h := fnv.New64a()
	if ev.ID != "" {
		h.Write([]byte("id:" + ev.ID))
	} else {
		h.Write([]byte("offset:" + strconv.FormatInt(ev.Offset, 10)))
	}
	return h.Sum64()
}

// ring is a partition's last marks, oldest first. Immutable once built.
type ring struct {
	marks    []uint64
	revision int64 // of the KV version it was read from or written as (0: absent)
}

func (r *ring) has(m uint64) bool {
	for _, x := range r.marks {
		if x == m {
			return true
		}
	}
	return false
}

func (r *ring) with(m uint64, window int) *ring {
	marks := append(append(make([]uint64, 0, min(len(r.marks)+1, window)), r.marks[max(0, len(r.marks)+1-window):]...), m)
	return &ring{marks: marks}
}

const ringVersion = 1

func (r *ring) encode() []byte {
	b := make([]byte, 1, 1+8*len(r.marks))
	b[0] = ringVersion
	for _, m := range r.marks {
		b = binary.BigEndian.AppendUint64(b, m)
	}
	return b
}

func decodeRing(b []byte) (*ring, error) {
	if len(b) == 0 || b[0] != ringVersion || (len(b)-1)%8 != 0 {
		return nil, errors.New("not a dedup ring (version 1, 8-byte marks)")
	}
	r := &ring{marks: make([]uint64, (len(b)-1)/8)}
	for i := range r.marks {
		r.marks[i] = binary.BigEndian.Uint64(b[1+8*i:])
	}
	return r, nil
}

// Package config binds a KV key of the beacon config store (docs/kv.md)
// to a typed, validated, hot-reloaded value (docs/config.md):
//
//	type Pricing struct{ Discount float64 `json:"discount"` }
//	b, err := config.Bind(ctx, c, "shop/pricing",
//		config.Validate(func(p Pricing) error { ... }))
//	p := b.Load() // *Pricing: an immutable snapshot, swapped atomically
//
// A value that does not decode or validate is never applied: the last
// good one stays, and the failure is reported (events, the server's apply
// reports). Callbacks run in revision order on one goroutine. A disk
// snapshot of the last good value lets a process start while the
// registry is down. The value never steps back to an older revision, on
// any server.
package config

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/atomicfile"
	"beacon.dev/beacon/registry"
)

// Binding holds the last good value of a key, decoded into T.
type Binding[T any] struct {
	c   *client.Client
	ns  string // the key's namespace
	key string
	o   options[T]

	cur     atomic.Pointer[value[T]]
	seen    int64 // the last state revision applied (run's goroutine only)
	missing bool  // the key was absent at the last state (run's goroutine only)
	id      string
	cancel  context.CancelFunc
	done    chan struct{}
	ready   chan struct{} // closed at the first good value
	readyMu sync.Once
}

type value[T any] struct {
	v        *T
	revision int64
	rollout  bool
}

// Event is what happened at one revision of the key.
type Event[T any] struct {
	Revision int64
	// Old and New are the values before and after (New is nil when the
	// revision was not applied).
	Old, New *T
	// Err says why the revision was not applied: the key was deleted, or
	// its value did not decode or validate. The last good value stays.
	Err error
	// FromDisk: the value came from the disk snapshot (cold start).
	FromDisk bool
	// Rollout: the revision is the key's staged rollout, which selected
	// this reader (docs/kv.md, "Staged rollout").
	Rollout bool
}

type options[T any] struct {
	ns          string
	decode      func([]byte) (T, error)
	validate    func(T) error
	onEvent     func(Event[T])
	dir         string
	maxAge      time.Duration
	coldStart   time.Duration
	def         *T
	reportTo    *client.Session
	reportLabel string
	labels      map[string]string
	identity    string
}

// Option configures a binding.
type Option[T any] func(*options[T])

// Decode replaces the decoder (default: JSON into T, unknown fields
// refused).
func Decode[T any](f func([]byte) (T, error)) Option[T] {
	return func(o *options[T]) { o.decode = f }
}

// Validate refuses values f returns an error for: they are not applied.
func Validate[T any](f func(T) error) Option[T] {
	return func(o *options[T]) { o.validate = f }
}

// OnEvent calls f for every revision of the key, applied or not, in
// revision order, from the binding's one goroutine (f may not block for
// long: later revisions wait).
func OnEvent[T any](f func(Event[T])) Option[T] {
	return func(o *options[T]) { o.onEvent = f }
}

// InNamespace binds a key of another namespace than the client's.
func InNamespace[T any](ns string) Option[T] { return func(o *options[T]) { o.ns = ns } }

// Default is the value while the key does not exist: Bind returns at
// once with it instead of waiting for the key.
func Default[T any](v T) Option[T] { return func(o *options[T]) { o.def = &v } }

// DiskSnapshot keeps the last good value in dir, and lets Bind start from
// it — if it is at most maxAge old — when the registry has not answered
// within coldStart (default 3s).
func DiskSnapshot[T any](dir string, maxAge time.Duration) Option[T] {
	return func(o *options[T]) { o.dir, o.maxAge = dir, maxAge }
}

// ColdStart sets how long Bind waits for the registry before it uses the
// disk snapshot.
func ColdStart[T any](d time.Duration) Option[T] { return func(o *options[T]) { o.coldStart = d } }

// ReportTo reports every applied revision and every refused one to the
// server, under session s (the report goes when the session ends), so
// that `beacon kv rollout status` shows which instance runs which
// version. label names the instance (default: the session).
func ReportTo[T any](s *client.Session, label string) Option[T] {
	return func(o *options[T]) { o.reportTo, o.reportLabel = s, label }
}

// Labels are this reader's labels, which a staged rollout's selector
// matches (docs/kv.md).
func Labels[T any](labels map[string]string) Option[T] {
	return func(o *options[T]) { o.labels = labels }
}

// Identity is what a staged rollout's percent hashes to pick this reader
// (default: the ReportTo label, else its session, else random per
// binding). Give the same identity on every start of an instance to keep
// it in or out of a rollout across restarts.
func Identity[T any](id string) Option[T] { return func(o *options[T]) { o.identity = id } }

// ErrClosed is Bind's error when the binding was closed before its first
// value.
var ErrClosed = errors.New("config: binding closed")

// Bind follows key and returns once it holds a good value (or the
// Default, or a disk snapshot at a cold start); ctx bounds only that
// wait. Close stops it.
func Bind[T any](ctx context.Context, c *client.Client, key string, opts ...Option[T]) (*Binding[T], error) {
	o := options[T]{coldStart: 3 * time.Second, decode: new(jsonDecoder[T]).decode}
	for _, f := range opts {
		f(&o)
	}
	if err := registry.ValidateKey("key", key); err != nil {
		return nil, err
	}
	ns := o.ns
	if ns == "" {
		ns = c.Namespace()
	}
	w, err := c.KV().Watch(ctx, key, false, client.WithRollouts(), client.InNamespace(ns))
	if err != nil {
		return nil, err
	}
	rctx, cancel := context.WithCancel(context.Background())
	b := &Binding[T]{c: c, ns: ns, key: key, o: o, cancel: cancel, done: make(chan struct{}), ready: make(chan struct{}), id: identityOf(o)}
	go b.run(rctx, w) // owned by the binding: Close stops it
	select {
	case <-b.ready:
		return b, nil
	case <-b.done:
		return nil, ErrClosed
	case <-ctx.Done():
		b.Close()
		return nil, fmt.Errorf("config: no good value of %q yet: %w", key, ctx.Err())
	}
}

// jsonDecoder is the default decoder of a binding: decodeJSON's strict
// decoding with one json.Decoder reused from value to value. A new
// Decoder per value allocated about 1 KB (itself and its read buffer):
// at 1,000 bindings the largest allocation of a change's path, and the
// garbage collections it caused set the propagation's tail. A Decoder
// that saw an error is dropped (its error may stick), and the value is
// decoded again by decodeJSON for the error a fresh decoder gives.
type jsonDecoder[T any] struct {
	mu  sync.Mutex
	src bytes.Reader
	dec *json.Decoder // guarded by mu, as src
}

func (j *jsonDecoder[T]) decode(data []byte) (T, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.src.Reset(data)
	if j.dec == nil {
		j.dec = json.NewDecoder(&j.src)
		j.dec.DisallowUnknownFields()
	}
	var v T
	// More reads on to the end of data: what follows the value is
	// whitespace, or it is an error.
	if err := j.dec.Decode(&v); err != nil || j.dec.More() {
		j.dec = nil
		return decodeJSON[T](data)
	}
	if j.src.Len() > 0 || !onlySpace(j.dec.Buffered()) {
		j.dec = nil // a closing bracket More lets pass: not for the next value
	}
	return v, nil
}

// onlySpace reports whether r (a json.Decoder's Buffered) holds nothing
// but JSON whitespace.
func onlySpace(r io.Reader) bool {
	br, ok := r.(io.ByteReader)
	if !ok {
		return false
	}
	for {
		c, err := br.ReadByte()
		if err != nil {
			return true
		}
		if c != ' ' && c != '\t' && c != '\r' && c != '\n' {
			return false
		}
	}
}

func decodeJSON[T any](data []byte) (T, error) {
	var v T
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&v); err != nil {
		return v, err
	}
	if dec.More() {
		return v, errors.New("more than one JSON value")
	}
	return v, nil
}

// Load returns the value in force: an immutable snapshot (do not modify
// it), swapped atomically on every good revision.
func (b *Binding[T]) Load() *T {
	if v := b.cur.Load(); v != nil {
		return v.v
	}
	return nil
}

// Revision is the revision of the value in force: the key's version (or
// its deletion's, for the Default).
func (b *Binding[T]) Revision() int64 {
	if v := b.cur.Load(); v != nil {
		return v.revision
	}
	return 0
}

// Key returns the bound key, as namespace/key (for tracing.ConfigChanges).
func (b *Binding[T]) Key() string { return b.ns + "/" + b.key }

// Close stops following the key; Load keeps returning the last value.
func (b *Binding[T]) Close() {
	b.cancel()
	<-b.done
}

func (b *Binding[T]) markReady() { b.readyMu.Do(func() { close(b.ready) }) }

// run applies the key's states, and the disk snapshot at a cold start,
// on this one goroutine: callbacks come in order.
func (b *Binding[T]) run(ctx context.Context, w *client.KVWatcher) {
	defer close(b.done)
	states := make(chan client.KVState)
	pumped := make(chan struct{})
	go func() { // owned by run: ends with ctx, run waits for it
		defer close(pumped)
		for {
			st, err := w.Next(ctx)
			if err != nil {
				return
			}
			select {
			case states <- st:
			case <-ctx.Done():
				return
			}
		}
	}()
	defer func() { w.Close(); <-pumped }()
	var cold <-chan time.Time
	if b.o.dir != "" {
		t := time.NewTimer(b.o.coldStart)
		defer t.Stop()
		cold = t.C
	}
	for {
		select {
		case st := <-states:
			b.apply(ctx, st)
		case <-cold:
			cold = nil
			if b.cur.Load() != nil || b.seen != 0 {
				continue // the registry answered first (even if only "no such key")
			}
			if err := b.fromDisk(); err != nil && b.o.onEvent != nil {
				b.o.onEvent(Event[T]{Err: fmt.Errorf("config: cold start from the disk snapshot: %w", err), FromDisk: true})
			}
		case <-ctx.Done():
			return
		}
	}
}

// apply takes one state of the key: decode, validate, swap, report.
func (b *Binding[T]) apply(ctx context.Context, st client.KVState) {
	if st.Revision <= b.seen {
		return // never step back
	}
	b.seen = st.Revision
	raw, rev, ok, canary := b.choose(st)
	old := b.cur.Load()
	if ok && old != nil && rev == old.revision && canary == old.rollout {
		return // the version in force
	}
	if !ok && b.missing {
		return // still absent
	}
	b.missing = !ok
	if !ok {
		rev = st.Revision // the deletion's (or the first look's)
	}
	ev := Event[T]{Revision: rev, Rollout: canary}
	if old != nil {
		ev.Old = old.v
	}
	switch {
	case !ok && b.o.def != nil:
		b.cur.Store(&value[T]{v: b.o.def, revision: rev})
		ev.New = b.o.def
	case !ok:
		ev.Err = fmt.Errorf("config: key %q does not exist (deleted, or not written yet): the last good value stays", b.key)
	default:
		v, err := b.o.decode(raw)
		if err == nil && b.o.validate != nil {
			err = b.o.validate(v)
		}
		if err != nil {
			what := "revision"
			if canary {
				what = "rollout revision"
			}
			ev.Err = fmt.Errorf("config: %q at %s %d is not applied: %w", b.key, what, rev, err)
			break
		}
		b.cur.Store(&value[T]{v: &v, revision: rev, rollout: canary})
		ev.New = &v
		if b.o.dir != "" {
			if err := b.toDisk(raw, rev); err != nil && b.o.onEvent != nil {
				b.o.onEvent(Event[T]{Revision: rev, Err: fmt.Errorf("config: writing the disk snapshot: %w", err)})
			}
		}
	}
	if b.o.onEvent != nil {
		b.o.onEvent(ev)
	}
	if ev.New != nil {
		b.markReady() // after the event: Bind returns with it delivered
	}
	b.report(ctx, ev)
}

// choose picks what this reader applies in a state: the key's rollout if
// it selects this reader, else the key's value.
func (b *Binding[T]) choose(st client.KVState) (raw []byte, rev int64, ok, rollout bool) {
	if r, ok := st.Rollouts[b.key]; ok && selected(r, b.o.labels, b.id) {
		return r.Value, r.Revision, true, true
	}
	kv, ok := st.Values[b.key]
	return kv.Value, kv.ModRevision, ok, false
}

// selected says whether a rollout picks a reader with these labels and
// identity: every selector label matches, and the identity's stable hash
// falls in the percent.
func selected(r client.Rollout, labels map[string]string, id string) bool {
	for k, v := range r.Labels {
		if have, ok := labels[k]; !ok || have != v {
			return false
		}
	}
	if r.Percent <= 0 || r.Percent >= 100 {
		return true
	}
	h := fnv.New32a()
	h.Write([]byte(id))
	return int32(h.Sum32()%100) < r.Percent
}

func identityOf[T any](o options[T]) string {
	switch {
	case o.identity != "":
		return o.identity
	case o.reportLabel != "":
		return o.reportLabel
	case o.reportTo != nil:
		id, _ := o.reportTo.Lease()
		return strconv.FormatInt(id, 16)
	}
	return strconv.FormatUint(rand.Uint64(), 16)
}

func (b *Binding[T]) report(ctx context.Context, ev Event[T]) {
	if b.o.reportTo == nil {
		return
	}
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := b.c.KV().ReportApplied(rctx, b.key, b.o.reportTo, b.o.reportLabel, ev.Revision, ev.Err, client.InNamespace(b.ns)); err != nil && b.o.onEvent != nil && ctx.Err() == nil {
		b.o.onEvent(Event[T]{Revision: ev.Revision, Err: fmt.Errorf("config: reporting to the server: %w", err)})
	}
}

// The disk snapshot: a versioned envelope whose checksum covers the value.
type diskSnapshot struct {
	Format    string    `json:"format"`
	Version   int       `json:"version"`
	WrittenAt time.Time `json:"written_at"`
	Namespace string    `json:"namespace"`
	Key       string    `json:"key"`
	Revision  int64     `json:"revision"`
	SHA256    string    `json:"sha256"`
	Value     []byte    `json:"value"`
}

const (
	snapshotFormat = "beacon-config-snapshot"
	// MaxSnapshotBytes bounds the file read at a cold start.
	MaxSnapshotBytes = 2 << 20
)

func (b *Binding[T]) snapshotPath() string {
	return snapshotFile(b.o.dir, b.ns, b.key)
}

func snapshotFile(dir, ns, key string) string {
	sum := sha256.Sum256([]byte(ns + "\x00" + key))
	return dir + string(os.PathSeparator) + "beacon-config-" + hex.EncodeToString(sum[:8]) + ".json"
}

func (b *Binding[T]) toDisk(val []byte, rev int64) error {
	sum := sha256.Sum256(val)
	data, err := json.Marshal(diskSnapshot{Format: snapshotFormat, Version: 1, WrittenAt: time.Now().UTC(), Namespace: b.ns, Key: b.key, Revision: rev, SHA256: hex.EncodeToString(sum[:]), Value: val})
	if err != nil {
		return err
	}
	return atomicfile.Write(b.snapshotPath(), data)
}

// fromDisk applies the disk snapshot, if it is usable and nothing better
// arrived meanwhile.
func (b *Binding[T]) fromDisk() error {
	f, err := os.Open(b.snapshotPath())
	if err != nil {
		return err
	}
	defer f.Close()
	var snap diskSnapshot
	dec := json.NewDecoder(ioLimit(f, MaxSnapshotBytes))
	if err := dec.Decode(&snap); err != nil {
		return fmt.Errorf("%s: %w", b.snapshotPath(), err)
	}
	sum := sha256.Sum256(snap.Value)
	switch {
	case snap.Format != snapshotFormat || snap.Version != 1:
		return fmt.Errorf("%s: not a config snapshot this version reads", b.snapshotPath())
	case snap.Namespace != b.ns || snap.Key != b.key:
		return fmt.Errorf("%s: holds %s/%s", b.snapshotPath(), snap.Namespace, snap.Key)
	case hex.EncodeToString(sum[:]) != snap.SHA256:
		return fmt.Errorf("%s: checksum mismatch", b.snapshotPath())
	case time.Since(snap.WrittenAt) > b.o.maxAge:
		return fmt.Errorf("%s: written %v ago, older than the max age %v", b.snapshotPath(), time.Since(snap.WrittenAt).Round(time.Second), b.o.maxAge)
	}
	v, err := b.o.decode(snap.Value)
	if err == nil && b.o.validate != nil {
		err = b.o.validate(v)
	}
	if err != nil {
		return fmt.Errorf("%s: %w", b.snapshotPath(), err)
	}
	b.cur.Store(&value[T]{v: &v, revision: snap.Revision})
	if b.o.onEvent != nil {
		b.o.onEvent(Event[T]{Revision: snap.Revision, New: &v, FromDisk: true})
	}
	b.markReady()
	return nil
}

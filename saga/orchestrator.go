package saga

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/backoff"
	"beacon.dev/beacon/registry"
)

// Run is what an action or a compensation is told.
type Run struct {
	Saga, ID string
	Step     string
	// Key is the idempotency key of this action or compensation: the same
	// on every attempt and after a failover (SAGA/ID/STEP, and
	// SAGA/ID/STEP/compensate). Participants deduplicate by it.
	Key     string
	Attempt int // 1 for the first attempt by this orchestrator
	Input   []byte
	// Outputs of the steps that succeeded before this one (read only).
	Outputs map[string][]byte
}

// Step is one step of a saga.
type Step struct {
	Name string
	// Action does the step; its output is kept with the saga and handed
	// to later steps. It may run more than once (a retry, an
	// orchestrator that died before recording it): it must be idempotent
	// by Run.Key.
	Action func(ctx context.Context, r Run) (output []byte, err error)
	// Compensate undoes the step (nil: nothing to undo). It runs for
	// every step that may have acted — the failed one included, whose
	// action may have landed even though it reported an error — so it
	// must be idempotent, must accept that the action never happened, and
	// must make a late action refuse (a tombstone): an old orchestrator
	// paused in the action can deliver it after the compensation.
	Compensate func(ctx context.Context, r Run) error
	// Timeout bounds one attempt (default 10 s).
	Timeout time.Duration
	// MaxAttempts bounds the action's attempts (default 3); then the
	// saga compensates. Compensations get Config.CompensationAttempts.
	MaxAttempts int
}

// Definition is a saga: its steps, in order.
type Definition struct {
	Name  string
	Steps []Step
	// Timeout bounds the saga's forward path from its start (default
	// 1 m): an action that would run past it is cut short, and the saga
	// compensates.
	Timeout time.Duration
}

// Config is an orchestrator's.
type Config struct {
	Client  *client.Client
	Session *client.Session // the shards' leadership lives on it
	// Prefix is where sagas are kept (default DefaultPrefix). Every
	// orchestrator under one prefix must know every saga kept there.
	Prefix      string
	CallOptions []client.CallOption // with every registry call: client.InNamespace, say
	// Shards (default 8, at most 256): each saga belongs to one; each
	// shard is led by one orchestrator at a time.
	Shards int
	// MaxRunning bounds the sagas this orchestrator moves at once
	// (default 256); the others wait their turn.
	MaxRunning int
	// CompensationAttempts bounds a compensation's attempts (default
	// 10); then the saga is Stuck.
	CompensationAttempts int
	// KeepFinished: how long a finished saga stays readable before its
	// shard's leader deletes it (default 1 h; negative: forever — mind
	// the namespace's key limit).
	KeepFinished time.Duration
	// DrainTimeout: once Run's context ends, how long the steps in flight
	// have to finish and be recorded (default 10 s).
	DrainTimeout time.Duration
	// MaxInputBytes and MaxOutputBytes bound a saga's input and each
	// step's output (defaults 64 KiB and 16 KiB).
	MaxInputBytes, MaxOutputBytes int
	// OnTransition is called after every recorded change of a saga, in
	// order per saga, from the goroutine moving it: keep it short.
	OnTransition func(State)
	Logger       *slog.Logger
	// TracerProvider, if set, traces every attempt of an action or a
	// compensation (span "beacon.saga.step"), under the trace of the call
	// that started the saga.
	TracerProvider trace.TracerProvider
}

// MaxShards bounds Config.Shards.
const MaxShards = 256

// MaxStateBytes bounds a saga's stored state: the server's default
// --max-kv-value-bytes (512 KiB) less room for the key and the request.
const MaxStateBytes = 500 << 10

// stateOverhead is room for a state's fields besides input and outputs:
// MaxHistory entries with their errors, the trace context, names.
const stateOverhead = 48 << 10

// Permanent wraps an action's error so that it is not retried: the
// saga compensates at once.
func Permanent(err error) error { return &permanent{err} }

type permanent struct{ err error }

func (p *permanent) Error() string { return p.err.Error() }
func (p *permanent) Unwrap() error { return p.err }

// ErrExists is matched when a saga with the name and id exists already
// with another input.
var ErrExists = errors.New("saga: exists")

// Orchestrator starts sagas and moves them. Run it on every instance of
// the service that owns the sagas.
type Orchestrator struct {
	cfg      Config
	store    *Store
	defs     map[string]*Definition
	log      *slog.Logger
	tracer   trace.Tracer // nil: no spans
	once     atomic.Bool
	sweeping atomic.Bool   // removeFinished runs
	wake     chan struct{} // capacity 1

	mu      sync.Mutex
	held    []*client.Held   // by shard; nil: not led here
	idle    []sync.WaitGroup // by shard: the sagas moving in it
	running map[string]bool  // by key
	ended   map[string]int64 // key → revision a goroutine left it at, unfinished
	states  map[string]State // the latest watched state; replaced, never modified
	// unfinished are the keys of states (and started) not finished: what
	// startReady looks at. started are sagas Start made that the watch
	// has not brought back yet.
	unfinished map[string]struct{}
	started    map[string]startedSaga
	watching   bool                       // states is kept up to date
	waiters    map[string][]chan struct{} // by key: closed when its state changes (or the watch stops)
	stats      Stats

	metrics orchestratorMetrics

	wg sync.WaitGroup // the goroutines Run started
}

// Stats counts what an orchestrator did.
type Stats struct {
	Started, Steps, Compensations    int64
	Done, Compensated, Stuck, Fenced int64
	Leading                          int // shards led now
}

// New returns an orchestrator of the sagas defs.
func New(cfg Config, defs ...Definition) (*Orchestrator, error) {
	if cfg.Client == nil || cfg.Session == nil {
		return nil, fmt.Errorf("%w: Config.Client and Config.Session are required", ErrInvalid)
	}
	store, err := NewStore(cfg.Client.KV(), cfg.Prefix, cfg.CallOptions...)
	if err != nil {
		return nil, err
	}
	cfg.Prefix = store.prefix
	// Zero takes the default; a negative value is refused, naming the field.
	for _, f := range []struct {
		name string
		v    *int
		def  int
	}{{"Shards", &cfg.Shards, 8}, {"MaxRunning", &cfg.MaxRunning, 256}, {"CompensationAttempts", &cfg.CompensationAttempts, 10},
		{"MaxInputBytes", &cfg.MaxInputBytes, 64 << 10}, {"MaxOutputBytes", &cfg.MaxOutputBytes, 16 << 10}} {
		if *f.v < 0 {
			return nil, fmt.Errorf("%w: Config.%s %d is negative", ErrInvalid, f.name, *f.v)
		}
		if *f.v == 0 {
			*f.v = f.def
		}
	}
	if cfg.Shards > MaxShards {
		return nil, fmt.Errorf("%w: Config.Shards %d is more than %d", ErrInvalid, cfg.Shards, MaxShards)
	}
	if cfg.DrainTimeout < 0 {
		return nil, fmt.Errorf("%w: Config.DrainTimeout %v is negative", ErrInvalid, cfg.DrainTimeout)
	}
	if cfg.KeepFinished == 0 {
		cfg.KeepFinished = time.Hour
	}
	if cfg.DrainTimeout == 0 {
		cfg.DrainTimeout = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	o := &Orchestrator{
		cfg: cfg, store: store, defs: map[string]*Definition{}, log: cfg.Logger, wake: make(chan struct{}, 1),
		held: make([]*client.Held, cfg.Shards), idle: make([]sync.WaitGroup, cfg.Shards),
		running: map[string]bool{}, ended: map[string]int64{}, waiters: map[string][]chan struct{}{},
		unfinished: map[string]struct{}{}, started: map[string]startedSaga{},
		metrics: newOrchestratorMetrics(store.prefix),
	}
	if len(defs) == 0 {
		return nil, fmt.Errorf("%w: no saga definitions", ErrInvalid)
	}
	if cfg.TracerProvider != nil {
		o.tracer = cfg.TracerProvider.Tracer("beacon.dev/beacon/saga")
	}
	for i := range defs {
		d := defs[i]
		if err := validName("Definition.Name", d.Name); err != nil {
			return nil, err
		}
		if o.defs[d.Name] != nil {
			return nil, fmt.Errorf("%w: two definitions named %q", ErrInvalid, d.Name)
		}
		if len(d.Steps) == 0 {
			return nil, fmt.Errorf("%w: saga %s has no steps", ErrInvalid, d.Name)
		}
		d.Steps = slices.Clone(d.Steps)
		seen := map[string]bool{}
		for j := range d.Steps {
			s := &d.Steps[j]
			if err := validName(fmt.Sprintf("saga %s: Steps[%d].Name", d.Name, j), s.Name); err != nil {
				return nil, err
			}
			if seen[s.Name] {
				return nil, fmt.Errorf("%w: saga %s has two steps named %q", ErrInvalid, d.Name, s.Name)
			}
			seen[s.Name] = true
			if s.Action == nil {
				return nil, fmt.Errorf("%w: saga %s: step %s has no Action", ErrInvalid, d.Name, s.Name)
			}
			if s.Timeout < 0 || s.MaxAttempts < 0 {
				return nil, fmt.Errorf("%w: saga %s: step %s: Timeout %v and MaxAttempts %d may not be negative", ErrInvalid, d.Name, s.Name, s.Timeout, s.MaxAttempts)
			}
			if s.Timeout == 0 {
				s.Timeout = 10 * time.Second
			}
			if s.MaxAttempts == 0 {
				s.MaxAttempts = 3
			}
		}
		if d.Timeout < 0 {
			return nil, fmt.Errorf("%w: saga %s: Timeout %v is negative", ErrInvalid, d.Name, d.Timeout)
		}
		if d.Timeout == 0 {
			d.Timeout = time.Minute
		}
		// A state must fit in one KV value: its input and every output
		// (base64 in the JSON) and its history.
		if worst := (cfg.MaxInputBytes+len(d.Steps)*cfg.MaxOutputBytes)*4/3 + stateOverhead; worst > MaxStateBytes {
			return nil, fmt.Errorf("%w: saga %s: a state could reach %d bytes (Config.MaxInputBytes %d + %d steps × Config.MaxOutputBytes %d, base64, and its history), more than %d",
				ErrInvalid, d.Name, worst, cfg.MaxInputBytes, len(d.Steps), cfg.MaxOutputBytes, MaxStateBytes)
		}
		o.defs[d.Name] = &d
	}
	return o, nil
}

// Store reads and retries the orchestrator's sagas.
func (o *Orchestrator) Store() *Store { return o.store }

// Stats returns what the orchestrator did so far.
func (o *Orchestrator) Stats() Stats {
	o.mu.Lock()
	defer o.mu.Unlock()
	s := o.stats
	for _, h := range o.held {
		if h != nil {
			s.Leading++
		}
	}
	return s
}

func (d *Definition) names() []string {
	n := make([]string, len(d.Steps))
	for i, s := range d.Steps {
		n[i] = s.Name
	}
	return n
}

func (o *Orchestrator) shardOf(name, id string) int {
	h := fnv.New32a()
	_, _ = h.Write([]byte(name + "/" + id))
	return int(h.Sum32() % uint32(o.cfg.Shards))
}

func (o *Orchestrator) poke() {
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

// Start creates saga name's instance id with input; an orchestrator
// leading its shard (this one, if it does) moves it. Starting it again
// with the same input returns its state as it is (a retried request is
// safe); with another input, ErrExists.
func (o *Orchestrator) Start(ctx context.Context, name, id string, input []byte) (State, error) {
	def := o.defs[name]
	if def == nil {
		return State{}, fmt.Errorf("%w: no saga named %q is defined here", ErrInvalid, name)
	}
	if err := validName("id", id); err != nil {
		return State{}, err
	}
	if len(input) > o.cfg.MaxInputBytes {
		return State{}, fmt.Errorf("%w: input has %d bytes, at most %d (Config.MaxInputBytes)", ErrInvalid, len(input), o.cfg.MaxInputBytes)
	}
	now := time.Now().UTC()
	st := State{Saga: name, ID: id, Status: Running, Steps: def.names(), Input: input, Created: now, Deadline: now.Add(def.Timeout), Key: o.store.key(name, id)}
	if trace.SpanContextFromContext(ctx).IsValid() {
		st.Trace = map[string]string{}
		traceContext.Inject(ctx, propagation.MapCarrier(st.Trace))
	}
	st.record(Entry{What: "started"})
	b, err := json.Marshal(&st)
	if err != nil {
		return State{}, err
	}
	rev, err := o.cfg.Client.KV().CompareAndSwap(ctx, st.Key, b, 0, o.cfg.CallOptions...)
	if errors.Is(err, client.ErrCompareFailed) {
		cur, gerr := o.store.Get(ctx, name, id)
		if gerr != nil {
			return State{}, gerr
		}
		if !bytes.Equal(cur.Input, input) {
			return State{}, fmt.Errorf("%w: saga %s/%s was started with another input", ErrExists, name, id)
		}
		return cur, nil
	}
	if err != nil {
		return State{}, err
	}
	st.Revision = rev
	o.mu.Lock()
	o.stats.Started++
	if o.watching && o.held[o.shardOf(name, id)] != nil {
		// Led here: start moving it now rather than after the watch
		// brings it back.
		o.started[st.Key] = startedSaga{st, o.held[o.shardOf(name, id)]}
		o.unfinished[st.Key] = struct{}{}
	}
	o.mu.Unlock()
	o.poke()
	return st.clone(), nil
}

// Wait returns the saga's state once it is finished (done, compensated
// or stuck), or ctx's error.
// A saga that does not exist (or no longer does) is waited for until ctx
// ends.
func (o *Orchestrator) Wait(ctx context.Context, name, id string) (State, error) {
	if err := validName("saga", name); err != nil {
		return State{}, err
	}
	if err := validName("id", id); err != nil {
		return State{}, err
	}
	k := o.store.key(name, id)
	for {
		o.mu.Lock()
		if !o.watching {
			o.mu.Unlock()
			return o.waitByWatch(ctx, k)
		}
		if st, ok := o.states[k]; ok && st.Status.Finished() {
			o.mu.Unlock()
			return st.clone(), nil
		}
		ch := make(chan struct{})
		o.waiters[k] = append(o.waiters[k], ch)
		o.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			o.mu.Lock()
			if i := slices.Index(o.waiters[k], ch); i >= 0 {
				o.waiters[k] = slices.Delete(o.waiters[k], i, i+1)
				if len(o.waiters[k]) == 0 {
					delete(o.waiters, k)
				}
			}
			o.mu.Unlock()
			return State{}, ctx.Err()
		}
	}
}

// waitByWatch is Wait without Run: a watch of the saga's key.
func (o *Orchestrator) waitByWatch(ctx context.Context, key string) (State, error) {
	w, err := o.cfg.Client.KV().Watch(ctx, key, false, o.cfg.CallOptions...)
	if err != nil {
		return State{}, err
	}
	defer w.Close()
	for {
		kst, err := w.Next(ctx)
		if err != nil {
			return State{}, err
		}
		if kv, ok := kst.Values[key]; ok {
			if st, err := decodeState(kv); err == nil && st.Status.Finished() {
				return st, nil
			}
		}
	}
}

// Run leads what shards it can and moves their sagas until ctx ends;
// then the steps in flight get DrainTimeout to finish and be recorded,
// and the shards are handed over. It returns an error if the session
// ends or the sagas cannot be watched. Call it once.
func (o *Orchestrator) Run(ctx context.Context) error {
	if !o.once.CompareAndSwap(false, true) {
		return errors.New("saga: Run called twice")
	}
	if err := o.checkShards(ctx); err != nil {
		return err
	}
	lctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	// Once Run stops, for whatever reason, the steps in flight get
	// DrainTimeout to finish and be recorded.
	drain, stopDrain := context.WithCancel(context.WithoutCancel(ctx))
	defer stopDrain()
	stopTimer := context.AfterFunc(lctx, func() {
		t := time.AfterFunc(o.cfg.DrainTimeout, stopDrain)
		context.AfterFunc(drain, func() { t.Stop() })
	})
	defer stopTimer()
	for n := range o.cfg.Shards {
		o.wg.Go(func() {
			if err := o.leadShard(lctx, drain, n); err != nil {
				cancel(err)
			}
		})
	}
	err := o.dispatch(lctx, drain)
	cancel(err)
	o.wg.Wait()
	o.mu.Lock()
	o.watching = false
	for k, chs := range o.waiters { // they wait by their own watch now
		for _, ch := range chs {
			close(ch)
		}
		delete(o.waiters, k)
	}
	o.mu.Unlock()
	if cause := context.Cause(lctx); ctx.Err() == nil && cause != nil && !errors.Is(cause, context.Canceled) {
		return cause
	}
	return nil
}

func (o *Orchestrator) shardName(n int) string { return o.cfg.Prefix + "shards/" + strconv.Itoa(n) }

// checkShards makes sure every orchestrator of the prefix splits its
// sagas into the same shards (PREFIX config records how many): with
// another count, two leaders of different shards could move one saga,
// each with a valid fencing token.
func (o *Orchestrator) checkShards(ctx context.Context) error {
	key := o.cfg.Prefix + "config"
	want, _ := json.Marshal(map[string]int{"shards": o.cfg.Shards})
	for {
		cur, err := o.cfg.Client.KV().Get(ctx, key, o.cfg.CallOptions...)
		if errors.Is(err, client.ErrNotFound) {
			_, err = o.cfg.Client.KV().CompareAndSwap(ctx, key, want, 0, o.cfg.CallOptions...)
			if errors.Is(err, client.ErrCompareFailed) {
				continue // another orchestrator wrote it first: check it
			}
			if err != nil {
				return fmt.Errorf("saga: recording the shard count in %s: %w", key, err)
			}
			return nil
		}
		if err != nil {
			return fmt.Errorf("saga: reading the shard count in %s: %w", key, err)
		}
		var got struct{ Shards int }
		if err := json.Unmarshal(cur.Value, &got); err != nil || got.Shards < 1 {
			return fmt.Errorf("%w: %s holds %q, not a shard count", ErrInvalid, key, cur.Value)
		}
		if got.Shards != o.cfg.Shards {
			return fmt.Errorf("%w: the sagas under %s are kept in %d shards (%s); this orchestrator has Config.Shards %d — every orchestrator of a prefix must have the same", ErrInvalid, o.cfg.Prefix, got.Shards, key, o.cfg.Shards)
		}
		return nil
	}
}

// leadShard campaigns for shard n, and while it leads lets dispatch move
// the shard's sagas; it hands the shard over (after its sagas stopped)
// when the lead is lost or ctx ends.
func (o *Orchestrator) leadShard(ctx, drain context.Context, n int) error {
	el := o.cfg.Client.Election(o.cfg.Session, o.shardName(n), o.cfg.CallOptions...)
	bo := backoff.New(backoff.Config{})
	for ctx.Err() == nil {
		held, err := el.Campaign(ctx, nil)
		if err != nil {
			select {
			case <-o.cfg.Session.Done():
				return fmt.Errorf("saga: the orchestrator's session ended: %w", o.cfg.Session.Err())
			default:
			}
			if errors.Is(err, client.ErrPermissionDenied) || errors.Is(err, client.ErrUnauthenticated) {
				return fmt.Errorf("saga: leading shard %d: %w", n, err)
			}
			if ctx.Err() == nil {
				o.log.Warn("saga: shard campaign", "shard", n, "err", err)
				_ = bo.Wait(ctx)
			}
			continue
		}
		bo.Reset()
		o.mu.Lock()
		o.held[n] = held
		o.mu.Unlock()
		o.poke()
		lost := false
		select {
		case <-held.Context().Done():
			lost = true
			o.log.Warn("saga: lost the lead of a shard", "shard", n, "err", context.Cause(held.Context()))
		case <-ctx.Done():
		}
		o.mu.Lock()
		o.held[n] = nil
		o.mu.Unlock()
		if !lost {
			// Stopping: the shard's sagas finish their steps in flight
			// (DrainTimeout bounds them) before the next leader may start.
			// A lost lead is handed over at once: its movers' contexts
			// have ended, and the fence refuses what they still write.
			o.idle[n].Wait()
		}
		uctx, ucancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		_ = held.Unlock(uctx)
		ucancel()
	}
	return nil
}

// dispatch watches the sagas and starts moving those in led shards.
func (o *Orchestrator) dispatch(ctx, drain context.Context) error {
	w, err := o.cfg.Client.KV().Watch(ctx, o.store.runs(), true, o.cfg.CallOptions...)
	if err != nil {
		return err
	}
	defer w.Close()
	watchErr := make(chan error, 1)
	o.wg.Go(func() {
		for {
			kst, err := w.Next(ctx)
			if err != nil {
				watchErr <- err
				return
			}
			o.absorb(kst)
			o.poke()
		}
	})
	var sweep <-chan time.Time
	if o.cfg.KeepFinished > 0 {
		t := time.NewTicker(min(max(o.cfg.KeepFinished/4, time.Second), time.Minute))
		defer t.Stop()
		sweep = t.C
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-watchErr:
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("saga: watching %s: %w", o.store.runs(), err)
		case <-sweep:
			if o.sweeping.CompareAndSwap(false, true) {
				o.wg.Go(func() {
					defer o.sweeping.Store(false)
					o.removeFinished(ctx)
				})
			}
		case <-o.wake:
		}
		o.startReady(ctx, drain)
	}
}

// absorb takes a watched state in: each key decoded once per revision.
func (o *Orchestrator) absorb(kst client.KVState) {
	o.mu.Lock()
	old := o.states
	o.mu.Unlock()
	next := make(map[string]State, len(kst.Values))
	for k, kv := range kst.Values {
		if st, ok := old[k]; ok && st.Revision == kv.ModRevision {
			next[k] = st
			continue
		}
		st, err := decodeState(kv)
		if err != nil {
			continue // not a saga's state: List skips it too
		}
		next[k] = st
	}
	o.mu.Lock()
	for k, ss := range o.started {
		st := ss.st
		if cur, ok := next[k]; ok && cur.Revision >= st.Revision || kst.Revision >= st.Revision {
			delete(o.started, k) // the watch has it (or its deletion)
		}
	}
	unfinished := make(map[string]struct{}, len(o.started))
	for k, st := range next {
		if !st.Status.Finished() {
			unfinished[k] = struct{}{}
		}
	}
	for k := range o.started {
		unfinished[k] = struct{}{}
	}
	o.unfinished = unfinished
	for k, rev := range o.ended {
		if st, ok := next[k]; ok && st.Revision >= rev || !ok && kst.Revision >= rev {
			delete(o.ended, k) // the watch has caught up with where it was left
		}
	}
	o.states = next
	o.watching = true
	for k, chs := range o.waiters {
		if st, ok := next[k]; ok && st.Status.Finished() {
			for _, ch := range chs {
				close(ch)
			}
			delete(o.waiters, k)
		}
	}
	o.mu.Unlock()
}

// startReady starts a goroutine for every unfinished saga of a led shard
// that none moves yet, up to MaxRunning.
func (o *Orchestrator) startReady(ctx, drain context.Context) {
	if ctx.Err() != nil {
		return
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	for k := range o.unfinished {
		if len(o.running) >= o.cfg.MaxRunning {
			return
		}
		ss, ok := o.started[k]
		st := ss.st
		if w, wok := o.states[k]; !ok || wok && w.Revision > st.Revision {
			st, ss.held = w, nil
		}
		if st.Status.Finished() || o.running[k] {
			continue
		}
		if rev, ok := o.ended[k]; ok && st.Revision < rev {
			continue // older than where it was left: wait for the watch
		}
		def := o.defs[st.Saga]
		n := o.shardOf(st.Saga, st.ID)
		held := o.held[n]
		if def == nil || held == nil {
			continue
		}
		o.running[k] = true
		o.idle[n].Add(1)
		st = st.clone()
		// Created here under this very lead: nobody can have written it
		// since, so the mover need not read it first.
		fresh := ss.held == held
		o.wg.Go(func() { o.move(ctx, drain, held, n, def, st, fresh) })
	}
}

// removeFinished deletes the led shards' sagas done or compensated
// longer than KeepFinished ago.
func (o *Orchestrator) removeFinished(ctx context.Context) {
	type victim struct {
		st   State
		held *client.Held
	}
	var vs []victim
	cutoff := time.Now().Add(-o.cfg.KeepFinished)
	o.mu.Lock()
	for _, st := range o.states {
		// A stuck saga stays until an operator retries it: it is their
		// only handle on what it left undone.
		if (st.Status == Done || st.Status == Compensated) && st.Updated.Before(cutoff) {
			if h := o.held[o.shardOf(st.Saga, st.ID)]; h != nil {
				vs = append(vs, victim{st, h})
			}
		}
	}
	o.mu.Unlock()
	for _, v := range vs {
		if _, err := o.cfg.Client.KV().CompareAndDelete(ctx, v.st.Key, v.st.Revision, append(slices.Clone(o.cfg.CallOptions), client.Fenced(v.held))...); err != nil && ctx.Err() == nil && !errors.Is(err, client.ErrCompareFailed) {
			o.log.Warn("saga: removing a finished saga", "saga", v.st.Saga, "id", v.st.ID, "err", err)
		}
	}
}

// move takes one saga forward (or back) until it is finished, its shard
// is no longer led here, or Run is stopping.
func (o *Orchestrator) move(runCtx, drain context.Context, held *client.Held, n int, def *Definition, st State, fresh bool) {
	ctx, cancel := context.WithCancel(held.Context())
	stop := context.AfterFunc(drain, cancel)
	if st.Trace != nil {
		ctx = traceContext.Extract(ctx, propagation.MapCarrier(st.Trace))
	}
	changed := false // left because someone else wrote it
	defer func() {
		stop()
		cancel()
		o.mu.Lock()
		delete(o.running, st.Key)
		// Until the watch catches up, what it shows of this saga is
		// older than what was done here: not to be moved again.
		o.ended[st.Key] = st.Revision
		if changed {
			o.ended[st.Key]++
		}
		o.mu.Unlock()
		o.idle[n].Done()
		o.poke()
	}()
	if !slices.Equal(st.Steps, def.names()) {
		// Started by another version of the definition: an orchestrator
		// that has it moves it (change steps under a new saga name and
		// keep the old definition until its sagas are finished).
		o.log.Warn("saga: its steps are not this orchestrator's definition's: leaving it", "saga", st.Saga, "id", st.ID, "steps", st.Steps, "definition", def.names())
		st.Revision++ // not again here until it changes
		return
	}
	// The watch may lag (a lead just taken over, a stream that was
	// down): the saga's current state decides, read once before acting.
	// Once this leader holds the shard's lock, every older leader's write
	// is refused, so what is read here is what stays.
	if !fresh {
		cur, err := o.cfg.Client.KV().Get(ctx, st.Key, o.cfg.CallOptions...)
		switch {
		case errors.Is(err, client.ErrNotFound):
			st.Revision++ // removed: nothing to move
			return
		case err != nil:
			// The next pass tries again, not at once: the dispatcher
			// restarts a saga as soon as its mover leaves.
			_ = backoff.Sleep(ctx, backoff.New(backoff.Config{Base: 200 * time.Millisecond}).Next())
			return
		case cur.ModRevision != st.Revision:
			st.Revision = cur.ModRevision // moved on: start again from there once the watch shows it
			return
		}
	}
	if st.Outputs == nil {
		st.Outputs = map[string][]byte{}
	}
	for !st.Status.Finished() {
		if runCtx.Err() != nil || ctx.Err() != nil {
			return // the next leader takes it from the last recorded step
		}
		prev := st.clone() // as recorded
		switch st.Status {
		case Running:
			if st.Step >= len(def.Steps) {
				st.Status = Done
				break
			}
			step := &def.Steps[st.Step]
			if time.Now().After(st.Deadline) {
				st.Status = Compensating
				st.Error = fmt.Sprintf("timed out before step %s (saga timeout %v)", step.Name, def.Timeout)
				st.record(Entry{Step: step.Name, What: "timed out"})
				break
			}
			out, attempts, err := o.attempt(ctx, runCtx, &st, step, false)
			if ctx.Err() != nil || errors.Is(err, errStopping) {
				return
			}
			if err == nil && len(out) > o.cfg.MaxOutputBytes {
				err = fmt.Errorf("output has %d bytes, at most %d (Config.MaxOutputBytes)", len(out), o.cfg.MaxOutputBytes)
			}
			if err != nil {
				st.Status = Compensating
				st.Error = fmt.Sprintf("step %s: %v", step.Name, err)
				st.record(Entry{Step: step.Name, What: "failed", Attempts: attempts, Error: err.Error()})
				break
			}
			st.Outputs[step.Name] = out
			st.record(Entry{Step: step.Name, What: "done", Attempts: attempts})
			if st.Step++; st.Step == len(def.Steps) {
				st.Status = Done
			}
		case Compensating:
			st.Step = min(st.Step, len(def.Steps)-1)
			for st.Step >= 0 && def.Steps[st.Step].Compensate == nil {
				st.Step--
			}
			if st.Step < 0 {
				st.Status = Compensated
				break
			}
			step := &def.Steps[st.Step]
			_, attempts, err := o.attempt(ctx, runCtx, &st, step, true)
			if ctx.Err() != nil || errors.Is(err, errStopping) {
				return
			}
			if err != nil {
				st.Status = Stuck
				st.Error = fmt.Sprintf("compensation of step %s: %v", step.Name, err)
				st.record(Entry{Step: step.Name, What: "stuck", Attempts: attempts, Error: err.Error()})
				break
			}
			st.record(Entry{Step: step.Name, What: "compensated", Attempts: attempts})
			for st.Step--; st.Step >= 0 && def.Steps[st.Step].Compensate == nil; st.Step-- {
			}
			if st.Step < 0 {
				st.Status = Compensated
			}
		}
		ok, why := o.persist(ctx, &st, held)
		changed = why == errChanged
		if ok {
			continue
		}
		if why != nil && why != errChanged {
			// The store refuses this state for good (too large, invalid,
			// forbidden): record the saga stuck, with why, from its last
			// recorded state — an operator looks.
			st = prev
			st.Status = Stuck
			st.Error = fmt.Sprintf("recording step %s: %v", prev.StepName(), why)
			st.record(Entry{Step: prev.StepName(), What: "stuck", Error: why.Error()})
			_, why = o.persist(ctx, &st, held)
			changed = why == errChanged
		}
		return
	}
}

// attempt runs a step's action (or compensation) until it succeeds, fails
// for good, or runs out of attempts.
func (o *Orchestrator) attempt(ctx, runCtx context.Context, st *State, step *Step, compensate bool) (out []byte, attempts int, err error) {
	r := Run{Saga: st.Saga, ID: st.ID, Step: step.Name, Key: st.Saga + "/" + st.ID + "/" + step.Name, Input: st.Input, Outputs: st.Outputs}
	maxAttempts := step.MaxAttempts
	bound := ctx
	if compensate {
		r.Key += "/compensate"
		maxAttempts = o.cfg.CompensationAttempts
	} else {
		var cancel context.CancelFunc
		bound, cancel = context.WithDeadline(ctx, st.Deadline)
		defer cancel()
	}
	bo := backoff.New(backoff.Config{})
	for r.Attempt = 1; ; r.Attempt++ {
		out, err = o.call(bound, step, r, compensate)
		if err == nil || ctx.Err() != nil {
			return out, r.Attempt, err
		}
		var p *permanent
		if errors.As(err, &p) || r.Attempt >= maxAttempts {
			return nil, r.Attempt, err
		}
		if runCtx.Err() != nil {
			return nil, r.Attempt, errStopping // no new attempt once Run stops: the next leader makes it
		}
		if bound.Err() != nil {
			return nil, r.Attempt, fmt.Errorf("%w (saga deadline passed)", err)
		}
		if bo.Wait(bound) != nil {
			return nil, r.Attempt, fmt.Errorf("%w (saga deadline passed)", err)
		}
	}
}

// errStopping: Run stopped between two attempts.
var errStopping = errors.New("saga: stopping")

// errChanged: the saga's state changed under its mover (persist).
var errChanged = errors.New("saga: changed under its mover")

// call runs one attempt under the step's timeout; a panic is a failure.
func (o *Orchestrator) call(ctx context.Context, step *Step, r Run, compensate bool) (out []byte, err error) {
	actx, cancel := context.WithTimeout(ctx, step.Timeout)
	defer cancel()
	if o.tracer != nil {
		var span trace.Span
		actx, span = o.tracer.Start(actx, SpanStep, trace.WithAttributes(
			attribute.String("beacon.saga", r.Saga), attribute.String("beacon.saga.id", r.ID),
			attribute.String("beacon.saga.step", r.Step), attribute.Int("beacon.saga.attempt", r.Attempt),
			attribute.Bool("beacon.saga.compensation", compensate)))
		defer func() {
			if err != nil {
				span.SetStatus(codes.Error, err.Error())
			}
			span.End()
		}()
	}
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("panic: %v", p)
		}
	}()
	if compensate {
		return nil, step.Compensate(actx, r)
	}
	return step.Action(actx, r)
}

// SpanStep is the span of one attempt of a step's action or compensation.
const SpanStep = "beacon.saga.step"

// traceContext carries a saga's trace from Start to its steps: W3C's.
var traceContext = propagation.TraceContext{}

// persist records st with the shard's fencing token. When it cannot, why
// says what to do: nil — the lead is lost (or Run stops), leave the saga;
// errChanged — someone else wrote it, leave it; any other error — the
// store refuses this state for good (too large, invalid, forbidden).
func (o *Orchestrator) persist(ctx context.Context, st *State, held *client.Held) (ok bool, why error) {
	b, err := json.Marshal(st)
	if err != nil {
		return false, err
	}
	opts := append(slices.Clone(o.cfg.CallOptions), client.Fenced(held))
	bo := backoff.New(backoff.Config{})
	unsure := false // an earlier try may have landed with its answer lost
	for {
		rev, err := o.cfg.Client.KV().CompareAndSwap(ctx, st.Key, b, st.Revision, opts...)
		if errors.Is(err, client.ErrCompareFailed) && unsure {
			if cur, gerr := o.cfg.Client.KV().Get(ctx, st.Key, o.cfg.CallOptions...); gerr == nil && bytes.Equal(cur.Value, b) {
				rev, err = cur.ModRevision, nil // it did land
			}
		}
		if err == nil {
			st.Revision = rev
			o.count(st)
			if o.cfg.OnTransition != nil {
				o.cfg.OnTransition(st.clone())
			}
			return true, nil
		}
		switch {
		case errors.Is(err, client.ErrFenced):
			o.mu.Lock()
			o.stats.Fenced++
			o.mu.Unlock()
			o.log.Warn("saga: a newer leader of the shard owns the saga: leaving it", "saga", st.Saga, "id", st.ID)
			return false, nil
		case errors.Is(err, client.ErrCompareFailed):
			return false, errChanged
		case ctx.Err() != nil:
			return false, nil
		case errors.Is(err, registry.ErrInvalid), errors.Is(err, client.ErrPermissionDenied), errors.Is(err, client.ErrUnauthenticated):
			o.log.Error("saga: the store refuses the saga's state", "saga", st.Saga, "id", st.ID, "bytes", len(b), "err", err)
			return false, err
		}
		o.log.Warn("saga: recording a step", "saga", st.Saga, "id", st.ID, "err", err)
		unsure = true
		if bo.Wait(ctx) != nil {
			return false, nil
		}
	}
}

func (o *Orchestrator) count(st *State) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if len(st.History) > 0 {
		switch st.History[len(st.History)-1].What {
		case "done":
			o.stats.Steps++
		case "compensated":
			o.stats.Compensations++
		}
	}
	switch st.Status {
	case Done:
		o.stats.Done++
	case Compensated:
		o.stats.Compensated++
	case Stuck:
		o.stats.Stuck++
	}
}

// startedSaga is a saga Start created, and the lead of its shard then (nil
// if not led here).
type startedSaga struct {
	st   State
	held *client.Held
}

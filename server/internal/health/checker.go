// Package health runs the registry's active checks (HTTP, TCP, gRPC) on
// the beacon server. Each server runs the checks of the instances it owns
// (rendezvous hashing over the live servers, internal/members); a probe's
// result moves per-check counters in memory, and only a change of status
// — past the failure or success threshold — is written to etcd, into the
// instance's record, so that every watcher sees it.
package health

import (
	"container/heap"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/semaphore"

	"beacon.dev/beacon/internal/store"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/internal/members"
)

// DefaultMaxConcurrent bounds the probes in flight on one server.
const DefaultMaxConcurrent = 256

// Config wires a Checker.
type Config struct {
	Store   *store.Store
	Members *members.Members
	// Instance returns the current state of an instance (the server's
	// view), nil when it is gone.
	Instance      func(registry.InstanceKey) *registry.Instance
	MaxConcurrent int
	// MaxConns caps the probe connections, open or being dialed, of all
	// the checks (default DefaultMaxConns): each holds a file descriptor.
	// A probe that finds them at the limit gets no verdict.
	MaxConns int
	Log      *slog.Logger
}

// checkKey names one check of one instance.
type checkKey struct {
	inst registry.InstanceKey
	name string
}

// state is an owned check: its spec, where it probes and its counters.
// Owned by the scheduler goroutine.
type state struct {
	key       checkKey
	spec      registry.Check
	target    string
	status    registry.Health // as written (or adopted from the record)
	since     time.Time
	failures  int
	successes int
	next      time.Time
	index     int // in the heap; -1 when not scheduled
	running   bool
	writing   bool // a transition write is in flight
	prober    prober
	removed   bool
}

// Checker schedules and runs the owned checks.
type Checker struct {
	cfg     Config
	sem     *semaphore.Weighted
	conns   *connLimiter
	metrics *Metrics

	mu      sync.Mutex
	dirty   map[registry.ServiceKey]*registry.Snapshot // guarded by mu; offered, not yet applied
	wake    chan struct{}                              // size 1
	results chan result

	// scheduler state
	instances map[registry.InstanceKey]*registry.Instance // instances with checks
	states    map[checkKey]*state
	queue     stateHeap
	wg        sync.WaitGroup // probes and writes in flight
	runCtx    context.Context
	refusedAt time.Time // last warning about the connection cap
}

type result struct {
	st       *state
	ok       bool
	refused  bool // no verdict: the probe connections were at the limit
	output   string
	lateness time.Duration
	wrote    bool // a write finished (ok: it succeeded)
}

// New returns a Checker; start it with Run.
func New(cfg Config) *Checker {
	if cfg.MaxConcurrent <= 0 {
		cfg.MaxConcurrent = DefaultMaxConcurrent
	}
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = DefaultMaxConns
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	conns := newConnLimiter(cfg.MaxConns)
	return &Checker{
		cfg: cfg, sem: semaphore.NewWeighted(int64(cfg.MaxConcurrent)), conns: conns, metrics: newMetrics(conns),
		dirty: make(map[registry.ServiceKey]*registry.Snapshot), wake: make(chan struct{}, 1),
		results:   make(chan result, 64),
		instances: make(map[registry.InstanceKey]*registry.Instance),
		states:    make(map[checkKey]*state),
	}
}

// Collector returns the checker's metrics.
func (c *Checker) Collector() prometheus.Collector { return c.metrics }

// Offer hands the checker new snapshots (the view's hook). It never blocks.
func (c *Checker) Offer(snaps []*registry.Snapshot) {
	c.mu.Lock()
	for _, s := range snaps {
		sk := registry.ServiceKey{Namespace: s.Namespace, Service: s.Service}
		if old, ok := c.dirty[sk]; !ok || s.Revision >= old.Revision {
			c.dirty[sk] = s
		}
	}
	c.mu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// Run schedules checks until ctx ends, then waits for probes and writes
// in flight and closes every prober. all seeds it with the view's current
// state.
func (c *Checker) Run(ctx context.Context, all []*registry.Snapshot) {
	c.runCtx = ctx
	defer c.shutdown()
	c.Offer(all)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		membersChanged := c.cfg.Members.Changed()
		now := time.Now()
		c.runDue(ctx, now)
		wait := time.Hour
		if len(c.queue) > 0 {
			wait = max(0, c.queue[0].next.Sub(now))
		}
		timer.Reset(wait)
		select {
		case <-ctx.Done():
			return
		case <-c.wake:
			c.applyOffers()
		case <-membersChanged:
			c.reassign()
		case r := <-c.results:
			c.handle(ctx, r)
		case <-timer.C:
		}
	}
}

func (c *Checker) applyOffers() {
	c.mu.Lock()
	dirty := c.dirty
	c.dirty = make(map[registry.ServiceKey]*registry.Snapshot)
	c.mu.Unlock()
	for sk, snap := range dirty {
		seen := map[registry.InstanceKey]bool{}
		for _, in := range snap.Instances {
			if len(in.Checks) == 0 {
				continue
			}
			seen[in.Key()] = true
			c.instances[in.Key()] = in
		}
		for k := range c.instances {
			if k.Namespace == sk.Namespace && k.Service == sk.Service && !seen[k] {
				delete(c.instances, k)
			}
		}
	}
	c.reassign()
}

// reassign brings the owned states in line with the instances and the
// membership: new checks start, gone or moved ones stop, changed specs
// restart, and a stored status that differs from ours is rewritten.
func (c *Checker) reassign() {
	want := map[checkKey]bool{}
	for k, in := range c.instances {
		if !c.cfg.Members.Owns(ownerKey(k)) {
			continue
		}
		for _, spec := range in.Checks {
			ck := checkKey{k, spec.Name}
			want[ck] = true
			st, ok := c.states[ck]
			if ok && st.spec.SameSpec(&spec) && st.target == spec.ProbeTarget(in) {
				if spec.Kind == registry.CheckTTL {
					st.status = spec.Status // pushes set it; the owner only expires it
					continue
				}
				if !st.writing && spec.Status != st.status {
					c.metrics.reconciled.Inc()
					c.write(st, st.status, fmt.Sprintf("restored %s (the record said %s)", st.status, spec.Status))
				}
				continue
			}
			if ok {
				c.drop(st)
			}
			c.adopt(ck, in, spec)
		}
	}
	for ck, st := range c.states {
		if !want[ck] {
			c.drop(st)
		}
	}
	c.metrics.owned.Set(float64(len(c.states)))
}

func ownerKey(k registry.InstanceKey) string { return k.Namespace + "/" + k.Service + "/" + k.ID }

// adopt starts running a check, taking the stored status as its own, at
// a random point of its first interval so that many checks spread out.
func (c *Checker) adopt(ck checkKey, in *registry.Instance, spec registry.Check) {
	st := &state{key: ck, spec: spec, target: spec.ProbeTarget(in), status: spec.Status, since: spec.Since, index: -1}
	if st.status == registry.HealthUnspecified {
		st.status = registry.HealthPassing
	}
	st.prober = newProber(spec, st.target, func(ctx context.Context) (bool, error) {
		return c.cfg.Store.TTLAlive(ctx, ck.inst, ck.name)
	}, c.conns)
	st.next = time.Now().Add(time.Duration(rand.Int64N(int64(spec.Interval))))
	c.states[ck] = st
	heap.Push(&c.queue, st)
}

func (c *Checker) drop(st *state) {
	st.removed = true
	delete(c.states, st.key)
	if st.index >= 0 {
		heap.Remove(&c.queue, st.index)
	}
	if !st.running {
		st.prober.close()
	}
}

// shutdown waits for the probes and writes in flight and closes the
// probers. A probe whose result could not be delivered closed its own;
// one delivered but not handled is drained here.
func (c *Checker) shutdown() {
	c.wg.Wait()
	for drained := false; !drained; {
		select {
		case r := <-c.results:
			if !r.wrote {
				r.st.running = false
				if r.st.removed {
					r.st.prober.close()
				}
			}
		default:
			drained = true
		}
	}
	for _, st := range c.states {
		if !st.running {
			st.prober.close()
		}
	}
}

// runDue starts every probe that is due; one still running skips its turn
// rather than piling up behind a slow target.
func (c *Checker) runDue(ctx context.Context, now time.Time) {
	for len(c.queue) > 0 && !c.queue[0].next.After(now) {
		st := heap.Pop(&c.queue).(*state)
		due := st.next
		st.next = nextRun(due, now, st.spec)
		heap.Push(&c.queue, st)
		if st.running {
			c.metrics.skipped.Inc()
			continue
		}
		if !c.sem.TryAcquire(1) {
			c.metrics.skipped.Inc()
			continue
		}
		st.running = true
		lateness := now.Sub(due)
		c.wg.Go(func() {
			defer c.sem.Release(1)
			pctx, cancel := context.WithTimeout(ctx, st.spec.Timeout)
			v, output := st.prober.probe(pctx)
			cancel()
			if !c.report(result{st: st, ok: v == pass, refused: v == noVerdict, output: output, lateness: lateness}) {
				st.prober.close() // the scheduler has stopped: nobody else will
			}
		})
	}
}

// nextRun is one interval after the due time, moved by up to ±jitter, and
// never in the past (a server that fell behind does not run a burst).
func nextRun(due, now time.Time, spec registry.Check) time.Time {
	j := (rand.Float64()*2 - 1) * spec.Jitter * float64(spec.Interval)
	next := due.Add(spec.Interval + time.Duration(j))
	if next.Before(now) {
		next = now.Add(spec.Interval / 4)
	}
	return next
}

// handle applies a probe's result (or a write's end) to its check.
func (c *Checker) handle(ctx context.Context, r result) {
	st := r.st
	if r.wrote {
		st.writing = false
		if !r.ok && !st.removed { // etcd refused: try again (the goroutine paused)
			c.write(st, st.status, "retrying: "+r.output)
		}
		return
	}
	st.running = false
	if st.removed {
		st.prober.close()
		return
	}
	if r.refused {
		// The server's limit, not the target's fault: the check's
		// counters stay where they are.
		c.metrics.observeRefused(r.lateness)
		if now := time.Now(); now.Sub(c.refusedAt) >= time.Minute {
			c.refusedAt = now
			c.cfg.Log.Warn("health: probes get no verdict: "+r.output, "open", c.conns.inUse())
		}
		return
	}
	c.metrics.observeProbe(st.spec.Kind, r.ok, r.lateness)
	if st.spec.Kind == registry.CheckTTL {
		// Pushes decide the status; the owner only marks a silent check.
		if r.ok {
			st.failures = 0
		} else if st.failures++; st.status != registry.HealthCritical && st.failures >= st.spec.FailuresBeforeCritical && !st.writing {
			c.write(st, registry.HealthCritical, r.output)
		}
		return
	}
	if r.ok {
		st.successes++
		st.failures = 0
		if st.status != registry.HealthPassing && st.successes >= st.spec.SuccessesBeforePassing {
			c.write(st, registry.HealthPassing, r.output)
		}
	} else {
		st.failures++
		st.successes = 0
		if st.status != registry.HealthCritical && st.failures >= st.spec.FailuresBeforeCritical {
			c.write(st, registry.HealthCritical, r.output)
		}
	}
	if st.status == registry.HealthCritical && st.spec.DeregisterCriticalAfter > 0 && !st.since.IsZero() &&
		time.Since(st.since) >= st.spec.DeregisterCriticalAfter && !st.writing {
		c.deregister(ctx, st)
	}
}

// write records a transition in the instance's record, in the background;
// status is ours from now on whatever the write's fate (a failed write is
// retried by reassign when the record disagrees).
func (c *Checker) write(st *state, status registry.Health, output string) {
	from := st.status
	st.status, st.since = status, time.Now()
	st.writing = true
	c.metrics.transitions.WithLabelValues(status.String()).Inc()
	if len(output) > registry.MaxCheckOutputLen {
		output = output[:registry.MaxCheckOutputLen]
	}
	since := st.since
	c.cfg.Log.Info("health: check changed", "instance", ownerKey(st.key.inst), "check", st.key.name, "from", from.String(), "to", status.String(), "output", output)
	c.wg.Go(func() {
		wctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := c.cfg.Store.Update(wctx, st.key.inst, func(in *registry.Instance) bool {
			for n := range in.Checks {
				chk := &in.Checks[n]
				if chk.Name == st.key.name && chk.SameSpec(&st.spec) {
					if chk.Status == status {
						return false
					}
					chk.Status, chk.Output, chk.Since = status, output, since
					return true
				}
			}
			return false // re-registered with another spec: the new one starts afresh
		})
		failed := err != nil && !errors.Is(err, store.ErrInstanceNotFound)
		if failed {
			c.metrics.writeErrors.Inc()
			c.cfg.Log.Warn("health: writing a check transition", "instance", ownerKey(st.key.inst), "err", err)
			select { // do not spin while etcd is away
			case <-time.After(time.Second):
			case <-c.runCtx.Done():
				return
			}
		}
		c.report(result{st: st, wrote: true, ok: !failed, output: output})
	})
}

// deregister removes an instance critical for longer than its check allows.
func (c *Checker) deregister(ctx context.Context, st *state) {
	in := c.cfg.Instance(st.key.inst)
	if in == nil {
		return
	}
	st.writing = true
	rev := in.Revision
	c.wg.Go(func() {
		dctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if ok, err := c.cfg.Store.DeleteIfUnchanged(dctx, st.key.inst, rev); err == nil && ok {
			c.metrics.deregistered.Inc()
			c.cfg.Log.Info("health: deregistered an instance critical too long", "instance", ownerKey(st.key.inst), "check", st.key.name)
		}
		c.report(result{st: st, wrote: true, ok: true})
	})
}

// report hands a result to the scheduler unless it has stopped, and
// reports whether it did.
func (c *Checker) report(r result) bool {
	select {
	case c.results <- r:
		return true
	case <-c.runCtx.Done():
		return false
	}
}

// stateHeap orders states by next run.
type stateHeap []*state

func (h stateHeap) Len() int           { return len(h) }
func (h stateHeap) Less(i, j int) bool { return h[i].next.Before(h[j].next) }
func (h stateHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].index, h[j].index = i, j
}
func (h *stateHeap) Push(x any) {
	st := x.(*state)
	st.index = len(*h)
	*h = append(*h, st)
}
func (h *stateHeap) Pop() any {
	old := *h
	st := old[len(old)-1]
	old[len(old)-1] = nil
	st.index = -1
	*h = old[:len(old)-1]
	return st
}

package discovery

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jonboulle/clockwork"

	"beacon.dev/beacon/endpoint"
	"beacon.dev/beacon/registry"
)

// Config tunes a Cache. Zero fields take defaults.
type Config struct {
	// SnapshotDir, if set, holds an on-disk snapshot of the services,
	// rewritten at most every SnapshotEvery (default 1 s) after changes and
	// read only for a cold start while the registry is unreachable. It is
	// made (0700) if missing.
	SnapshotDir   string
	SnapshotEvery time.Duration
	// SnapshotMaxAge: older snapshots are not used (default 24 h).
	SnapshotMaxAge time.Duration
	// ColdStartWait is how long a new cache waits for a registry that does
	// not answer before serving the disk snapshot (default 2 s). A
	// registry that refuses (the first watch attempt fails) does not make
	// it wait: the snapshot is served at once, and the registry's answer
	// replaces it whenever it comes.
	ColdStartWait time.Duration
	// MassLoss: when one update removes at least this share of a service's
	// endpoints by session loss (they vanished while UP, without
	// deregistering or draining first), they are kept as suspects for
	// MassLossGrace (default 0.5 and 30 s; -1 disables).
	MassLoss      float64
	MassLossGrace time.Duration
	Logger        *slog.Logger
	Clock         clockwork.Clock
}

func (c Config) withDefaults() (Config, error) {
	if c.SnapshotEvery == 0 {
		c.SnapshotEvery = time.Second
	}
	if c.SnapshotMaxAge == 0 {
		c.SnapshotMaxAge = 24 * time.Hour
	}
	if c.ColdStartWait == 0 {
		c.ColdStartWait = 2 * time.Second
	}
	if c.MassLoss == 0 {
		c.MassLoss = 0.5
	}
	if c.MassLossGrace == 0 {
		c.MassLossGrace = 30 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Clock == nil {
		c.Clock = clockwork.NewRealClock()
	}
	switch {
	case c.SnapshotEvery < 0 || c.SnapshotMaxAge < 0 || c.ColdStartWait < 0 || c.MassLossGrace < 0:
		return c, errors.New("discovery: durations must not be negative")
	case c.MassLoss != -1 && (c.MassLoss <= 0 || c.MassLoss > 1):
		return c, fmt.Errorf("discovery: mass loss %v must be in (0, 1] or -1 (off)", c.MassLoss)
	}
	return c, nil
}

// Cache follows services and publishes their endpoint sets.
type Cache struct {
	src     Source
	cfg     Config
	stop    context.CancelFunc
	done    chan struct{}
	restart chan struct{} // size 1: the service list changed

	mu        sync.Mutex
	services  map[string]*entry // guarded by mu
	stream    Stream            // guarded by mu; nil between streams
	startedAt time.Time
	diskErr   error     // guarded by mu; why the disk snapshot was not used
	diskAt    time.Time // guarded by mu; when the served disk snapshot was written
	dirty     bool      // guarded by mu; changes not yet on disk
	writeErr  error     // guarded by mu
	closed    bool      // guarded by mu
}

// entry is one service. Lock order: Cache.mu only.
type entry struct {
	snap     *registry.Snapshot // latest applied (registry or disk)
	fromDisk bool
	held     map[string]held // suspects kept after a mass loss
	set      endpoint.Set
	subs     []chan struct{}
	pinned   bool            // named to New: followed until Close, subscribed or not
	timer    clockwork.Timer // next suspect expiry
}

type held struct {
	in    *registry.Instance
	until time.Time
}

// New starts following services (more can be added by Subscribe) until
// Close.
func New(src Source, cfg Config, services ...string) (*Cache, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	for _, s := range services {
		if err := registry.ValidateName("service", s); err != nil {
			return nil, err
		}
	}
	ctx, stop := context.WithCancel(context.Background())
	c := &Cache{
		src: src, cfg: cfg, stop: stop, done: make(chan struct{}), restart: make(chan struct{}, 1),
		services: make(map[string]*entry), startedAt: cfg.Clock.Now(),
	}
	for _, s := range services {
		c.services[s] = &entry{set: endpoint.Set{Service: s}, pinned: true}
	}
	go c.run(ctx)
	return c, nil
}

// Close stops following and writes a last snapshot.
func (c *Cache) Close() {
	c.mu.Lock()
	c.closed = true
	for _, e := range c.services {
		if e.timer != nil {
			e.timer.Stop()
		}
	}
	c.mu.Unlock()
	c.stop()
	<-c.done
	c.flush(true)
}

// Subscription follows one service; it satisfies balancer.Source.
type Subscription struct {
	c       *Cache
	service string
	ch      chan struct{}
}

// Subscribe follows a service, adding it to the watch if needed. With a
// Source that is a Resumer, the watch starts again from the revisions the
// cache holds, so only the new service is sent; otherwise every followed
// service is sent again.
func (c *Cache) Subscribe(service string) (*Subscription, error) {
	if err := registry.ValidateName("service", service); err != nil {
		return nil, err
	}
	c.mu.Lock()
	e, ok := c.services[service]
	if !ok {
		e = &entry{set: endpoint.Set{Service: service}}
		c.services[service] = e
	}
	sub := &Subscription{c: c, service: service, ch: make(chan struct{}, 1)}
	e.subs = append(e.subs, sub.ch)
	c.mu.Unlock()
	if !ok {
		c.restartWatch()
	}
	return sub, nil
}

// restartWatch has run open a new stream with the services followed now.
func (c *Cache) restartWatch() {
	select {
	case c.restart <- struct{}{}:
	default:
	}
}

// Changed receives after every change of the service's set.
func (s *Subscription) Changed() <-chan struct{} { return s.ch }

// Endpoints returns the latest set.
func (s *Subscription) Endpoints() endpoint.Set {
	set, _ := s.c.Endpoints(s.service)
	return set
}

// Close stops notifications. A service no subscription follows any more,
// and that was not named to New, is no longer followed: it leaves the
// watch and the cache.
func (s *Subscription) Close() {
	c := s.c
	c.mu.Lock()
	e, ok := c.services[s.service]
	dropped := false
	if ok {
		e.subs = slices.DeleteFunc(e.subs, func(ch chan struct{}) bool { return ch == s.ch })
		if len(e.subs) == 0 && !e.pinned && !c.closed {
			if e.timer != nil {
				e.timer.Stop()
			}
			delete(c.services, s.service)
			c.dirty, dropped = true, true
		}
	}
	c.mu.Unlock()
	if dropped {
		c.restartWatch()
	}
}

// Endpoints returns a service's set and whether the cache has data for it.
func (c *Cache) Endpoints(service string) (endpoint.Set, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.services[service]
	if !ok {
		return endpoint.Set{Service: service}, false
	}
	return e.set, e.snap != nil
}

// Status describes the cache's freshness.
type Status struct {
	Connected bool
	// Stale is how long the registry has not been confirming the data: 0
	// while the watch is connected.
	Stale time.Duration
	// FromDisk: some sets come from the disk snapshot written at DiskAt.
	FromDisk bool
	DiskAt   time.Time
	// DiskErr says why the disk snapshot was not used at a cold start;
	// WriteErr is the last failure to write it.
	DiskErr, WriteErr error
	Services          int
	Endpoints         int
	Suspects          int // kept after a mass loss
}

// Status reports freshness and counts.
func (c *Cache) Status() Status {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := Status{DiskErr: c.diskErr, WriteErr: c.writeErr, DiskAt: c.diskAt, Services: len(c.services)}
	since := c.startedAt
	if c.stream != nil {
		ws := c.stream.Status()
		st.Connected, since = ws.Connected, ws.Since
	}
	if !st.Connected {
		st.Stale = max(c.cfg.Clock.Since(since), time.Nanosecond)
	}
	for _, e := range c.services {
		st.FromDisk = st.FromDisk || e.fromDisk
		st.Endpoints += len(e.set.Endpoints)
		st.Suspects += len(e.held)
	}
	return st
}

func (c *Cache) serviceNames() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Sorted(maps.Keys(c.services))
}

// coldStartProbe is how often a cold start checks whether the registry
// has refused the watch.
const coldStartProbe = 25 * time.Millisecond

func (c *Cache) run(ctx context.Context) {
	defer close(c.done)
	coldStart := c.cfg.Clock.NewTimer(c.cfg.ColdStartWait)
	defer coldStart.Stop()
	flush := c.cfg.Clock.NewTicker(c.cfg.SnapshotEvery)
	defer flush.Stop()
	everSynced, diskTried := false, false
	// Until the first sync, the stream is probed for a failed attempt (a
	// refused connection): a cold start need not wait out ColdStartWait
	// for a registry that is known to be down.
	probe := c.cfg.Clock.NewTicker(coldStartProbe)
	defer probe.Stop()
	probeChan := probe.Chan()
	stopProbe := func() { probe.Stop(); probeChan = nil } // its work ends at the first sync
	tryDisk := func() {
		if !everSynced && !diskTried {
			diskTried = true
			c.loadDisk()
		}
		stopProbe()
	}
	for ctx.Err() == nil {
		names := c.serviceNames()
		if len(names) == 0 { // an empty list would watch every service
			select {
			case <-c.restart:
			case <-ctx.Done():
			}
			continue
		}
		sctx, cancel := context.WithCancel(ctx)
		stream, err := c.watch(sctx, names)
		if err != nil { // only for invalid requests: nothing to retry
			c.cfg.Logger.Error("discovery: watch refused", "err", err)
			cancel()
			return
		}
		c.mu.Lock()
		c.stream = stream
		c.mu.Unlock()
		batches := make(chan []*registry.Snapshot)
		applied := make(chan struct{})
		go func() { // owned: ends with sctx
			defer close(batches)
			for {
				// Calling Next tells the registry the last batch is in
				// effect, so it is called only once apply has returned.
				snaps, err := stream.Next(sctx)
				if err != nil {
					return
				}
				select {
				case batches <- snaps:
				case <-sctx.Done():
					return
				}
				select {
				case <-applied:
				case <-sctx.Done():
					return
				}
			}
		}()
		synced := stream.Synced() // nil once seen: a closed channel is always ready
		restarted := false
		for !restarted && ctx.Err() == nil {
			select {
			case snaps, ok := <-batches:
				if ok {
					c.apply(snaps, false)
					select {
					case applied <- struct{}{}:
					case <-ctx.Done():
					}
				}
			case <-synced:
				everSynced, synced = true, nil
				stopProbe()
				c.applySynced(stream, names)
			case <-coldStart.Chan():
				tryDisk()
			case <-probeChan:
				if stream.Status().Reconnects > 0 {
					tryDisk()
				}
			case <-flush.Chan():
				c.flush(false)
			case <-c.restart:
				restarted = true
			case <-ctx.Done():
			}
		}
		cancel()
		for range batches { // wait for the reader
		}
		stream.Close()
		c.mu.Lock()
		c.stream = nil
		c.mu.Unlock()
	}
}

// watch opens a stream for names, from the snapshots held when the source
// can resume: those the registry gave (not the disk's, which applySynced
// must be free to replace) of services still followed.
func (c *Cache) watch(ctx context.Context, names []string) (Stream, error) {
	r, ok := c.src.(Resumer)
	if !ok {
		return c.src.Watch(ctx, names)
	}
	c.mu.Lock()
	var have []*registry.Snapshot
	for _, name := range names {
		if e := c.services[name]; e != nil && e.snap != nil && !e.fromDisk {
			have = append(have, e.snap)
		}
	}
	c.mu.Unlock()
	return r.WatchFrom(ctx, names, have)
}

// applySynced settles every followed service once the stream has caught
// up: a service the registry sent nothing for has no instances, which is
// an answer too (callers fail fast instead of waiting).
func (c *Cache) applySynced(stream Stream, names []string) {
	var snaps []*registry.Snapshot
	for _, name := range names {
		if s, ok := stream.Snapshot(name); ok {
			snaps = append(snaps, s)
		} else {
			snaps = append(snaps, &registry.Snapshot{Namespace: c.src.Namespace(), Service: name})
		}
	}
	c.mu.Lock()
	var missing []*registry.Snapshot
	for _, s := range snaps {
		if e, ok := c.services[s.Service]; ok && (e.snap == nil || e.fromDisk) {
			missing = append(missing, s)
		}
	}
	c.mu.Unlock()
	c.apply(missing, false)
}

// loadDisk serves the disk snapshot for services the registry has not
// answered for yet.
func (c *Cache) loadDisk() {
	if c.cfg.SnapshotDir == "" {
		return
	}
	snaps, at, err := readSnapshot(c.cfg.SnapshotDir, c.src.Namespace(), c.cfg.SnapshotMaxAge, c.cfg.Clock.Now())
	c.mu.Lock()
	c.diskErr = err
	if err == nil {
		c.diskAt = at
	}
	c.mu.Unlock()
	if err != nil {
		c.cfg.Logger.Warn("discovery: registry unreachable and no usable disk snapshot", "err", err)
		return
	}
	c.cfg.Logger.Warn("discovery: registry unreachable, serving the disk snapshot", "written", at)
	list := make([]*registry.Snapshot, 0, len(snaps))
	for _, s := range snaps {
		list = append(list, s)
	}
	c.apply(list, true)
}

// flush writes the disk snapshot if something changed.
func (c *Cache) flush(final bool) {
	if c.cfg.SnapshotDir == "" {
		return
	}
	c.mu.Lock()
	if !c.dirty {
		c.mu.Unlock()
		return
	}
	snaps := make(map[string]*registry.Snapshot, len(c.services))
	for name, e := range c.services {
		if e.snap != nil && !e.fromDisk {
			snaps[name] = e.snap
		}
	}
	c.dirty = false
	c.mu.Unlock()
	err := writeSnapshot(c.cfg.SnapshotDir, c.src.Namespace(), snaps, c.cfg.Clock.Now())
	c.mu.Lock()
	prev := c.writeErr
	c.writeErr = err
	if err != nil && !final {
		c.dirty = true
	}
	c.mu.Unlock()
	if err != nil && (prev == nil || prev.Error() != err.Error()) { // once per new error, not every flush
		c.cfg.Logger.Warn("discovery: writing the disk snapshot failed", "dir", c.cfg.SnapshotDir, "err", err)
	}
}

// apply takes in full snapshots and notifies subscribers of changed sets.
func (c *Cache) apply(snaps []*registry.Snapshot, fromDisk bool) {
	var notify []chan struct{}
	c.mu.Lock()
	now := c.cfg.Clock.Now()
	for _, s := range snaps {
		e, ok := c.services[s.Service]
		if !ok {
			continue // a service nobody follows any more
		}
		if fromDisk && e.snap != nil {
			continue // the registry answered first
		}
		if !fromDisk && e.snap != nil && !e.fromDisk && s.Revision <= e.snap.Revision {
			continue
		}
		c.reconcileLocked(s.Service, e, s, fromDisk, now)
		notify = append(notify, e.subs...)
		c.dirty = c.dirty || !fromDisk
	}
	c.mu.Unlock()
	for _, ch := range notify {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

// reconcileLocked applies one snapshot, deciding which vanished endpoints
// to hold back.
func (c *Cache) reconcileLocked(service string, e *entry, s *registry.Snapshot, fromDisk bool, now time.Time) {
	present := make(map[string]*registry.Instance, len(s.Instances))
	for _, in := range s.Instances {
		present[in.ID] = in
	}
	// Suspects that came back, or whose grace ended, leave the held set.
	for id, h := range e.held {
		if _, back := present[id]; back || !now.Before(h.until) {
			delete(e.held, id)
		}
	}
	if e.snap != nil && c.cfg.MassLoss > 0 && !fromDisk {
		var lost []*registry.Instance
		before := len(e.held)
		for _, in := range e.snap.Instances {
			if !in.Routable() {
				continue
			}
			before++
			// Gone while UP, and owned by a session: lease loss, or an
			// abrupt close. Persistent instances only leave by explicit
			// deregistration; draining ones announced it.
			if _, still := present[in.ID]; !still && in.Ephemeral() {
				lost = append(lost, in)
			}
		}
		if len(lost) > 0 && float64(len(lost)+len(e.held)) >= c.cfg.MassLoss*float64(before) {
			if e.held == nil {
				e.held = make(map[string]held)
			}
			for _, in := range lost {
				e.held[in.ID] = held{in: in, until: now.Add(c.cfg.MassLossGrace)}
			}
			c.cfg.Logger.Warn("discovery: mass endpoint loss held back",
				"service", service, "lost", len(lost), "of", before, "grace", c.cfg.MassLossGrace)
		}
	}
	e.snap, e.fromDisk = s, fromDisk
	e.set = buildSet(service, s, e.held, fromDisk)
	c.armExpiryLocked(service, e)
}

func buildSet(service string, s *registry.Snapshot, suspects map[string]held, fromDisk bool) endpoint.Set {
	set := endpoint.Set{Service: service, Revision: s.Revision, FromDisk: fromDisk}
	// Under the service's protection threshold, unhealthy instances are
	// used too, flagged Suspect (the registry's panic mode).
	available, protected := s.Available()
	for _, in := range available {
		ep := endpoint.FromInstance(in)
		ep.Suspect = protected && !in.Routable()
		set.Endpoints = append(set.Endpoints, ep)
	}
	for _, h := range suspects {
		ep := endpoint.FromInstance(h.in)
		ep.Suspect = true
		set.Endpoints = append(set.Endpoints, ep)
	}
	slices.SortFunc(set.Endpoints, func(a, b *endpoint.Endpoint) int { return strings.Compare(a.ID, b.ID) })
	return set
}

// armExpiryLocked schedules the removal of the earliest suspect.
func (c *Cache) armExpiryLocked(service string, e *entry) {
	if e.timer != nil {
		e.timer.Stop()
		e.timer = nil
	}
	if len(e.held) == 0 || c.closed {
		return
	}
	var first time.Time
	for _, h := range e.held {
		if first.IsZero() || h.until.Before(first) {
			first = h.until
		}
	}
	e.timer = c.cfg.Clock.AfterFunc(first.Sub(c.cfg.Clock.Now()), func() { c.expire(service) })
}

// expire drops suspects whose grace ended.
func (c *Cache) expire(service string) {
	c.mu.Lock()
	e, ok := c.services[service]
	if !ok || c.closed || e.snap == nil {
		c.mu.Unlock()
		return
	}
	now := c.cfg.Clock.Now()
	for id, h := range e.held {
		if !now.Before(h.until) {
			delete(e.held, id)
		}
	}
	e.set = buildSet(service, e.snap, e.held, e.fromDisk)
	c.armExpiryLocked(service, e)
	notify := slices.Clone(e.subs)
	c.mu.Unlock()
	for _, ch := range notify {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

package consul

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
	"golang.org/x/time/rate"

	"beacon.dev/beacon/backend/internal/snapqueue"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/discovery"
	"beacon.dev/beacon/internal/backoff"
	"beacon.dev/beacon/registry"
)

// Backoff after a failed query, and the rate limit on queries per service
// (Consul asks clients to limit, in case answers come back at once).
const (
	minBackoff = 100 * time.Millisecond
	maxBackoff = 5 * time.Second
	queryEvery = 50 * time.Millisecond
	queryBurst = 5
)

// Watch implements discovery.Source: a blocking query per service, or —
// with no services named — one on the catalog's service list that starts
// and stops the per-service ones.
func (b *Backend) Watch(ctx context.Context, services []string) (discovery.Stream, error) {
	for i, s := range services {
		if err := registry.ValidateName(fmt.Sprintf("services[%d]", i), s); err != nil {
			return nil, err
		}
	}
	wctx, cancel := context.WithCancel(ctx)
	st := &stream{Queue: snapqueue.New(), b: b, cancel: cancel, synced: make(chan struct{}),
		followers: map[string]*follower{}, unsynced: map[string]bool{}, status: client.WatchStatus{Connected: true, Since: time.Now()}}
	context.AfterFunc(wctx, st.Queue.Close)
	st.mu.Lock()
	if len(services) == 0 {
		st.catalogPending = true
		st.wg.Add(1)
		go st.followCatalog(wctx) // owned: ends with the stream
	} else {
		for _, svc := range services {
			st.followLocked(wctx, svc)
		}
	}
	st.mu.Unlock()
	return st, nil
}

type stream struct {
	*snapqueue.Queue
	b      *Backend
	cancel context.CancelFunc
	synced chan struct{}
	wg     sync.WaitGroup

	mu             sync.Mutex
	followers      map[string]*follower // guarded by mu
	unsynced       map[string]bool      // guarded by mu; followed services not answered yet
	catalogPending bool                 // guarded by mu; following all, the catalog not answered yet
	syncedClosed   bool                 // guarded by mu
	status         client.WatchStatus   // guarded by mu
}

// follower is the query following one service.
type follower struct {
	cancel context.CancelFunc
	done   chan struct{}
}

func (st *stream) followLocked(ctx context.Context, service string) {
	fctx, cancel := context.WithCancel(ctx)
	f := &follower{cancel: cancel, done: make(chan struct{})}
	st.followers[service] = f
	st.unsynced[service] = true
	st.wg.Add(1)
	go func() { // owned: ends with the stream or when the catalog drops the service
		defer st.wg.Done()
		defer close(f.done)
		st.followService(fctx, service)
	}()
}

// answered marks a first answer and closes Synced once all are in.
func (st *stream) answered(service string) {
	st.mu.Lock()
	defer st.mu.Unlock()
	delete(st.unsynced, service)
	st.maybeSyncedLocked()
}

func (st *stream) maybeSyncedLocked() {
	if !st.syncedClosed && !st.catalogPending && len(st.unsynced) == 0 {
		st.syncedClosed = true
		close(st.synced)
	}
}

func (st *stream) report(err error) {
	st.mu.Lock()
	defer st.mu.Unlock()
	up := err == nil
	if up != st.status.Connected {
		st.status.Connected, st.status.Since = up, time.Now()
		if up {
			st.status.Reconnects++
		}
	}
	if err != nil {
		st.status.LastErr = err
	}
}

// query runs one blocking query with the stream's limits: rate limited,
// and after an error backed off and read afresh (index 0) — the agent may
// have been restarted, and its index with it.
type query struct {
	st    *stream
	limit *rate.Limiter
	retry *backoff.Backoff
	index uint64
}

func (st *stream) newQuery() *query {
	return &query{st: st, limit: rate.NewLimiter(rate.Every(queryEvery), queryBurst), retry: backoff.New(backoff.Config{Base: minBackoff, Max: maxBackoff})}
}

// run calls f with the options to use; false once ctx is done.
func (q *query) run(ctx context.Context, f func(*api.QueryOptions) (uint64, error)) (changed bool, ok bool) {
	for {
		if err := q.limit.Wait(ctx); err != nil {
			return false, false
		}
		qctx, cancel := context.WithCancel(ctx)
		restarted := context.AfterFunc(q.st.b.restartSignal(), cancel)
		got, err := f((&api.QueryOptions{WaitIndex: q.index, WaitTime: q.st.b.cfg.WaitTime}).WithContext(qctx))
		cut := !restarted()
		cancel()
		if ctx.Err() != nil {
			return false, false
		}
		if err != nil && cut { // the agent restarted: read afresh, now
			q.index = 0
			continue
		}
		q.st.report(err)
		if err != nil {
			q.index = 0
			if q.retry.Wait(ctx) != nil {
				return false, false
			}
			continue
		}
		q.retry.Reset()
		changed = got != q.index
		q.index = nextIndex(got)
		return changed, true
	}
}

// followService keeps a service's snapshot up to date.
func (st *stream) followService(ctx context.Context, service string) {
	q := st.newQuery()
	var (
		lastRaw   uint64 // last X-Consul-Index seen
		shift     int64  // added to the index so revisions only grow across resets
		delivered *registry.Snapshot
	)
	for {
		var entries []*api.ServiceEntry
		var raw uint64
		_, ok := q.run(ctx, func(o *api.QueryOptions) (uint64, error) {
			var meta *api.QueryMeta
			var err error
			entries, meta, err = st.b.health.Service(service, "", st.b.cfg.PassingOnly, o)
			if err != nil {
				return 0, err
			}
			raw = meta.LastIndex
			return raw, nil
		})
		if !ok {
			return
		}
		if raw < lastRaw { // went backwards: a reset; this answer is the whole truth
			shift += int64(lastRaw) - int64(raw) + 1
			st.b.log.Info("beacon/consul: the index went backwards; starting again from this answer", "service", service, "from", lastRaw, "to", raw)
		}
		if delivered != nil && raw == lastRaw {
			continue // the wait ended with nothing new
		}
		lastRaw = raw
		snap := st.b.snapshot(service, entries, int64(raw)+shift)
		if prev, ok := st.Latest(service); ok && snap.Revision <= prev.Revision {
			snap.Revision = prev.Revision + 1 // revisions only grow, resets or not
		}
		if delivered != nil || len(snap.Instances) > 0 {
			st.Offer(snap)
			delivered = snap
		} else {
			delivered = snap // empty from the start: nothing to tell
		}
		st.answered(service)
	}
}

// followCatalog follows the list of services and a blocking query per
// service on it.
func (st *stream) followCatalog(ctx context.Context) {
	defer st.wg.Done()
	q := st.newQuery()
	for {
		var names map[string][]string
		changed, ok := q.run(ctx, func(o *api.QueryOptions) (uint64, error) {
			var meta *api.QueryMeta
			var err error
			names, meta, err = st.b.cat.Services(o)
			if err != nil {
				return 0, err
			}
			return meta.LastIndex, nil
		})
		if !ok {
			return
		}
		if !changed {
			continue
		}
		dropped := map[string]*follower{}
		st.mu.Lock()
		for name := range names {
			if _, followed := st.followers[name]; !followed && registry.ValidateName("service", name) == nil {
				st.followLocked(ctx, name)
			}
		}
		for name, f := range st.followers {
			if _, listed := names[name]; !listed {
				f.cancel()
				dropped[name] = f
				delete(st.followers, name)
				delete(st.unsynced, name)
			}
		}
		st.catalogPending = false
		st.maybeSyncedLocked()
		st.mu.Unlock()
		// A service gone from the catalog has no instances; its follower
		// may have stopped before seeing that, so say it here, once the
		// follower can no longer deliver anything older.
		for name, f := range dropped {
			<-f.done
			if last, ok := st.Latest(name); ok && len(last.Instances) > 0 {
				st.Offer(&registry.Snapshot{Namespace: last.Namespace, Service: name, Revision: last.Revision + 1})
			}
		}
	}
}

func (st *stream) Synced() <-chan struct{} { return st.synced }

func (st *stream) Status() client.WatchStatus {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.status
}

// Close stops every query and waits for them.
func (st *stream) Close() {
	st.cancel()
	st.wg.Wait()
	st.Queue.Close()
}

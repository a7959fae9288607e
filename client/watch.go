package client

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/internal/backoff"
	"beacon.dev/beacon/internal/wire"
	"beacon.dev/beacon/registry"
)

// Watcher follows services through one stream, reconnecting (to the next
// server if need be) and resuming from the revisions it holds. It hands out
// full per-service snapshots; revisions only ever grow per service.
type Watcher struct {
	c        *Client
	ns       string
	services []string
	notify   chan struct{} // size 1: pending has something
	server   atomic.Int64  // index into c.rpcs of the stream's server; written by run
	stop     context.CancelFunc
	done     chan struct{}

	mu           sync.Mutex
	cancelStream context.CancelFunc            // guarded by mu; ends the current stream
	moveTo       int64                         // guarded by mu; -1, or the server the rebalancer asked it to move to
	state        map[string]*registry.Snapshot // guarded by mu; latest per service
	pending      map[string]*registry.Snapshot // guarded by mu; not yet returned by Next
	synced       bool                          // guarded by mu; the stream caught up at least once
	connected    bool                          // guarded by mu
	since        time.Time                     // guarded by mu; when connected last changed
	lastErr      error                         // guarded by mu
	reconnects   int                           // guarded by mu
	stale        int                           // guarded by mu
	deltas       int                           // guarded by mu
	syncedCh     chan struct{}

	// Acknowledgements: a batch returned by Next counts as applied when
	// the consumer comes back for the next one.
	handedOut map[string]int64 // guarded by mu; returned by the last Next
	applied   map[string]int64 // guarded by mu; everything applied so far
	unacked   map[string]int64 // guarded by mu; applied, not yet sent to the server
	ackNotify chan struct{}    // size 1: unacked has something
	// With a server that asks (acknowledge_on_request), only what it asks
	// for is acknowledged: service -> the revision it waits for.
	onRequest bool             // guarded by mu; the stream's server asks
	wanted    map[string]int64 // guarded by mu
	// Services whose delta did not apply to what is held: the next stream
	// asks for them whole.
	resync map[string]bool // guarded by mu
}

// WatchFrom starts the watch from snapshots the caller already holds (of
// the watched namespace): the server sends only the services that changed
// since, and Snapshot returns these until then. Next does not hand them
// out again.
func WatchFrom(snaps []*registry.Snapshot) CallOption {
	return func(c *callConfig) { c.from = append(c.from, snaps...) }
}

// Watch starts following services (all services of the namespace when none
// is named) until ctx ends or Close is called.
func (c *Client) Watch(ctx context.Context, services []string, opts ...CallOption) (*Watcher, error) {
	cfg := c.options(opts)
	w := &Watcher{
		c: c, ns: cfg.namespace, services: slices.Clone(services),
		notify: make(chan struct{}, 1), done: make(chan struct{}), syncedCh: make(chan struct{}),
		state: make(map[string]*registry.Snapshot), pending: make(map[string]*registry.Snapshot),
		since:     time.Now(),
		handedOut: make(map[string]int64), applied: make(map[string]int64), unacked: make(map[string]int64),
		ackNotify: make(chan struct{}, 1), wanted: make(map[string]int64), resync: make(map[string]bool),
	}
	w.server.Store(c.current.Load())
	w.moveTo = -1
	for _, s := range cfg.from {
		if old, ok := w.state[s.Service]; s != nil && (!ok || s.Revision > old.Revision) {
			w.state[s.Service] = s
		}
	}
	if err := registry.ValidateNamespace(w.ns); err != nil {
		return nil, err
	}
	for _, s := range w.services {
		if err := registry.ValidateName("service", s); err != nil {
			return nil, err
		}
	}
	runCtx, stop := context.WithCancel(ctx)
	w.stop = stop
	if !c.ownWatcher(w) {
		stop()
		return nil, ErrClosed
	}
	go w.run(runCtx)
	return w, nil
}

// Synced is closed once the watcher has caught up with the registry for
// the first time.
func (w *Watcher) Synced() <-chan struct{} { return w.syncedCh }

// Next waits for changes and returns the newest snapshot of each service
// that changed since the last call, sorted by service.
//
// Calling Next again tells the server that the previous batch has been
// applied: a draining instance waits (bounded) for that acknowledgement
// before it stops accepting. So consume snapshots in a loop and call Next
// once they are in effect.
func (w *Watcher) Next(ctx context.Context) ([]*registry.Snapshot, error) {
	w.markApplied()
	for {
		w.mu.Lock()
		if len(w.pending) > 0 {
			out := make([]*registry.Snapshot, 0, len(w.pending))
			for _, s := range w.pending {
				out = append(out, s)
				w.handedOut[s.Service] = s.Revision
			}
			clear(w.pending)
			w.mu.Unlock()
			slices.SortFunc(out, func(a, b *registry.Snapshot) int { return cmp.Compare(a.Service, b.Service) })
			return out, nil
		}
		w.mu.Unlock()
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-w.done:
			return nil, ErrClosed
		case <-w.notify:
		}
	}
}

// markApplied moves what the last Next returned to the acknowledgements
// waiting to be sent.
func (w *Watcher) markApplied() {
	w.mu.Lock()
	for svc, rev := range w.handedOut {
		w.applied[svc] = max(w.applied[svc], rev)
		if !w.onRequest {
			w.unacked[svc] = max(w.unacked[svc], rev)
		}
	}
	clear(w.handedOut)
	w.moveWantedLocked()
	n := len(w.unacked)
	w.mu.Unlock()
	if n > 0 {
		signal(w.ackNotify)
	}
}

// moveWantedLocked queues the acknowledgements the server asked for that
// the consumer has now applied.
func (w *Watcher) moveWantedLocked() {
	for svc, rev := range w.wanted {
		if w.applied[svc] >= rev {
			w.unacked[svc] = max(w.unacked[svc], w.applied[svc])
			delete(w.wanted, svc)
		}
	}
}

func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// acknowledge sends what the consumer applied to the server of stream id
// until ctx ends. A new stream starts with everything applied so far, as
// the server knows nothing of the watcher's past streams, unless the
// server asks for what it needs.
func (w *Watcher) acknowledge(ctx context.Context, rpc beaconv1connect.RegistryServiceClient, id uint64) {
	w.mu.Lock()
	clear(w.unacked)
	if !w.onRequest {
		maps.Copy(w.unacked, w.applied)
	}
	w.moveWantedLocked()
	w.mu.Unlock()
	signal(w.ackNotify)
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.ackNotify:
		}
		w.mu.Lock()
		revs := maps.Clone(w.unacked)
		clear(w.unacked)
		w.mu.Unlock()
		if len(revs) == 0 {
			continue
		}
		_, err := rpc.AckWatch(ctx, connect.NewRequest(&beaconv1.AckWatchRequest{WatchId: id, Revisions: revs}))
		if err == nil {
			continue
		}
		if ctx.Err() != nil || connect.CodeOf(err) == connect.CodeNotFound {
			return // the stream is over; the next one acknowledges everything again
		}
		w.c.log.Debug("beacon: acknowledging watch revisions", "err", err)
		w.mu.Lock()
		for svc, rev := range revs {
			w.unacked[svc] = max(w.unacked[svc], rev)
		}
		w.mu.Unlock()
		t := time.NewTimer(100 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		signal(w.ackNotify)
	}
}

// Snapshot returns the latest snapshot held for a service.
func (w *Watcher) Snapshot(service string) (*registry.Snapshot, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	s, ok := w.state[service]
	return s, ok
}

// State returns the latest snapshot of every service seen.
func (w *Watcher) State() map[string]*registry.Snapshot {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := make(map[string]*registry.Snapshot, len(w.state))
	for k, v := range w.state {
		out[k] = v
	}
	return out
}

// WatchStatus describes the stream.
type WatchStatus struct {
	Connected bool
	// Since is when Connected last changed (or the watch started).
	Since      time.Time
	Reconnects int
	// Stale counts snapshots the server sent that were not newer than what
	// the watcher held; they are dropped. A correct server sends none.
	Stale int
	// Deltas counts snapshots received as what changed since the previous
	// one (the rest came whole).
	Deltas  int
	LastErr error
	// Server is the address of the server the watcher uses (or tries).
	Server string
}

// Status reports whether the stream is up and how often it reconnected.
func (w *Watcher) Status() WatchStatus {
	w.mu.Lock()
	defer w.mu.Unlock()
	return WatchStatus{Connected: w.connected, Since: w.since, Reconnects: w.reconnects, Stale: w.stale, Deltas: w.deltas, LastErr: w.lastErr,
		Server: w.c.servers[w.server.Load()]}
}

// Close stops the watch and waits for its goroutine.
func (w *Watcher) Close() {
	w.stop()
	<-w.done
}

func (w *Watcher) run(ctx context.Context) {
	defer close(w.done)
	retry := backoff.New(backoff.Config{Base: 100 * time.Millisecond, Max: 3 * time.Second})
	for ctx.Err() == nil {
		received, err := w.stream(ctx)
		w.mu.Lock()
		to := w.moveTo
		w.moveTo = -1
		if to >= 0 {
			w.server.Store(to) // under mu: move sees it
		}
		if w.connected {
			w.connected, w.since = false, time.Now()
		}
		if ctx.Err() == nil {
			w.reconnects++
			if to < 0 {
				w.lastErr = err
			}
		}
		w.mu.Unlock()
		if ctx.Err() != nil {
			return
		}
		if to >= 0 { // asked to move (rebalancing): at once, resuming
			retry.Reset()
			continue
		}
		wait := retry.Next()
		if received {
			// The stream worked: its server died or restarted, likely
			// under every watcher it had. Spread their reconnects over
			// reconnectSpread, and over the other servers, so that they
			// do not arrive on one server in the same instant.
			retry.Reset()
			wait = rand.N(reconnectSpread)
		}
		w.c.log.Debug("beacon: watch stream ended, reconnecting", "err", err, "in", wait)
		// Move on to another server; with one server this retries it.
		// Only this watcher moves: the client's calls and other watchers
		// find out for themselves.
		w.server.Store(w.c.otherServer(w.server.Load()))
		if backoff.Sleep(ctx, wait) != nil {
			return
		}
	}
}

// reconnectSpread is the window over which watchers whose working stream
// broke reconnect: a uniformly random delay within it.
const reconnectSpread = time.Second

// move makes the watcher continue on server to: its stream ends and
// reconnects there at once, resuming from the revisions it holds.
func (w *Watcher) move(to int64) {
	// Under mu with stream's check of moveTo and its cancel function, so
	// that the move ends the stream it was asked against or the next one
	// never starts — never a stream already started on the new server.
	w.mu.Lock()
	if w.server.Load() == to {
		w.mu.Unlock()
		return
	}
	w.moveTo = to
	cancel := w.cancelStream
	w.mu.Unlock()
	if cancel != nil {
		cancel()
	}
}

// stream runs one watch stream until it fails; received reports whether it
// delivered anything (to reset the backoff).
func (w *Watcher) stream(ctx context.Context) (received bool, err error) {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	w.mu.Lock()
	if w.moveTo >= 0 { // a move asked before this stream began
		w.mu.Unlock()
		return false, context.Canceled
	}
	w.cancelStream = cancel
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		w.cancelStream = nil
		w.mu.Unlock()
	}()
	hb := w.c.watchHeartbeat
	req := &beaconv1.WatchRequest{
		Namespace: w.ns, Services: w.services, KnownRevisions: map[string]int64{}, Heartbeat: durationpb.New(hb),
		Acknowledge: true, AcknowledgeOnRequest: true, Deltas: true,
	}
	w.mu.Lock()
	for name, s := range w.state {
		req.KnownRevisions[name] = s.Revision
		if w.resync[name] {
			req.KnownRevisions[name] = 0 // whole, whatever its revision
		}
	}
	clear(w.resync)
	// What a past stream's server asked for is asked again by this one's
	// if it still waits.
	clear(w.wanted)
	w.mu.Unlock()
	// A server that sends nothing for three heartbeats is frozen or cut
	// off even if its connection looks open: the stream is given up.
	var silent atomic.Bool
	watchdog := time.AfterFunc(3*hb, func() { silent.Store(true); cancel() })
	defer watchdog.Stop()
	server := w.server.Load()
	rpc := w.c.rpcs[server]
	st, err := rpc.Watch(sctx, connect.NewRequest(req))
	if err != nil {
		return false, w.streamErr(err, silent.Load())
	}
	defer st.Close()
	var acking sync.WaitGroup
	defer acking.Wait() // after cancel, which the acknowledger follows
	defer cancel()
	for st.Receive() {
		watchdog.Reset(3 * hb)
		if !received {
			w.mu.Lock()
			w.onRequest = st.Msg().GetAcknowledgeOnRequest()
			w.mu.Unlock()
			if id := st.Msg().GetWatchId(); id != 0 {
				acking.Go(func() { w.acknowledge(sctx, rpc, id) })
			}
		}
		received = true
		if err := w.apply(st.Msg()); err != nil {
			return received, err
		}
	}
	if err := st.Err(); err != nil {
		return received, w.streamErr(err, silent.Load())
	}
	return received, errors.New("beacon: watch stream ended by the server")
}

func (w *Watcher) streamErr(err error, silent bool) error {
	if silent {
		return fmt.Errorf("beacon: watch stream: %s sent nothing for 3 heartbeats of %v: %w", w.c.servers[w.server.Load()], w.c.watchHeartbeat, ErrUnavailable)
	}
	return fromConnectError(err)
}

// apply takes in a message. A delta that does not apply to what is held
// (a server's fault) ends the stream: the next one asks for that service
// whole.
func (w *Watcher) apply(msg *beaconv1.WatchResponse) error {
	changed, acks := false, false
	var err error
	w.mu.Lock()
	if !w.connected {
		w.connected, w.since = true, time.Now()
	}
	for _, p := range msg.GetSnapshots() {
		old, held := w.state[p.GetService()]
		if held && p.GetRevision() <= old.Revision {
			w.stale++
			continue // never step back, whatever a server sends
		}
		var snap *registry.Snapshot
		if p.GetBaseRevision() != 0 {
			if snap, err = wire.ApplyDelta(old, p); err != nil {
				w.resync[p.GetService()] = true
				break
			}
			w.deltas++
		} else {
			snap = wire.SnapshotFromProto(p)
		}
		w.state[snap.Service] = snap
		w.pending[snap.Service] = snap
		changed = true
	}
	for svc, rev := range msg.GetAckWanted() {
		w.wanted[svc] = max(w.wanted[svc], rev)
	}
	if len(msg.GetAckWanted()) > 0 {
		w.moveWantedLocked()
		acks = len(w.unacked) > 0
	}
	firstSync := msg.GetSynced() && !w.synced
	if firstSync {
		w.synced = true
	}
	w.mu.Unlock()
	if firstSync {
		close(w.syncedCh)
	}
	if changed {
		signal(w.notify)
	}
	if acks {
		signal(w.ackNotify)
	}
	return err
}

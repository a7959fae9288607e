// Package members tracks the live beacon servers sharing one etcd, so that
// server-side work (health checks) is split among them: each server holds
// a key bound to its own lease, and every server follows the set of keys.
// Work is assigned by rendezvous hashing over the live set, so a server
// joining or leaving moves only its share.
package members

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cespare/xxhash/v2"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// DefaultTTL is how long a dead server's key outlives it: its share of the
// work moves to the others within about this long.
const DefaultTTL = 3 * time.Second

// Members is this server's membership and its view of the others.
type Members struct {
	cli    *clientv3.Client
	prefix string
	self   string
	ttl    time.Duration
	log    *slog.Logger
	stop   context.CancelFunc
	done   chan struct{}

	mu      sync.Mutex
	live    []string      // guarded by mu; sorted ids, self included once joined
	changed chan struct{} // guarded by mu; closed and replaced on every change
	lease   clientv3.LeaseID
}

// Join announces id under prefix and follows the membership until Close.
// ids must be unique among the servers (the server name, or its address).
func Join(cli *clientv3.Client, prefix, id string, ttl time.Duration, log *slog.Logger) *Members {
	if ttl <= 0 {
		ttl = DefaultTTL
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, stop := context.WithCancel(context.Background())
	m := &Members{cli: cli, prefix: prefix, self: id, ttl: ttl, log: log, stop: stop, done: make(chan struct{}), changed: make(chan struct{})}
	go m.run(ctx)
	return m
}

// Self returns this server's id.
func (m *Members) Self() string { return m.self }

// Live returns the live servers' ids, sorted.
func (m *Members) Live() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.live)
}

// Changed is closed at the next membership change.
func (m *Members) Changed() <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.changed
}

// Owner returns the live server that owns key (rendezvous hashing), ""
// when none is known.
func (m *Members) Owner(key string) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return owner(m.live, key)
}

// Owns reports whether this server owns key. Until this server sees itself
// among the live servers it owns nothing, so a server cut off from etcd
// stops its share once its key has expired elsewhere.
func (m *Members) Owns(key string) bool { return m.Owner(key) == m.self }

func owner(live []string, key string) string {
	var best string
	var bestScore uint64
	for _, id := range live {
		d := xxhash.New()
		d.WriteString(id)
		d.WriteString("\x00")
		d.WriteString(key)
		if s := d.Sum64(); best == "" || s > bestScore {
			best, bestScore = id, s
		}
	}
	return best
}

// Close leaves: the key is revoked so the others take over at once.
func (m *Members) Close() {
	m.stop()
	<-m.done
	m.mu.Lock()
	lease := m.lease
	m.mu.Unlock()
	if lease != 0 {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, _ = m.cli.Revoke(ctx, lease)
	}
}

func (m *Members) set(live []string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if slices.Equal(live, m.live) {
		return
	}
	m.live = live
	close(m.changed)
	m.changed = make(chan struct{})
}

// run keeps the announcement alive and follows the set, starting over
// (new lease, new listing) whenever either fails.
func (m *Members) run(ctx context.Context) {
	defer close(m.done)
	started := time.Now()
	for ctx.Err() == nil {
		err := m.session(ctx)
		if ctx.Err() != nil {
			return
		}
		if time.Since(started) < 2*m.ttl {
			// Right after a start this is the previous run of this server
			// (same id) withdrawing or expiring its announcement: expected.
			m.log.Info("members: announcing again after this server's previous run withdrew its announcement", "err", err)
		} else {
			m.log.Warn("members: membership lost, rejoining", "err", err)
		}
		m.set(nil) // own nothing while not known to be live
		// Jittered, so that servers cut off together do not rejoin in step.
		t := time.NewTimer(m.ttl/6 + rand.N(m.ttl/6+1))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

func (m *Members) session(ctx context.Context) error {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Each call is bounded by the TTL: a lease that takes longer to set up
	// is of no use, and a silent etcd must not hold the loop (and the last
	// published set) for ever.
	call := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(sctx, max(time.Second, m.ttl))
	}
	cctx, ccancel := call()
	grant, err := m.cli.Grant(cctx, int64(max(1, m.ttl/time.Second)))
	ccancel()
	if err != nil {
		return fmt.Errorf("granting the lease: %w", err)
	}
	m.mu.Lock()
	m.lease = grant.ID
	m.mu.Unlock()
	cctx, ccancel = call()
	_, err = m.cli.Put(cctx, m.prefix+m.self, m.self, clientv3.WithLease(grant.ID))
	ccancel()
	if err != nil {
		return fmt.Errorf("announcing: %w", err)
	}
	ka, err := m.cli.KeepAlive(sctx, grant.ID)
	if err != nil {
		return fmt.Errorf("keeping the lease alive: %w", err)
	}
	cctx, ccancel = call()
	resp, err := m.cli.Get(cctx, m.prefix, clientv3.WithPrefix())
	ccancel()
	if err != nil {
		return fmt.Errorf("listing servers: %w", err)
	}
	ids := map[string]bool{}
	for _, kv := range resp.Kvs {
		ids[strings.TrimPrefix(string(kv.Key), m.prefix)] = true
	}
	publish := func() {
		live := make([]string, 0, len(ids))
		for id := range ids {
			live = append(live, id)
		}
		slices.Sort(live)
		m.set(live)
	}
	publish()
	wch := m.cli.Watch(sctx, m.prefix, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
	for {
		select {
		case <-ctx.Done():
			return nil
		case _, ok := <-ka:
			if !ok {
				return fmt.Errorf("lease %x expired or keepalive stopped", grant.ID)
			}
		case wr, ok := <-wch:
			if !ok || wr.Err() != nil {
				return fmt.Errorf("watching servers: %v", wr.Err())
			}
			for _, ev := range wr.Events {
				id := strings.TrimPrefix(string(ev.Kv.Key), m.prefix)
				if ev.Type == clientv3.EventTypeDelete {
					delete(ids, id)
				} else {
					ids[id] = true
				}
			}
			if !ids[m.self] {
				return fmt.Errorf("this server's key %s vanished", m.self)
			}
			publish()
		}
	}
}

// Package consul runs the backend interface on Consul, through the local
// agent's HTTP API (github.com/hashicorp/consul/api), so services already
// on Consul can use the beacon SDK unchanged.
//
// How beacon's model maps onto Consul's (docs/sdk.md, "On Consul", has
// the table):
//   - An instance is an agent service registration: ID
//     NAMESPACE.SERVICE.INSTANCE_ID, name SERVICE, weight in
//     Weights.Passing, tags as tags, metadata as Meta (keys Consul would
//     refuse are escaped under beacon-m-), and beacon's own fields under
//     beacon-* Meta keys. Namespaces live in Meta (Consul's own namespaces
//     are an Enterprise feature); a registration without beacon's keys,
//     made by anything else that speaks Consul, is in the default namespace.
//   - Checks become Consul agent checks (HTTP, TCP, gRPC, TTL) run by the
//     agent; their Consul status is the instance's health.
//   - A session is a TTL check on each of its instances, kept passing by a
//     goroutine every TTL/3. A process that dies stops passing it: the
//     check turns critical at the TTL, beacon readers drop the instance at
//     once, and Consul reaps it after DeregisterCriticalServiceAfter (one
//     minute at least, Consul's minimum). A check the agent no longer knows
//     (agent restarted without its state) has its instance registered again.
//   - Watches are blocking queries on /v1/health/service/NAME per service
//     (and /v1/catalog/services when following all), with Consul's index
//     rules: block on the last X-Consul-Index, never on 0, take an index
//     that went backwards as a reset, read afresh after an error, and rate
//     limit. Snapshot revisions are the index, shifted after a reset so a
//     stream's revisions only grow.
//   - Register and Deregister go through the agent, then wait (bounded) for
//     the catalog to show the change, so a read after them sees it.
package consul

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"

	"beacon.dev/beacon/backend"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/session"
)

// Config configures a Consul backend.
type Config struct {
	// Client talks to the local agent (api.NewClient(api.DefaultConfig())
	// reads CONSUL_HTTP_ADDR and friends). Required; Close leaves it open.
	Client *api.Client
	// Namespace is the beacon namespace followed ("" = default).
	Namespace string
	// PassingOnly asks Consul for instances whose every check passes (its
	// ?passing filter), which leaves out WARNING instances too. Off, every
	// instance comes with its health and beacon's routability rule decides
	// (WARNING stays routable).
	PassingOnly bool
	// WaitTime bounds each blocking query: default 1 m, 1 s to 10 m
	// (Consul's default is 5 m). It also bounds how long a watch can miss
	// an agent restart that nothing else reveals: the HTTP client replays
	// the cut query on the new agent, which blocks on the old, higher index
	// until the wait ends and the lower index shows the reset.
	WaitTime time.Duration
	// SyncTimeout bounds how long Register and Deregister wait for the
	// catalog to show what the agent accepted: default 10 s, 1 s to 5 m.
	SyncTimeout time.Duration
	Logger      *slog.Logger
}

// Backend is a beacon namespace on a Consul agent.
type Backend struct {
	cfg    Config
	agent  *api.Agent
	health *api.Health
	cat    *api.Catalog
	log    *slog.Logger

	mu          sync.Mutex
	restarted   context.Context    // guarded by mu; cancelled when the agent is seen to have lost its state
	markRestart context.CancelFunc // guarded by mu
	leases      map[int64]*lease   // guarded by mu; open sessions' leases, which own instances
}

var _ backend.Backend = (*Backend)(nil)

// New returns a backend on cfg.Client. It makes no request: an agent that
// is down shows in the first call.
func New(cfg Config) (*Backend, error) {
	if cfg.Client == nil {
		return nil, fieldErr("client", "", "is required")
	}
	if cfg.Namespace == "" {
		cfg.Namespace = registry.DefaultNamespace
	}
	if err := registry.ValidateNamespace(cfg.Namespace); err != nil {
		return nil, err
	}
	if cfg.WaitTime == 0 {
		cfg.WaitTime = time.Minute
	}
	if cfg.WaitTime < time.Second || cfg.WaitTime > 10*time.Minute {
		return nil, fieldErr("wait_time", cfg.WaitTime.String(), "must be between 1s and 10m (Consul's maximum)")
	}
	if cfg.SyncTimeout == 0 {
		cfg.SyncTimeout = 10 * time.Second
	}
	if cfg.SyncTimeout < time.Second || cfg.SyncTimeout > 5*time.Minute {
		return nil, fieldErr("sync_timeout", cfg.SyncTimeout.String(), "must be between 1s and 5m")
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	b := &Backend{cfg: cfg, agent: cfg.Client.Agent(), health: cfg.Client.Health(), cat: cfg.Client.Catalog(), log: log,
		leases: map[int64]*lease{}}
	b.restarted, b.markRestart = context.WithCancel(context.Background())
	return b, nil
}

// agentRestarted is called when a session finds the agent has forgotten a
// check it held: the agent lost its state, and its index started again.
// Blocked queries would wait on the old, higher index until their wait
// ends (and the HTTP client replays them on the new agent without an
// error), so they are cut short to read afresh.
func (b *Backend) agentRestarted() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.markRestart()
	b.restarted, b.markRestart = context.WithCancel(context.Background())
}

func (b *Backend) restartSignal() context.Context {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.restarted
}

// Namespace implements discovery.Source.
func (b *Backend) Namespace() string { return b.cfg.Namespace }

// Close implements backend.Backend; the backend holds nothing open itself
// (watches and sessions are closed by their owners).
func (b *Backend) Close() error { return nil }

// prepare validates an instance for this namespace and maps it to a
// registration.
func (b *Backend) prepare(in registry.Instance, session int64, ttl time.Duration) (*registry.Instance, *api.AgentServiceRegistration, error) {
	if in.Namespace == "" {
		in.Namespace = b.cfg.Namespace
	}
	if in.Namespace != b.cfg.Namespace {
		return nil, nil, fieldErr("namespace", in.Namespace, "must be the backend's, %s", b.cfg.Namespace)
	}
	in = in.Clone()
	in.SessionID, in.Revision, in.Suspect = session, 0, false
	in.ApplyDefaults()
	if err := in.Validate(); err != nil {
		return nil, nil, fmt.Errorf("beacon/consul: %w", err)
	}
	reg, err := registration(&in, ttl)
	if err != nil {
		return nil, nil, fmt.Errorf("beacon/consul: %w", err)
	}
	return &in, reg, nil
}

// Register implements backend.Backend. A persistent registration takes
// the instance from any session of this backend that held it.
func (b *Backend) Register(ctx context.Context, in registry.Instance) (int64, error) {
	p, reg, err := b.prepare(in, 0, 0)
	if err != nil {
		return 0, err
	}
	b.disown(p.Key(), 0)
	return b.register(ctx, reg)
}

// disown makes every open lease but keep (0: all) let an instance go: it
// was registered again or deregistered on purpose, and a lease that still
// held it would take its vanished check for an agent that lost its state.
// Each session forgets it at its next keepalive.
func (b *Backend) disown(key registry.InstanceKey, keep int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for id, ls := range b.leases {
		if _, ok := ls.regs[key]; ok && id != keep {
			delete(ls.regs, key)
			ls.released = append(ls.released, key)
		}
	}
}

// register hands a registration to the agent and waits for the catalog to
// show it; the revision is the catalog's index then.
func (b *Backend) register(ctx context.Context, reg *api.AgentServiceRegistration) (int64, error) {
	if err := retryOnce(ctx, func() error {
		return b.agent.ServiceRegisterOpts(reg, api.ServiceRegisterOpts{ReplaceExistingChecks: true}.WithContext(ctx))
	}); err != nil {
		return 0, fmt.Errorf("beacon/consul: registering %s: %w", reg.ID, err)
	}
	return b.awaitCatalog(ctx, reg.Name, reg.ID, func(e *api.ServiceEntry) bool { return e != nil && sameRegistration(e.Service, reg) })
}

func sameRegistration(s *api.AgentService, reg *api.AgentServiceRegistration) bool {
	return s.Address == reg.Address && s.Port == reg.Port && slices.Equal(s.Tags, reg.Tags) &&
		maps.Equal(s.Meta, reg.Meta) && s.Weights.Passing == reg.Weights.Passing
}

// awaitCatalog follows a service with blocking queries until done accepts
// the entry of service ID id (nil when absent), within SyncTimeout.
func (b *Backend) awaitCatalog(ctx context.Context, service, id string, done func(*api.ServiceEntry) bool) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, b.cfg.SyncTimeout)
	defer cancel()
	var index uint64
	for {
		entries, meta, err := b.health.Service(service, "", false, (&api.QueryOptions{WaitIndex: index, WaitTime: b.cfg.SyncTimeout}).WithContext(ctx))
		if err != nil {
			if ctx.Err() == context.DeadlineExceeded {
				return 0, fmt.Errorf("beacon/consul: the agent took %s but the catalog did not show it within %v: %w", id, b.cfg.SyncTimeout, err)
			}
			return 0, fmt.Errorf("beacon/consul: reading %s back: %w", service, err)
		}
		var found *api.ServiceEntry
		for _, e := range entries {
			if e.Service != nil && e.Service.ID == id {
				found = e
			}
		}
		if done(found) {
			return int64(meta.LastIndex), nil
		}
		index = nextIndex(meta.LastIndex)
	}
}

// nextIndex is the index to block on after an answer with index got, by
// Consul's rules: never 0 (a 0 returns at once: a busy loop). An index
// that went backwards is taken as it is: the answer is a full read, and
// blocking on the old, higher index could wait for ever.
func nextIndex(got uint64) uint64 { return max(got, 1) }

// retryOnce runs an agent write again when it failed for want of an
// answer (not with one): a pooled connection the agent had closed — after
// a restart, say — fails a PUT that the HTTP client will not replay
// itself. The writes are idempotent (register replaces, update sets).
func retryOnce(ctx context.Context, write func() error) error {
	err := write()
	var se api.StatusError
	if err == nil || errors.As(err, &se) || ctx.Err() != nil {
		return err
	}
	return write()
}

// notFound reports the agent's answer for an unknown service or check: a
// 404 on recent agents, a 500 naming it on older ones.
func notFound(err error) bool {
	var se api.StatusError
	if !errors.As(err, &se) {
		return false
	}
	return se.Code == http.StatusNotFound || strings.Contains(se.Body, "Unknown service") ||
		strings.Contains(se.Body, "does not have associated TTL") || strings.Contains(se.Body, "Unknown check")
}

// Deregister implements backend.Backend. Consul deregisters only through
// the agent holding the registration: an instance another agent holds is
// reported not found.
func (b *Backend) Deregister(ctx context.Context, service, id string) (bool, error) {
	if err := registry.ValidateName("service", service); err != nil {
		return false, err
	}
	if err := registry.ValidateID("id", id); err != nil {
		return false, err
	}
	key := registry.InstanceKey{Namespace: b.cfg.Namespace, Service: service, ID: id}
	b.disown(key, 0)
	sid := serviceID(key)
	if err := retryOnce(ctx, func() error { return b.agent.ServiceDeregisterOpts(sid, (&api.QueryOptions{}).WithContext(ctx)) }); err != nil {
		if notFound(err) {
			return false, nil
		}
		return false, fmt.Errorf("beacon/consul: deregistering %s: %w", sid, err)
	}
	_, err := b.awaitCatalog(ctx, service, sid, func(e *api.ServiceEntry) bool { return e == nil })
	return true, err
}

// Instances implements backend.Backend: every instance of the namespace
// in the catalog, with its health (never the passing-only filter). The
// revision is the catalog's index for the service.
func (b *Backend) Instances(ctx context.Context, service string) (*registry.Snapshot, error) {
	if err := registry.ValidateName("service", service); err != nil {
		return nil, err
	}
	entries, meta, err := b.health.Service(service, "", false, (&api.QueryOptions{}).WithContext(ctx))
	if err != nil {
		return nil, fmt.Errorf("beacon/consul: listing %s: %w", service, err)
	}
	return b.snapshot(service, entries, int64(meta.LastIndex)), nil
}

func (b *Backend) snapshot(service string, entries []*api.ServiceEntry, revision int64) *registry.Snapshot {
	snap := &registry.Snapshot{Namespace: b.cfg.Namespace, Service: service, Revision: revision}
	for _, e := range entries {
		if in, ok := instance(e, b.cfg.Namespace); ok {
			snap.Instances = append(snap.Instances, in)
		}
	}
	slices.SortFunc(snap.Instances, func(x, y *registry.Instance) int { return strings.Compare(x.ID, y.ID) })
	return snap
}

// lease is a session's lease on Consul, which has no object for it: the
// TTL check of each instance put under it, kept passing.
type lease struct {
	ttl      time.Duration
	regs     map[registry.InstanceKey]*api.AgentServiceRegistration // guarded by Backend.mu
	released []registry.InstanceKey                                 // guarded by Backend.mu; taken by others since the last keepalive
}

// NewSession implements backend.Backend (the state machine is package
// session's).
func (b *Backend) NewSession(ctx context.Context, opts ...session.Option) (*session.Session, error) {
	opts = append([]session.Option{session.WithNamespace(b.cfg.Namespace), session.WithLogger(b.log)}, opts...)
	return session.New(ctx, consulLease{b}, opts...)
}

type consulLease struct{ b *Backend }

var errLeaseGone = fmt.Errorf("beacon/consul: session ended: %w", session.ErrLost)

func (l consulLease) Grant(ctx context.Context, ttl time.Duration, _ string) (int64, time.Duration, error) {
	if err := registry.ValidateSessionTTL(ttl); err != nil {
		return 0, 0, err
	}
	l.b.mu.Lock()
	defer l.b.mu.Unlock()
	id := rand.Int64N(1<<62) + 1
	l.b.leases[id] = &lease{ttl: ttl, regs: map[registry.InstanceKey]*api.AgentServiceRegistration{}}
	return id, ttl, nil
}

// KeepAlive passes the session check of every instance of the lease. A
// check the agent no longer knows means either that someone else
// registered the instance again without it (it is let go) or, if the
// instance is gone too, that the agent lost its state: the lease is lost,
// and the session puts every instance again.
func (l consulLease) KeepAlive(ctx context.Context, id int64) error {
	b := l.b
	b.mu.Lock()
	ls, ok := b.leases[id]
	var regs []*api.AgentServiceRegistration
	var released []registry.InstanceKey
	if ok {
		regs = slices.Collect(maps.Values(ls.regs))
		released, ls.released = ls.released, nil
	}
	b.mu.Unlock()
	if !ok {
		return errLeaseGone
	}
	for _, reg := range regs {
		err := retryOnce(ctx, func() error {
			return b.agent.UpdateTTLOpts(sessionCheckPrefix+reg.ID, "kept alive by its owner", api.HealthPassing, (&api.QueryOptions{}).WithContext(ctx))
		})
		if err == nil {
			continue
		}
		if !notFound(err) {
			return fmt.Errorf("beacon/consul: renewing %s: %w", reg.ID, err)
		}
		if _, _, err := b.agent.Service(reg.ID, (&api.QueryOptions{}).WithContext(ctx)); err == nil {
			b.log.Info("beacon/consul: a session instance was registered again by someone else; the session lets it go", "instance", reg.ID)
			released = append(released, keyOf(reg))
			b.mu.Lock()
			delete(ls.regs, keyOf(reg))
			b.mu.Unlock()
			continue
		} else if !notFound(err) {
			return fmt.Errorf("beacon/consul: looking up %s: %w", reg.ID, err)
		}
		b.log.Info("beacon/consul: the agent lost a session instance; the session registers its instances again", "instance", reg.ID)
		b.agentRestarted()
		b.mu.Lock()
		delete(b.leases, id)
		b.mu.Unlock()
		return errLeaseGone
	}
	if len(released) > 0 {
		return &session.ReleasedError{Keys: released}
	}
	return nil
}

func (l consulLease) Put(ctx context.Context, id int64, in registry.Instance) (int64, error) {
	b := l.b
	b.mu.Lock()
	ls, ok := b.leases[id]
	b.mu.Unlock()
	if !ok {
		return 0, errLeaseGone
	}
	p, reg, err := b.prepare(in, id, ls.ttl)
	if err != nil {
		return 0, err
	}
	b.disown(p.Key(), id)
	b.mu.Lock()
	ls.regs[p.Key()] = reg
	b.mu.Unlock()
	return b.register(ctx, reg)
}

// Delete deregisters the instance if the lease still holds it (Consul
// cannot compare owners itself).
func (l consulLease) Delete(ctx context.Context, id int64, k registry.InstanceKey) (bool, error) {
	b := l.b
	b.mu.Lock()
	ls, ok := b.leases[id]
	held := ok && ls.regs[k] != nil
	b.mu.Unlock()
	if !held {
		return false, nil
	}
	return b.Deregister(ctx, k.Service, k.ID)
}

// Revoke deregisters the lease's instances.
func (l consulLease) Revoke(ctx context.Context, id int64) error {
	b := l.b
	b.mu.Lock()
	ls, ok := b.leases[id]
	delete(b.leases, id)
	b.mu.Unlock()
	if !ok {
		return nil
	}
	var errs []error
	for k := range ls.regs {
		if _, err := b.Deregister(ctx, k.Service, k.ID); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func keyOf(reg *api.AgentServiceRegistration) registry.InstanceKey {
	return registry.InstanceKey{Namespace: reg.Meta[metaNamespace], Service: reg.Name, ID: reg.Meta[metaID]}
}

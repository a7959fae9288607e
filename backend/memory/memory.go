// Package memory is a registry in this process's memory, for tests and
// single-process use. It keeps the semantics of the others: validation,
// revisions that only grow, sessions whose instances vanish when closed or
// TTL after their owner stops, and watches of full snapshots.
package memory

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"beacon.dev/beacon/backend"
	"beacon.dev/beacon/backend/internal/snapqueue"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/discovery"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/session"
)

// Registry is an in-memory backend. Create it with New; Close stops its
// expiry sweeps.
type Registry struct {
	ns   string
	stop context.CancelFunc
	done chan struct{}

	mu        sync.Mutex
	rev       int64                                       // guarded by mu
	instances map[registry.InstanceKey]*registry.Instance // guarded by mu
	svcRev    map[string]int64                            // guarded by mu; revision of each service's last change
	sessions  map[int64]*lease                            // guarded by mu
	nextID    int64                                       // guarded by mu
	watches   map[*stream]struct{}                        // guarded by mu
}

var _ backend.Backend = (*Registry)(nil)

// New returns an empty registry for namespace ("" means default).
func New(namespace string) *Registry {
	if namespace == "" {
		namespace = registry.DefaultNamespace
	}
	ctx, stop := context.WithCancel(context.Background())
	r := &Registry{ns: namespace, stop: stop, done: make(chan struct{}),
		instances: map[registry.InstanceKey]*registry.Instance{}, svcRev: map[string]int64{},
		sessions: map[int64]*lease{}, watches: map[*stream]struct{}{}}
	go r.sweep(ctx) // owned: ends with Close
	return r
}

// Namespace implements discovery.Source.
func (r *Registry) Namespace() string { return r.ns }

// Close stops the registry's background work.
func (r *Registry) Close() error {
	r.stop()
	<-r.done
	return nil
}

func (r *Registry) prepare(in registry.Instance, sessionID int64) (*registry.Instance, error) {
	if in.Namespace == "" {
		in.Namespace = r.ns
	}
	if in.Namespace != r.ns {
		return nil, &registry.FieldError{Field: "namespace", Reason: "must be the registry's, " + r.ns, Value: in.Namespace}
	}
	in = in.Clone()
	in.SessionID, in.Revision, in.Suspect = sessionID, 0, false
	in.ApplyDefaults()
	if err := in.Validate(); err != nil {
		return nil, fmt.Errorf("memory: %w", err)
	}
	return &in, nil
}

// Register implements backend.Backend.
func (r *Registry) Register(ctx context.Context, in registry.Instance) (int64, error) {
	p, err := r.prepare(in, 0)
	if err != nil {
		return 0, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.putLocked(p), nil
}

func (r *Registry) putLocked(in *registry.Instance) int64 {
	r.rev++
	in.Revision = r.rev
	r.instances[in.Key()] = in
	r.changedLocked(in.Service)
	return r.rev
}

func (r *Registry) deleteLocked(k registry.InstanceKey) bool {
	if _, ok := r.instances[k]; !ok {
		return false
	}
	delete(r.instances, k)
	r.rev++
	r.changedLocked(k.Service)
	return true
}

// changedLocked stamps the service with the current revision and tells
// the watches.
func (r *Registry) changedLocked(service string) {
	r.svcRev[service] = r.rev
	snap := r.snapshotLocked(service)
	for s := range r.watches {
		s.offer(snap)
	}
}

func (r *Registry) snapshotLocked(service string) *registry.Snapshot {
	s := &registry.Snapshot{Namespace: r.ns, Service: service, Revision: r.svcRev[service]}
	for k, in := range r.instances {
		if k.Service == service {
			c := in.Clone()
			s.Instances = append(s.Instances, &c)
		}
	}
	slices.SortFunc(s.Instances, func(a, b *registry.Instance) int { return cmp.Compare(a.ID, b.ID) })
	return s
}

// Deregister implements backend.Backend.
func (r *Registry) Deregister(ctx context.Context, service, id string) (bool, error) {
	if err := registry.ValidateName("service", service); err != nil {
		return false, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.deleteLocked(registry.InstanceKey{Namespace: r.ns, Service: service, ID: id}), nil
}

// Instances implements backend.Backend.
func (r *Registry) Instances(ctx context.Context, service string) (*registry.Snapshot, error) {
	if err := registry.ValidateName("service", service); err != nil {
		return nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.snapshotLocked(service), nil
}

// lease is a session's lease: alive while heartbeats come, and for TTL
// after the last one.
type lease struct {
	ttl      time.Duration
	lastSeen time.Time // guarded by Registry.mu
}

// NewSession implements backend.Backend (the state machine is package
// session's).
func (r *Registry) NewSession(ctx context.Context, opts ...session.Option) (*session.Session, error) {
	opts = append([]session.Option{session.WithNamespace(r.ns)}, opts...)
	return session.New(ctx, memLease{r}, opts...)
}

type memLease struct{ r *Registry }

var errLeaseGone = fmt.Errorf("memory: lease expired: %w", session.ErrLost)

func (l memLease) Grant(ctx context.Context, ttl time.Duration, _ string) (int64, time.Duration, error) {
	if err := registry.ValidateSessionTTL(ttl); err != nil {
		return 0, 0, err
	}
	l.r.mu.Lock()
	defer l.r.mu.Unlock()
	l.r.nextID++
	l.r.sessions[l.r.nextID] = &lease{ttl: ttl, lastSeen: time.Now()}
	return l.r.nextID, ttl, nil
}

func (l memLease) KeepAlive(ctx context.Context, id int64) error {
	l.r.mu.Lock()
	defer l.r.mu.Unlock()
	ls, ok := l.r.sessions[id]
	if !ok {
		return errLeaseGone
	}
	ls.lastSeen = time.Now()
	return nil
}

func (l memLease) Put(ctx context.Context, id int64, in registry.Instance) (int64, error) {
	p, err := l.r.prepare(in, id)
	if err != nil {
		return 0, err
	}
	l.r.mu.Lock()
	defer l.r.mu.Unlock()
	if _, alive := l.r.sessions[id]; !alive {
		return 0, errLeaseGone
	}
	return l.r.putLocked(p), nil
}

// Delete removes the instance only if it is still bound to the lease.
func (l memLease) Delete(ctx context.Context, id int64, k registry.InstanceKey) (bool, error) {
	l.r.mu.Lock()
	defer l.r.mu.Unlock()
	if in, ok := l.r.instances[k]; !ok || in.SessionID != id {
		return false, nil
	}
	return l.r.deleteLocked(k), nil
}

func (l memLease) Revoke(ctx context.Context, id int64) error {
	l.r.mu.Lock()
	defer l.r.mu.Unlock()
	l.r.endLocked(id)
	return nil
}

// ExpireSession ends a session's lease as if its TTL had run out: its
// instances go, and the session (package session) finds out at its next
// keepalive. For tests of what an application does then.
func (r *Registry) ExpireSession(id int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.endLocked(id)
}

// endLocked removes a session and its instances.
func (r *Registry) endLocked(id int64) {
	delete(r.sessions, id)
	for k, in := range r.instances {
		if in.SessionID == id {
			r.deleteLocked(k)
		}
	}
}

// sweep expires sessions whose owner stopped more than TTL ago.
func (r *Registry) sweep(ctx context.Context) {
	defer close(r.done)
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			r.mu.Lock()
			for id, s := range r.sessions {
				if now.Sub(s.lastSeen) >= s.ttl {
					r.endLocked(id)
				}
			}
			r.mu.Unlock()
		}
	}
}

// stream is a watch: the newest snapshot per changed service, handed out
// by Next.
type stream struct {
	*snapqueue.Queue
	r        *Registry
	services map[string]bool // nil: all
	synced   chan struct{}
}

// Watch implements discovery.Source.
func (r *Registry) Watch(ctx context.Context, services []string) (discovery.Stream, error) {
	for i, s := range services {
		if err := registry.ValidateName(fmt.Sprintf("services[%d]", i), s); err != nil {
			return nil, err
		}
	}
	st := &stream{Queue: snapqueue.New(), r: r, synced: make(chan struct{})}
	if len(services) > 0 {
		st.services = map[string]bool{}
		for _, s := range services {
			st.services[s] = true
		}
	}
	r.mu.Lock()
	seen := map[string]bool{}
	for k := range r.instances {
		if !seen[k.Service] {
			seen[k.Service] = true
			st.offer(r.snapshotLocked(k.Service))
		}
	}
	r.watches[st] = struct{}{}
	r.mu.Unlock()
	close(st.synced)
	go func() { // owned: ends with ctx or Close
		select {
		case <-ctx.Done():
			st.Close()
		case <-st.Done():
		}
	}()
	return st, nil
}

func (s *stream) offer(snap *registry.Snapshot) {
	if s.services != nil && !s.services[snap.Service] {
		return
	}
	s.Offer(snap)
}

func (s *stream) Synced() <-chan struct{} { return s.synced }

func (s *stream) Status() client.WatchStatus {
	return client.WatchStatus{Connected: true}
}

func (s *stream) Close() {
	s.Queue.Close()
	s.r.mu.Lock()
	delete(s.r.watches, s)
	s.r.mu.Unlock()
}

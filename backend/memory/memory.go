// Package memory is a registry in this process's memory, for tests and
// single-process use. It keeps the semantics of the others: validation,
// revisions that only grow, sessions whose instances vanish when closed or
// TTL after their owner stops, and watches of full snapshots.
package memory

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"beacon.dev/beacon/backend"
	"beacon.dev/beacon/backend/internal/snapqueue"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/discovery"
	"beacon.dev/beacon/registry"
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
	sessions  map[int64]*session                          // guarded by mu
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
		sessions: map[int64]*session{}, watches: map[*stream]struct{}{}}
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

// session is alive while its owner keeps it (here: until Close) and for
// TTL after its owner went.
type session struct {
	r        *Registry
	id       int64
	ttl      time.Duration
	lastSeen time.Time // guarded by r.mu
	owned    bool      // guarded by r.mu; false once the owner stopped
	done     chan struct{}
	once     sync.Once
}

// NewSession implements backend.Backend.
func (r *Registry) NewSession(ctx context.Context, ttl time.Duration) (backend.Session, error) {
	if ttl == 0 {
		ttl = registry.DefaultSessionTTL
	}
	if err := registry.ValidateSessionTTL(ttl); err != nil {
		return nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.nextID++
	s := &session{r: r, id: r.nextID, ttl: ttl, lastSeen: time.Now(), owned: true, done: make(chan struct{})}
	r.sessions[s.id] = s
	return s, nil
}

var errSessionGone = errors.New("memory: session expired")

func (s *session) Register(ctx context.Context, in registry.Instance) (int64, error) {
	p, err := s.r.prepare(in, s.id)
	if err != nil {
		return 0, err
	}
	s.r.mu.Lock()
	defer s.r.mu.Unlock()
	if _, alive := s.r.sessions[s.id]; !alive {
		return 0, errSessionGone
	}
	return s.r.putLocked(p), nil
}

func (s *session) Deregister(ctx context.Context, service, id string) (bool, error) {
	return s.r.Deregister(ctx, service, id)
}

// Close ends the session. With ctx already done the registry is "not
// told": the owner is gone and the session expires after its TTL.
func (s *session) Close(ctx context.Context) error {
	s.once.Do(func() { close(s.done) })
	s.r.mu.Lock()
	defer s.r.mu.Unlock()
	if ctx.Err() != nil {
		if sess, ok := s.r.sessions[s.id]; ok {
			sess.owned, sess.lastSeen = false, time.Now()
		}
		return ctx.Err()
	}
	s.r.endLocked(s.id)
	return nil
}

func (s *session) Done() <-chan struct{} { return s.done }

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
				if !s.owned && now.Sub(s.lastSeen) >= s.ttl {
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

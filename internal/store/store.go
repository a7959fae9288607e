package store

import (
	"context"
	cryptorand "crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"beacon.dev/beacon/registry"
)

// ErrSessionNotFound means the session (lease) does not exist: it expired,
// was closed, or never existed. The owner should open a new session and
// register again.
var ErrSessionNotFound = errors.New("session not found or expired")

// requestTimeout bounds every etcd call the store makes. clientv3 waits
// for a connection when etcd is unreachable; without a deadline a call
// (and whoever waits on it, Close included) would wait for ever.
const requestTimeout = 10 * time.Second

// Store writes beacon's records to etcd.
type Store struct {
	Layout
	cli   *clientv3.Client
	ka    *keepAliver
	batch *batcher
	renew atomic.Pointer[Renewer] // set: renewals go to it, not over cli
}

// Renewer renews a lease where etcd runs, as etcd's own LeaseKeepAlive
// handler does (etcdserver.EtcdServer.LeaseRenew): the TTL, or an error —
// an error wrapping ErrLeaseNotFound when the lease is gone.
type Renewer func(ctx context.Context, id int64) (ttl int64, err error)

// ErrLeaseNotFound is what a Renewer's error wraps for a lease etcd does
// not hold.
var ErrLeaseNotFound = errors.New("lease not found")

// SetRenewer makes KeepAliveMany renew through r instead of a keepalive
// stream over the client: a server that embeds etcd skips the loopback
// gRPC exchange per heartbeat (a client's encode and send, etcd's receive
// and decode, the answer back), which was most of its session CPU. etcd
// stays the authority on expiry: r is etcd's own renewal.
func (s *Store) SetRenewer(r Renewer) { s.renew.Store(&r) }

// SetLocalKV makes registrations' group commits go through kv instead of
// the client: a server that embeds etcd passes etcd's in-process KV
// (v3client), which calls etcd's KV server directly, so a batch's
// transaction skips the loopback gRPC exchange (encode, send, etcd's
// receive and decode, the answer back) and its hand-offs to the
// connection's reader and writer goroutines on both sides. Watches stay
// on the client, where etcd's interceptors enforce WithRequireLeader.
func (s *Store) SetLocalKV(kv clientv3.KV) { s.batch.kv.Store(&kv) }

// New returns a Store on cli. Close releases its keepalive stream; it does
// not close cli.
func New(cli *clientv3.Client, prefix string) *Store {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	l := Layout{Prefix: prefix}
	return &Store{Layout: l, cli: cli, ka: newKeepAliver(cli), batch: newBatcher(cli, l)}
}

// Close stops the keepalive stream and the write batcher: registrations
// in flight fail at once rather than wait for etcd.
func (s *Store) Close() {
	s.ka.close()
	s.batch.close()
}

// SetHint gives registrations a cache of the records etcd holds (see
// Hint), sparing most of them a read before their write.
func (s *Store) SetHint(h Hint) { s.batch.hint.Store(&h) }

// Client returns the etcd client.
func (s *Store) Client() *clientv3.Client { return s.cli }

// CreateSession grants a lease of ttl and records the session under it.
func (s *Store) CreateSession(ctx context.Context, ttl time.Duration, name string) (int64, time.Duration, error) {
	if ttl == 0 {
		ttl = registry.DefaultSessionTTL
	}
	if err := registry.ValidateSessionTTL(ttl); err != nil {
		return 0, 0, err
	}
	if err := registry.ValidateSessionName(name); err != nil {
		return 0, 0, err
	}
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	lease, err := s.grantUnguessable(ctx, int64(ttl/time.Second))
	if err != nil {
		return 0, 0, fmt.Errorf("store: granting lease: %w", err)
	}
	rec, _ := json.Marshal(sessionRecord{Name: name, TTL: lease.TTL, Created: time.Now().UTC()})
	if _, err := s.cli.Put(ctx, s.SessionKey(int64(lease.ID)), string(rec), clientv3.WithLease(lease.ID)); err != nil {
		// The lease expires by itself; revoke to be tidy.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), requestTimeout)
		_, _ = s.cli.Revoke(rctx, lease.ID)
		cancel()
		return 0, 0, fmt.Errorf("store: recording session: %w", err)
	}
	return int64(lease.ID), time.Duration(lease.TTL) * time.Second, nil
}

// KeepAliveResult is the outcome of renewing one session.
type KeepAliveResult struct {
	TTL time.Duration
	Err error // ErrSessionNotFound if the session is gone
}

// KeepAliveMany renews several sessions at once.
func (s *Store) KeepAliveMany(ctx context.Context, ids []int64) []KeepAliveResult {
	if r := s.renew.Load(); r != nil {
		return renewEach(ctx, *r, ids)
	}
	leases := make([]clientv3.LeaseID, len(ids))
	for i, id := range ids {
		leases[i] = clientv3.LeaseID(id)
	}
	res := s.ka.keepAliveMany(ctx, leases)
	out := make([]KeepAliveResult, len(res))
	for i, r := range res {
		out[i] = KeepAliveResult{TTL: time.Duration(r.ttl) * time.Second, Err: r.err}
	}
	return out
}

// renewEach renews ids one by one through r, each within the request
// timeout.
func renewEach(ctx context.Context, r Renewer, ids []int64) []KeepAliveResult {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	out := make([]KeepAliveResult, len(ids))
	for i, id := range ids {
		ttl, err := r(ctx, id)
		switch {
		case errors.Is(err, ErrLeaseNotFound):
			out[i].Err = ErrSessionNotFound
		case err != nil:
			out[i].Err = fmt.Errorf("store: keepalive: %w", err)
		case ttl <= 0:
			out[i].Err = ErrSessionNotFound
		default:
			out[i].TTL = time.Duration(ttl) * time.Second
		}
	}
	return out
}

// CloseSession revokes a session; its ephemeral instances go with it.
// Closing a session that no longer exists is not an error.
func (s *Store) CloseSession(ctx context.Context, id int64) error {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	_, err := s.cli.Revoke(ctx, clientv3.LeaseID(id))
	if err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		return fmt.Errorf("store: revoking session: %w", err)
	}
	return nil
}

// Register writes a validated instance, keeping what the registry observed
// of the record it replaces (KeepObservations). With SessionID != 0 the
// instance is bound to that session's lease (ErrSessionNotFound if it is
// gone). It returns the revision of the write.
func (s *Store) Register(ctx context.Context, in *registry.Instance) (int64, error) {
	return s.RegisterMerge(ctx, in, KeepObservations)
}

// RegisterMerge is Register with another merge: the record etcd holds is
// read, merged into a copy of in by merge, and written only if it did not
// change in between (compare on its revision; after repeated changes
// ErrConflict). With merge nil nothing is read and the last write wins.
// Concurrent registrations are group-committed (see batch.go).
func (s *Store) RegisterMerge(ctx context.Context, in *registry.Instance, merge Merge) (int64, error) {
	return s.batch.put(ctx, s.InstanceKey(in.Key()), in, merge, nil)
}

// RegisterGuarded is RegisterMerge that first asks guard whether the
// record etcd holds may be replaced (see Guard).
func (s *Store) RegisterGuarded(ctx context.Context, in *registry.Instance, merge Merge, guard Guard) (int64, error) {
	if merge == nil {
		merge = func(*registry.Instance, *registry.Instance) {}
	}
	return s.batch.put(ctx, s.InstanceKey(in.Key()), in, merge, guard)
}

// Registration is one write of RegisterMany: as RegisterGuarded's
// arguments (Guard nil refuses nothing; Merge nil is KeepObservations).
type Registration struct {
	Instance *registry.Instance
	Merge    Merge
	Guard    Guard
}

// RegisterMany writes several registrations, each as RegisterGuarded
// would, sharing the group commit's transactions; revs[i] and errs[i] are
// regs[i]'s outcome. The keys must differ.
func (s *Store) RegisterMany(ctx context.Context, regs []Registration) (revs []int64, errs []error) {
	reqs := make([]*putReq, len(regs))
	for i, r := range regs {
		merge := r.Merge
		if merge == nil {
			merge = KeepObservations
		}
		reqs[i] = s.batch.newReq(s.InstanceKey(r.Instance.Key()), r.Instance, merge, r.Guard)
	}
	return s.batch.putMany(ctx, reqs)
}

// KeepObservations is the registry's rule for an instance registered
// again: the state of checks whose spec did not change, and an operator's
// OUT_OF_SERVICE, carry over from cur; health follows from the checks.
func KeepObservations(cur, in *registry.Instance) {
	if cur.Status == registry.StatusOutOfService && in.Status != registry.StatusOutOfService {
		in.Status = registry.StatusOutOfService
	}
	for n := range in.Checks {
		for _, old := range cur.Checks {
			if old.SameSpec(&in.Checks[n]) {
				in.Checks[n].Status, in.Checks[n].Output, in.Checks[n].Since = old.Status, old.Output, old.Since
			}
		}
	}
	in.Health = in.CheckedHealth()
}

// Deregister deletes an instance, whoever owns it; found reports whether
// it existed.
func (s *Store) Deregister(ctx context.Context, k registry.InstanceKey) (rev int64, found bool, err error) {
	return s.DeregisterSession(ctx, k, 0)
}

// DeregisterSession deletes an instance only if it is still bound to
// session (its key on that lease): an instance registered again since by
// someone else, persistently or on another session, is not theirs to
// delete, and found is false. Session 0 deletes unconditionally.
func (s *Store) DeregisterSession(ctx context.Context, k registry.InstanceKey, session int64) (rev int64, found bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	key := s.InstanceKey(k)
	if session == 0 {
		resp, err := s.cli.Delete(ctx, key)
		if err != nil {
			return 0, false, fmt.Errorf("store: deleting instance: %w", err)
		}
		return resp.Header.Revision, resp.Deleted > 0, nil
	}
	// An absent key compares as lease 0, which no session has.
	cond := []clientv3.Cmp{clientv3.Compare(clientv3.LeaseValue(key), "=", clientv3.LeaseID(session))}
	if session == PersistentOnly {
		cond = []clientv3.Cmp{clientv3.Compare(clientv3.LeaseValue(key), "=", 0), clientv3.Compare(clientv3.CreateRevision(key), ">", 0)}
	}
	txn, err := s.cli.Txn(ctx).If(cond...).Then(clientv3.OpDelete(key)).Commit()
	if err != nil {
		return 0, false, fmt.Errorf("store: deleting instance: %w", err)
	}
	return txn.Header.Revision, txn.Succeeded && txn.Responses[0].GetResponseDeleteRange().GetDeleted() > 0, nil
}

// PersistentOnly, as DeregisterSession's session, deletes the instance
// only if it is bound to no session: a caller that may delete persistent
// instances but not act for sessions.
const PersistentOnly int64 = -1

// CurrentRevision returns etcd's current revision with a linearizable read.
func (s *Store) CurrentRevision(ctx context.Context) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	resp, err := s.cli.Get(ctx, s.Prefix+"\x00revision-probe", clientv3.WithCountOnly())
	if err != nil {
		return 0, fmt.Errorf("store: reading revision: %w", err)
	}
	return resp.Header.Revision, nil
}

// ErrConflict: the instance changed between read and write too often.
var ErrConflict = errors.New("store: instance changed concurrently")

// ErrInstanceNotFound: no such instance.
var ErrInstanceNotFound = errors.New("instance not found")

// Update reads an instance, applies change and writes the result only if
// the instance did not change in between (compare-and-swap on its
// ModRevision), keeping its session's lease. change returns false to
// write nothing. It returns the write's revision (0 when nothing was
// written).
func (s *Store) Update(ctx context.Context, k registry.InstanceKey, change func(in *registry.Instance) bool) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	key := s.InstanceKey(k)
	for range maxConflicts {
		resp, err := s.cli.Get(ctx, key)
		if err != nil {
			return 0, fmt.Errorf("store: reading instance: %w", err)
		}
		if len(resp.Kvs) == 0 {
			return 0, ErrInstanceNotFound
		}
		kv := resp.Kvs[0]
		in, err := s.DecodeInstance(key, kv.Value, kv.ModRevision)
		if err != nil {
			return 0, err
		}
		if !change(in) {
			return 0, nil
		}
		in.Health = in.CheckedHealth()
		if err := in.Validate(); err != nil {
			return 0, err
		}
		put := clientv3.OpPut(key, string(EncodeInstance(in)), clientv3.WithLease(clientv3.LeaseID(in.SessionID)))
		txn, err := s.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", kv.ModRevision)).Then(put).Commit()
		if err != nil {
			return 0, fmt.Errorf("store: updating instance: %w", err)
		}
		if txn.Succeeded {
			return txn.Header.Revision, nil
		}
	}
	return 0, ErrConflict
}

// DeleteIfUnchanged deletes an instance only if it is still at revision.
func (s *Store) DeleteIfUnchanged(ctx context.Context, k registry.InstanceKey, revision int64) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	key := s.InstanceKey(k)
	txn, err := s.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", revision)).Then(clientv3.OpDelete(key)).Commit()
	if err != nil {
		return false, fmt.Errorf("store: deleting instance: %w", err)
	}
	return txn.Succeeded, nil
}

// PutServiceConfig stores a service's protection threshold.
func (s *Store) PutServiceConfig(ctx context.Context, sk registry.ServiceKey, threshold float64) (int64, error) {
	b, _ := json.Marshal(ServiceConfig{ProtectionThreshold: threshold})
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	resp, err := s.cli.Put(ctx, s.ServiceConfigKey(sk), string(b))
	if err != nil {
		return 0, fmt.Errorf("store: writing service settings: %w", err)
	}
	return resp.Header.Revision, nil
}

// DeleteServiceConfig forgets a service's settings.
func (s *Store) DeleteServiceConfig(ctx context.Context, sk registry.ServiceKey) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	resp, err := s.cli.Delete(ctx, s.ServiceConfigKey(sk))
	if err != nil {
		return 0, fmt.Errorf("store: deleting service settings: %w", err)
	}
	return resp.Header.Revision, nil
}

// ServiceSettings is what a service's settings records hold.
type ServiceSettings struct {
	// Threshold is the service's own protection threshold; nil: it has
	// none (the server's default applies).
	Threshold *float64
	Policy    registry.ServicePolicy
}

// GetServiceSettings reads a service's settings records, both at one
// revision, which it returns. A record that does not decode is an error.
func (s *Store) GetServiceSettings(ctx context.Context, sk registry.ServiceKey) (ServiceSettings, int64, error) {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	set, _, rev, bad, err := s.readSettings(ctx, sk)
	if err == nil {
		err = bad
	}
	return set, rev, err
}

// readSettings reads both records in one transaction, returning their
// ModRevisions (0: absent) and the revision read at. A record that does
// not decode is left out of set (the view ignores it too) and reported
// in bad.
func (s *Store) readSettings(ctx context.Context, sk registry.ServiceKey) (set ServiceSettings, mods [2]int64, rev int64, bad, err error) {
	keys := [2]string{s.ServiceConfigKey(sk), s.ServicePolicyKey(sk)}
	txn, err := s.cli.Txn(ctx).Then(clientv3.OpGet(keys[0]), clientv3.OpGet(keys[1])).Commit()
	if err != nil {
		return set, mods, 0, nil, fmt.Errorf("store: reading service settings: %w", err)
	}
	for i, r := range txn.Responses {
		kvs := r.GetResponseRange().GetKvs()
		if len(kvs) == 0 {
			continue
		}
		mods[i] = kvs[0].ModRevision
		if i == 0 {
			_, cfg, err := s.DecodeServiceConfig(keys[0], kvs[0].Value)
			if err != nil {
				bad = err
				continue
			}
			set.Threshold = &cfg.ProtectionThreshold
		} else if _, p, err := s.DecodeServicePolicy(keys[1], kvs[0].Value); err != nil {
			bad = err
		} else {
			set.Policy = p
		}
	}
	return set, mods, txn.Header.Revision, bad, nil
}

// UpdateServicePolicy reads a service's settings, applies change to its
// policy and writes the result only if the policy record did not change in
// between (compare-and-swap on its ModRevision, retried a few times); a
// zero policy deletes the record. A record that does not decode counts as
// absent (the defaults, as the view has it), and is replaced. The policy
// written must be valid. It returns the settings after the change and the
// write's revision (the read's when the policy stayed the same).
func (s *Store) UpdateServicePolicy(ctx context.Context, sk registry.ServiceKey, change func(*registry.ServicePolicy)) (ServiceSettings, int64, error) {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	key := s.ServicePolicyKey(sk)
	for range maxConflicts {
		set, mods, rev, _, err := s.readSettings(ctx, sk)
		if err != nil {
			return ServiceSettings{}, 0, err
		}
		old := set.Policy
		change(&set.Policy)
		if err := set.Policy.Validate(); err != nil {
			return ServiceSettings{}, 0, err
		}
		var op clientv3.Op
		switch {
		case set.Policy == old:
			return set, rev, nil
		case set.Policy == registry.ServicePolicy{}:
			op = clientv3.OpDelete(key)
		default:
			op = clientv3.OpPut(key, string(EncodeServicePolicy(set.Policy)))
		}
		txn, err := s.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", mods[1])).Then(op).Commit()
		if err != nil {
			return ServiceSettings{}, 0, fmt.Errorf("store: writing service policy: %w", err)
		}
		if txn.Succeeded {
			return set, txn.Header.Revision, nil
		}
	}
	return ServiceSettings{}, 0, ErrSettingsConflict
}

// ErrSettingsConflict: a service's policy changed between read and write
// too often.
var ErrSettingsConflict = errors.New("store: service settings changed concurrently")

// RenewTTL renews a TTL check's heartbeat: its lease is kept alive, or,
// when it has expired (or never existed), a new one of ttl is granted.
func (s *Store) RenewTTL(ctx context.Context, k registry.InstanceKey, check string, ttl time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	key := s.TTLKey(k, check)
	resp, err := s.cli.Get(ctx, key)
	if err != nil {
		return fmt.Errorf("store: reading a TTL heartbeat: %w", err)
	}
	if len(resp.Kvs) > 0 && resp.Kvs[0].Lease != 0 {
		if _, err := s.cli.KeepAliveOnce(ctx, clientv3.LeaseID(resp.Kvs[0].Lease)); err == nil {
			return nil
		} else if !errors.Is(err, rpctypes.ErrLeaseNotFound) {
			return fmt.Errorf("store: renewing a TTL heartbeat: %w", err)
		}
	}
	secs := max(2, int64((ttl+time.Second-1)/time.Second))
	lease, err := s.cli.Grant(ctx, secs)
	if err != nil {
		return fmt.Errorf("store: granting a TTL heartbeat: %w", err)
	}
	if _, err := s.cli.Put(ctx, key, "", clientv3.WithLease(lease.ID)); err != nil {
		return fmt.Errorf("store: writing a TTL heartbeat: %w", err)
	}
	return nil
}

// TTLAlive reports whether a TTL check's heartbeat is still there.
func (s *Store) TTLAlive(ctx context.Context, k registry.InstanceKey, check string) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	resp, err := s.cli.Get(ctx, s.TTLKey(k, check), clientv3.WithCountOnly(), clientv3.WithSerializable())
	if err != nil {
		return false, err
	}
	return resp.Count > 0, nil
}

// grantUnguessable grants a lease whose ID is random: etcd's own IDs are
// nearly sequential (two sessions granted in a row differ by a few), so a
// client could close or hijack others' sessions by counting. The ID is
// 62 random bits; one already taken (etcd answers "lease already exists")
// is drawn again.
func (s *Store) grantUnguessable(ctx context.Context, ttl int64) (*clientv3.LeaseGrantResponse, error) {
	lc := pb.NewLeaseClient(s.cli.ActiveConnection())
	for range 8 {
		var b [8]byte
		if _, err := cryptorand.Read(b[:]); err != nil {
			return nil, err
		}
		id := int64(binary.BigEndian.Uint64(b[:])>>2) + 1 // positive, never 0 (etcd's "choose for me")
		resp, err := lc.LeaseGrant(ctx, &pb.LeaseGrantRequest{TTL: ttl, ID: id})
		if err != nil {
			if errors.Is(rpctypes.Error(err), rpctypes.ErrLeaseExist) {
				continue
			}
			return nil, rpctypes.Error(err)
		}
		if resp.Error != "" {
			return nil, errors.New(resp.Error)
		}
		return &clientv3.LeaseGrantResponse{ResponseHeader: resp.Header, ID: clientv3.LeaseID(resp.ID), TTL: resp.TTL}, nil
	}
	return nil, errors.New("store: no free lease ID in 8 random draws")
}

// SessionInfo is a session's record, as ListSessions reads it.
type SessionInfo struct {
	ID      int64
	Name    string
	TTL     time.Duration
	Created time.Time
}

// ListSessions returns up to limit sessions with ids after after (as
// unsigned numbers, the keys' order), and whether more follow.
func (s *Store) ListSessions(ctx context.Context, after int64, limit int) ([]SessionInfo, bool, error) {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	from := s.SessionsPrefix()
	if after != 0 {
		from = s.SessionKey(after) + "\x00"
	}
	resp, err := s.cli.Get(ctx, from, clientv3.WithRange(clientv3.GetPrefixRangeEnd(s.SessionsPrefix())),
		clientv3.WithLimit(int64(limit)), clientv3.WithSerializable())
	if err != nil {
		return nil, false, fmt.Errorf("store: listing sessions: %w", err)
	}
	out := make([]SessionInfo, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		id, err := ParseSessionID(strings.TrimPrefix(string(kv.Key), s.SessionsPrefix()))
		if err != nil {
			continue // not a session record: nothing to list
		}
		var rec sessionRecord
		_ = json.Unmarshal(kv.Value, &rec) // a record that does not decode still names a live session
		out = append(out, SessionInfo{ID: id, Name: rec.Name, TTL: time.Duration(rec.TTL) * time.Second, Created: rec.Created})
	}
	return out, resp.More, nil
}

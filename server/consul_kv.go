package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/internal/store"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/internal/acl"
	"beacon.dev/beacon/server/internal/kv"
)

// Consul's KV over beacon's KV store. A Consul key is a beacon key of the
// namespace (the same value, history and watches); what Consul keeps
// beside a value lives in two more records, written in the value's
// transaction:
//
//	kvconsul/{ns}/{key}   flags, lock index, lock delay, and the holder
//	kvhold/{ns}/{key}     the holding session's id, on that session's lease
//
// A key's ModifyIndex is the newest mod revision of the three, so that an
// acquire or a release moves it as in Consul. Records older than the value
// itself (left by a delete through beacon's own API) are not the value's
// and are read as absent.
//
// When a holder's session ends, its hold record goes with the lease while
// the key's record still names the holder: a release to finish. Whoever
// sees one first finishes it under compares (consulFinishRelease) — the
// releaser, woken by the view's events and sweeping every key after a
// listing, or an acquire — which moves the index, starts the holder's lock
// delay, or deletes the key for a session of behavior "delete".

type consulKVPair struct {
	Key                                 string
	CreateIndex, ModifyIndex, LockIndex int64
	Flags                               uint64
	Value                               []byte
	Session                             string `json:",omitempty"`
	Namespace                           string `json:",omitempty"`
}

type consulKVMeta struct {
	Flags      uint64    `json:"flags,omitempty"`
	LockIndex  int64     `json:"lock_index,omitempty"`
	DelayUntil time.Time `json:"delay_until,omitzero"`
	// Holder is the session that acquired the key, with its lock delay
	// and behavior, until the release is done.
	Holder         string        `json:"holder,omitempty"`
	HolderDelay    time.Duration `json:"holder_delay,omitempty"`
	HolderBehavior string        `json:"holder_behavior,omitempty"`
}

// consulSession is what a Consul session keeps beside beacon's session.
type consulSession struct {
	Name      string        `json:"name,omitempty"`
	Behavior  string        `json:"behavior"`
	LockDelay time.Duration `json:"lock_delay"`
	TTL       time.Duration `json:"ttl"`
}

// Consul's session defaults, and bounds.
const (
	consulDefaultLockDelay = 15 * time.Second
	consulMaxLockDelay     = 60 * time.Second
	consulMaxKVList        = 10000 // keys of one recurse or keys query
	consulKVChangeLog      = 4096  // recent KV changes kept to tell blocked queries apart
	consulKVTimeout        = 10 * time.Second
)

// consulKVState is the server's part of Consul KV: the revision of the
// last KV change it saw (the index of prefix and missing-key queries), a
// broadcast and a log of recent changes that wake the blocked KV queries
// a change concerns, and the releases to finish.
type consulKVState struct {
	rev     atomic.Int64
	mu      sync.RWMutex
	changed chan struct{}
	log     []kvChange // oldest first
	// forgotten is the newest revision whose changes may be missing from
	// log: a waiter that read before it reads again on any wake.
	forgotten int64
	// pending: "ns/key" whose hold record went with its lease, with the
	// revision it went at (0: found by a sweep, not known).
	pending map[string]int64
	sweep   bool // look at every key for an unfinished release
	wake    chan struct{}
}

type kvChange struct {
	rev   int64
	nsKey string // "ns/key"
}

func newConsulKVState() *consulKVState {
	return &consulKVState{changed: make(chan struct{}), pending: map[string]int64{}, wake: make(chan struct{}, 1)}
}

func (c *consulKVState) raise(rev int64) {
	for cur := c.rev.Load(); rev > cur && !c.rev.CompareAndSwap(cur, rev); cur = c.rev.Load() {
	}
}

func (c *consulKVState) kick() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// listed follows the view's listing (at start, after a compaction): the
// index starts there, so it never goes back across a restart; every
// blocked query reads again, and the releaser sweeps every key.
func (c *consulKVState) listed(rev int64) {
	c.raise(rev)
	c.mu.Lock()
	c.forgotten, c.log, c.sweep = max(c.forgotten, rev), nil, true
	close(c.changed)
	c.changed = make(chan struct{})
	c.mu.Unlock()
	c.kick()
}

func (c *consulKVState) waitCh() <-chan struct{} {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.changed
}

// changedSince says whether a key (or a key under the prefix) of ns may
// have changed after revision rev. *scanned is the newest change a waiter
// has already looked at (start it at rev): each call looks only at newer
// ones, so a waiter's cost follows the changes, not the log's length.
func (c *consulKVState) changedSince(rev int64, ns, key string, prefix bool, scanned *int64) bool {
	want := ns + "/" + key
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.forgotten > rev {
		return true
	}
	from := max(rev, *scanned)
	for i := len(c.log) - 1; i >= 0 && c.log[i].rev > from; i-- {
		if k := c.log[i].nsKey; k == want || prefix && strings.HasPrefix(k, want) {
			return true
		}
	}
	if n := len(c.log); n > 0 {
		*scanned = max(*scanned, c.log[n-1].rev)
	}
	return false
}

// consulNotice is fed the view's events: KV changes are logged and wake
// blocked queries; a hold record deleted is a release the releaser
// finishes (when a write of the Consul API deleted it, it finished it
// already, and the releaser finds nothing to do).
func (s *Server) consulNotice(events []*clientv3.Event, _ int64) {
	c := s.consulKV
	l := s.store.Layout
	var changes []kvChange
	released := false
	newest := int64(0)
	for _, ev := range events {
		k := string(ev.Kv.Key)
		var nsKey string
		switch {
		case strings.HasPrefix(k, l.ConsulHoldPrefix()):
			nsKey = k[len(l.ConsulHoldPrefix()):]
			if ev.Type == clientv3.EventTypeDelete {
				released = true
				c.mu.Lock()
				c.pending[nsKey] = ev.Kv.ModRevision
				c.mu.Unlock()
			}
		case strings.HasPrefix(k, l.KVPrefix()):
			nsKey = k[len(l.KVPrefix()):]
		case strings.HasPrefix(k, l.ConsulKVPrefix()):
			nsKey = k[len(l.ConsulKVPrefix()):]
		default:
			continue
		}
		changes = append(changes, kvChange{rev: ev.Kv.ModRevision, nsKey: nsKey})
		newest = max(newest, ev.Kv.ModRevision)
	}
	if released {
		c.kick()
	}
	if len(changes) == 0 {
		return
	}
	// The newest change, not the response's revision: a response split by
	// etcd may be ahead of the events it has delivered so far.
	c.raise(newest)
	c.mu.Lock()
	c.log = append(c.log, changes...)
	if n := len(c.log) - consulKVChangeLog; n > 0 {
		c.forgotten = max(c.forgotten, c.log[n-1].rev)
		c.log = append(c.log[:0:0], c.log[n:]...)
	}
	close(c.changed)
	c.changed = make(chan struct{})
	c.mu.Unlock()
}

func (s *Server) consulDataKey(ns, key string) string { return s.store.KVPrefix() + ns + "/" + key }
func (s *Server) consulMetaKey(ns, key string) string {
	return s.store.ConsulKVPrefix() + ns + "/" + key
}
func (s *Server) consulHoldKey(ns, key string) string {
	return s.store.ConsulHoldPrefix() + ns + "/" + key
}
func (s *Server) consulSessionKey(id int64) string {
	return s.store.ConsulSessionPrefix() + store.FormatSessionID(id)
}

// consulKeyState is a key as read: the revisions of its three records
// (0: absent), for the compares of a write, and what they hold.
type consulKeyState struct {
	dataRev, dataCreate, metaRev, holdRev int64
	value                                 []byte
	meta                                  consulKVMeta // zero unless the record is the value's
	holder                                string       // the holding session, "" when free
	// delay is the lock delay in the key's record even when the record
	// is not the value's (a delay outlives a delete, as in Consul).
	delay time.Time
}

func (st consulKeyState) modifyIndex() int64 {
	if st.dataRev == 0 {
		return 0
	}
	return max(st.dataRev, st.metaRev, st.holdRev)
}

// releasePending: the key names a holder whose hold record is gone.
func (st consulKeyState) releasePending() bool {
	return st.dataRev != 0 && st.meta.Holder != "" && st.holder == ""
}

// metaToWrite is the key's record as a write starts from: its own, with
// a running lock delay carried over.
func (st consulKeyState) metaToWrite() consulKVMeta {
	m := st.meta
	if st.delay.After(m.DelayUntil) {
		m.DelayUntil = st.delay
	}
	return m
}

func (st consulKeyState) pair(ns, key string) consulKVPair {
	p := consulKVPair{Key: key, CreateIndex: st.dataCreate, ModifyIndex: st.modifyIndex(), Value: st.value,
		Flags: st.meta.Flags, LockIndex: st.meta.LockIndex, Session: st.holder}
	if ns != registry.DefaultNamespace {
		p.Namespace = ns
	}
	return p
}

// consulKVStates reads keys, or (prefix, one key) every key under a
// prefix, with what Consul keeps beside each, in one etcd transaction:
// the keys found in order, the states (every key asked for has one when
// not a prefix), and the read's revision. Serializable unless consistent;
// at rev when rev > 0.
func (s *Server) consulKVStates(ctx context.Context, ns string, keys []string, prefix, values, consistent bool, rev int64) ([]string, map[string]consulKeyState, int64, error) {
	ctx, cancel := context.WithTimeout(ctx, consulKVTimeout)
	defer cancel()
	var opts []clientv3.OpOption
	if !consistent {
		opts = append(opts, clientv3.WithSerializable())
	}
	if rev > 0 {
		opts = append(opts, clientv3.WithRev(rev))
	}
	if prefix {
		opts = append(opts, clientv3.WithPrefix())
	}
	dataOpts := append([]clientv3.OpOption{clientv3.WithLimit(consulMaxKVList + 1)}, opts...)
	if !values {
		dataOpts = append(dataOpts, clientv3.WithKeysOnly())
	}
	var reads []clientv3.Op
	for _, key := range keys {
		reads = append(reads, clientv3.OpGet(s.consulDataKey(ns, key), dataOpts...),
			clientv3.OpGet(s.consulMetaKey(ns, key), opts...), clientv3.OpGet(s.consulHoldKey(ns, key), opts...))
	}
	resp, err := s.cli.Txn(ctx).Then(reads...).Commit()
	if err != nil {
		return nil, nil, 0, err
	}
	var data, metaKVs, holdKVs []*mvccpb.KeyValue
	for i := range keys {
		data = append(data, resp.Responses[3*i].GetResponseRange().Kvs...)
		metaKVs = append(metaKVs, resp.Responses[3*i+1].GetResponseRange().Kvs...)
		holdKVs = append(holdKVs, resp.Responses[3*i+2].GetResponseRange().Kvs...)
	}
	if len(data) > consulMaxKVList {
		return nil, nil, 0, connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("more than %d keys under %q: list a longer prefix", consulMaxKVList, keys[0]))
	}
	byKey := func(kvs []*mvccpb.KeyValue, base string) map[string]*mvccpb.KeyValue {
		m := make(map[string]*mvccpb.KeyValue, len(kvs))
		for _, kv := range kvs {
			m[strings.TrimPrefix(string(kv.Key), base)] = kv
		}
		return m
	}
	metas := byKey(metaKVs, s.consulMetaKey(ns, ""))
	holds := byKey(holdKVs, s.consulHoldKey(ns, ""))
	states := make(map[string]consulKeyState, max(len(data), len(keys)))
	found := make([]string, 0, len(data))
	for _, d := range data {
		k := strings.TrimPrefix(string(d.Key), s.consulDataKey(ns, ""))
		found = append(found, k)
		states[k] = consulKeyState{dataRev: d.ModRevision, dataCreate: d.CreateRevision, value: d.Value}
	}
	// The records beside a key that is absent still count in the
	// compares of a write.
	if !prefix {
		for _, k := range keys {
			if _, ok := states[k]; !ok {
				states[k] = consulKeyState{}
			}
		}
	}
	for k, st := range states {
		if m := metas[k]; m != nil {
			st.metaRev = m.ModRevision
			var meta consulKVMeta
			_ = json.Unmarshal(m.Value, &meta)
			st.delay = meta.DelayUntil
			if st.dataRev != 0 && m.ModRevision >= st.dataCreate {
				st.meta = meta
			}
		}
		if h := holds[k]; h != nil {
			st.holdRev = h.ModRevision
			if st.dataRev != 0 && h.ModRevision >= st.dataCreate {
				st.holder = string(h.Value)
			}
		}
		states[k] = st
	}
	return found, states, resp.Header.Revision, nil
}

func (s *Server) consulKVGet(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	key := r.PathValue("key")
	_, recurse := q.values["recurse"]
	_, keysOnly := q.values["keys"]
	_, raw := q.values["raw"]
	prefix := recurse || keysOnly
	if q.filter != "" {
		consulError(w, refused("filter", "not served on /v1/kv"))
		return
	}
	var err error
	if prefix {
		err = registry.ValidateKeyPrefix("key", key)
	} else {
		err = registry.ValidateKey("key", key)
	}
	if err != nil {
		consulError(w, toConnectError(err))
		return
	}
	ctx := r.Context()
	if !prefix {
		if err := needKey(ctx, q.ns, key, acl.Read); err != nil {
			consulError(w, err)
			return
		}
	}
	// read answers the query with its index, and the revision after which
	// a change may concern it. A single key's index is its ModifyIndex, as
	// read; otherwise (a prefix, a missing key: a deletion leaves no
	// revision of its own) the newest KV change this server saw, taken
	// before the read, so that it is never ahead of what the read shows.
	read := func(consistent bool) ([]consulKVPair, int64, int64, error) {
		base := s.consulKV.rev.Load()
		keys, states, readRev, err := s.consulKVStates(ctx, q.ns, []string{key}, prefix, !keysOnly, consistent, 0)
		if err != nil {
			return nil, 0, 0, err
		}
		pairs := make([]consulKVPair, 0, len(keys))
		for _, k := range keys {
			if identityOf(ctx).Authz.Key(q.ns, k) >= acl.Read {
				pairs = append(pairs, states[k].pair(q.ns, k))
			} else {
				consulFiltered(w)
			}
		}
		if !prefix && len(pairs) == 1 {
			return pairs, pairs[0].ModifyIndex, readRev, nil
		}
		return pairs, base, base, nil
	}
	consistent := q.consistent
	ok := s.consulBlock(w, r, q, func(ctx context.Context) error {
		for {
			changed := s.consulKV.waitCh()
			_, index, since, err := read(consistent)
			if err != nil || uint64(max(index, 1)) > q.index {
				return err
			}
			// Read again only when a change may concern this query, and
			// then from the cluster (a lagging member would look changed
			// for as long as it lags).
			consistent = true
			scanned := since
			for !s.consulKV.changedSince(since, q.ns, key, prefix, &scanned) {
				select {
				case <-changed:
					changed = s.consulKV.waitCh()
				case <-ctx.Done():
					return nil
				}
			}
		}
	})
	if !ok {
		return
	}
	pairs, index, _, err := read(consistent)
	if err != nil {
		consulError(w, toConnectError(err))
		return
	}
	index = max(index, 1)
	notFound := func() {
		w.Header().Set("X-Consul-Index", strconv.FormatInt(max(index, 1), 10))
		w.WriteHeader(http.StatusNotFound)
	}
	switch {
	case keysOnly:
		keys := []string{}
		sep := q.values.Get("separator")
		for _, p := range pairs {
			k := p.Key
			if sep != "" {
				if i := strings.Index(k[len(key):], sep); i >= 0 {
					k = k[:len(key)+i+len(sep)]
				}
			}
			if len(keys) == 0 || keys[len(keys)-1] != k {
				keys = append(keys, k)
			}
		}
		if len(keys) == 0 {
			notFound()
			return
		}
		consulJSON(w, index, keys)
	case len(pairs) == 0:
		notFound()
	case raw && !prefix:
		w.Header().Set("X-Consul-Index", strconv.FormatInt(max(index, 1), 10))
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Write(pairs[0].Value)
	default:
		consulJSON(w, index, pairs)
	}
}

// consulKVPut is PUT /v1/kv/KEY: the body is the value; flags, cas,
// acquire and release as Consul has them. It answers true or false.
func (s *Server) consulKVPut(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	key := r.PathValue("key")
	ctx := r.Context()
	err := registry.ValidateKey("key", key)
	if err == nil {
		err = needKey(ctx, q.ns, key, acl.Write)
	}
	if err != nil {
		consulError(w, toConnectError(err))
		return
	}
	var flags uint64
	var cas int64 = -1
	var session int64
	var acquire, release bool
	v := q.values
	if t := v.Get("flags"); t != "" {
		if flags, err = strconv.ParseUint(t, 10, 64); err != nil {
			consulError(w, refused("flags", "must be an unsigned integer"))
			return
		}
	}
	if v.Has("cas") {
		if cas, err = strconv.ParseInt(v.Get("cas"), 10, 64); err != nil || cas < 0 {
			consulError(w, refused("cas", "must be a ModifyIndex (0: the key must not exist)"))
			return
		}
	}
	for _, p := range []string{"acquire", "release"} {
		if !v.Has(p) {
			continue
		}
		if acquire || release {
			consulError(w, refused(p, "acquire and release exclude each other"))
			return
		}
		if session, err = store.ParseSessionID(v.Get(p)); err != nil || session == 0 {
			consulError(w, refused(p, fmt.Sprintf("%q is not a session id", v.Get(p))))
			return
		}
		acquire, release = p == "acquire", p == "release"
		if err := api.needKeepAlive(api{s}, ctx, session); err != nil {
			consulError(w, err)
			return
		}
	}
	maxValue := s.cfg.Limits.MaxKVValueBytes
	r.Body = http.MaxBytesReader(w, r.Body, int64(maxValue))
	value, err := io.ReadAll(r.Body)
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			consulError(w, s.limitError("max-kv-value-bytes", "value larger than %d bytes", maxValue))
		} else {
			consulError(w, refused("body", err.Error()))
		}
		return
	}
	if err := (kvAPI{s}).admitKeys(q.ns, []string{key}); err != nil {
		consulError(w, err)
		return
	}
	msg := &beaconv1.KVPutRequest{Namespace: q.ns, Key: key}
	if err := s.spendWrites(ctx, connOf(ctx), 1, time.Now()); err != nil {
		s.audit.record(ctx, beaconv1connect.KVServicePutProcedure, msg, nil, err)
		consulError(w, err)
		return
	}
	done, err := s.consulKVWrite(ctx, q.ns, key, value, flags, cas, session, acquire, release)
	s.audit.record(ctx, beaconv1connect.KVServicePutProcedure, msg, &beaconv1.KVPutResponse{}, err)
	if err != nil {
		consulError(w, kvError(err))
		return
	}
	consulJSON(w, -1, done)
}

// consulKVWrite writes a value with its flags. cas ≥ 0 compares the
// key's ModifyIndex; acquire and release act for session. false: a
// compare, the lock or its delay refused the write.
func (s *Server) consulKVWrite(ctx context.Context, ns, key string, value []byte, flags uint64, cas, session int64, acquire, release bool) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, consulKVTimeout)
	defer cancel()
	metaKey, holdKey := s.consulMetaKey(ns, key), s.consulHoldKey(ns, key)
	me := store.FormatSessionID(session)
	for range 8 {
		_, states, _, err := s.consulKVStates(ctx, ns, []string{key}, false, false, true, 0)
		if err != nil {
			return false, err
		}
		st := states[key]
		if st.releasePending() {
			if _, err := s.consulFinishRelease(ctx, ns, key, st); err != nil {
				return false, err
			}
			continue // decide on the finished release
		}
		if cas >= 0 && cas != st.modifyIndex() {
			return false, nil
		}
		meta := st.metaToWrite()
		var more []clientv3.Op
		switch {
		case acquire && st.holder != "" && st.holder != me:
			return false, nil // held by another session
		case acquire && st.holder == "" && time.Now().Before(st.delay):
			return false, nil // the lock delay of a holder lost with its session
		case acquire && st.holder == "":
			settings, err := s.consulSessionSettings(ctx, session)
			if err != nil {
				return false, err
			}
			meta.LockIndex++
			meta.Holder, meta.HolderDelay, meta.HolderBehavior = me, settings.LockDelay, settings.Behavior
			more = append(more, clientv3.OpPut(holdKey, me, clientv3.WithLease(clientv3.LeaseID(session))))
		case release && st.holder != me:
			return false, nil
		case release:
			meta.Holder, meta.HolderDelay, meta.HolderBehavior = "", 0, ""
			more = append(more, clientv3.OpDelete(holdKey))
		}
		meta.Flags = flags
		rec, _ := json.Marshal(meta)
		more = append(more, clientv3.OpPut(metaKey, string(rec)))
		op := kv.Op{Type: kv.Put, Key: key, Value: value, HasExpected: true, Expected: st.dataRev}
		_, err = s.kv.CommitWith(ctx, ns, []kv.Op{op}, identityOf(ctx).Accessor, s.consulCompares(ns, key, st), more)
		switch {
		case errors.Is(err, kv.ErrConflict), errors.Is(err, kv.ErrCompare):
			continue // the key or its records changed since the read: decide again
		case errors.Is(err, rpctypes.ErrLeaseNotFound), err != nil && strings.Contains(err.Error(), "requested lease not found"):
			return false, connect.NewError(connect.CodeNotFound, fmt.Errorf("invalid session %q: no such session", me))
		case err != nil:
			return false, err
		}
		return true, nil
	}
	return false, kv.ErrConflict
}

// consulCompares hold a write to the key's record and hold as st read
// them (the value's own compare is the kv.Op's).
func (s *Server) consulCompares(ns, key string, st consulKeyState) []clientv3.Cmp {
	return []clientv3.Cmp{
		clientv3.Compare(clientv3.ModRevision(s.consulMetaKey(ns, key)), "=", st.metaRev),
		clientv3.Compare(clientv3.ModRevision(s.consulHoldKey(ns, key)), "=", st.holdRev),
	}
}

// consulSessionSettings reads a session's Consul settings: its lock delay
// and behavior (a session made through beacon's API has Consul's
// defaults).
func (s *Server) consulSessionSettings(ctx context.Context, session int64) (consulSession, error) {
	settings := consulSession{Behavior: "release", LockDelay: consulDefaultLockDelay}
	resp, err := s.cli.Get(ctx, s.consulSessionKey(session))
	if err != nil {
		return settings, err
	}
	if len(resp.Kvs) > 0 {
		_ = json.Unmarshal(resp.Kvs[0].Value, &settings)
	}
	return settings, nil
}

// consulFinishRelease finishes the release of a key whose holder's
// session ended (st.releasePending), under compares on the records as st
// read them: it clears the holder and starts its lock delay (from now:
// the end was at or before now, so the delay is never shorter than the
// holder's), and for a session of behavior "delete" deletes the value —
// unless the value was written since by other than this API (beacon's own
// KV API writes no record), which may be after the session's end: that
// write is kept. done is false when a compare failed (someone else
// finished it, or the key changed): the caller reads again.
func (s *Server) consulFinishRelease(ctx context.Context, ns, key string, st consulKeyState) (done bool, err error) {
	metaKey := s.consulMetaKey(ns, key)
	meta := st.metaToWrite()
	if until := time.Now().Add(meta.HolderDelay); until.After(meta.DelayUntil) {
		meta.DelayUntil = until
	}
	behavior := meta.HolderBehavior
	meta.Holder, meta.HolderDelay, meta.HolderBehavior = "", 0, ""
	rec, _ := json.Marshal(meta)
	cmps := s.consulCompares(ns, key, st)
	if behavior == "delete" && st.dataRev <= st.metaRev {
		// The record stays, with the delay only: a delay outlives a delete.
		_, err := s.kv.CommitWith(ctx, ns, []kv.Op{{Type: kv.Delete, Key: key, HasExpected: true, Expected: st.dataRev}},
			"consul-session-end", cmps, []clientv3.Op{clientv3.OpPut(metaKey, string(mustJSON(consulKVMeta{DelayUntil: meta.DelayUntil})))})
		if errors.Is(err, kv.ErrConflict) || errors.Is(err, kv.ErrCompare) {
			return false, nil
		}
		return err == nil, err
	}
	cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(s.consulDataKey(ns, key)), "=", st.dataRev))
	resp, err := s.cli.Txn(ctx).If(cmps...).Then(clientv3.OpPut(metaKey, string(rec))).Commit()
	if err != nil {
		return false, err
	}
	return resp.Succeeded, nil
}

func mustJSON(v any) []byte {
	b, _ := json.Marshal(v)
	return b
}

// consulKVDelete is DELETE /v1/kv/KEY (cas; recurse deletes every key
// under the prefix, in transactions of 16 keys each: not all at once).
func (s *Server) consulKVDelete(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	key := r.PathValue("key")
	ctx := r.Context()
	_, recurse := q.values["recurse"]
	var err error
	if recurse {
		err = registry.ValidateKeyPrefix("key", key)
	} else {
		err = registry.ValidateKey("key", key)
	}
	if err != nil {
		consulError(w, toConnectError(err))
		return
	}
	var cas int64 = -1
	if q.values.Has("cas") {
		if cas, err = strconv.ParseInt(q.values.Get("cas"), 10, 64); err != nil || cas < 0 || recurse {
			consulError(w, refused("cas", "must be a ModifyIndex, and not with recurse"))
			return
		}
	}
	if !recurse {
		if err := needKey(ctx, q.ns, key, acl.Write); err != nil {
			consulError(w, err)
			return
		}
	}
	keys, _, _, err := s.consulKVStates(ctx, q.ns, []string{key}, recurse, false, true, 0)
	if err != nil {
		consulError(w, toConnectError(err))
		return
	}
	for _, k := range keys {
		if err := needKey(ctx, q.ns, k, acl.Write); err != nil {
			consulError(w, err)
			return
		}
	}
	msg := &beaconv1.KVDeleteRequest{Namespace: q.ns, Key: key}
	if !recurse {
		keys = []string{key}
	}
	// Each key's compares and writes: 5 of each at most, under etcd's 128.
	const batch = 16
	for len(keys) > 0 {
		n := min(batch, len(keys))
		var done bool
		if err = s.spendWrites(ctx, connOf(ctx), n, time.Now()); err == nil {
			done, err = s.consulKVDeleteKeys(ctx, q.ns, keys[:n], cas)
		}
		s.audit.record(ctx, beaconv1connect.KVServiceDeleteProcedure, msg, &beaconv1.KVDeleteResponse{}, err)
		if err != nil {
			consulError(w, kvError(err))
			return
		}
		if !done {
			consulJSON(w, -1, false) // the cas compare failed
			return
		}
		keys = keys[n:]
	}
	consulJSON(w, -1, true)
}

// consulKVDeleteKeys deletes keys with what is kept beside them, each as
// read (a key changed meanwhile is read and decided again); cas ≥ 0 (one
// key) must be its ModifyIndex, else false — a key already gone is
// deleted, as in Consul. A running lock delay stays in the key's record.
func (s *Server) consulKVDeleteKeys(ctx context.Context, ns string, keys []string, cas int64) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, consulKVTimeout)
	defer cancel()
	for range 8 {
		_, states, _, err := s.consulKVStates(ctx, ns, keys, false, false, true, 0)
		if err != nil {
			return false, err
		}
		var ops []kv.Op
		var cmps []clientv3.Cmp
		var more []clientv3.Op
		for _, k := range keys {
			st := states[k]
			if cas >= 0 && st.dataRev != 0 && st.modifyIndex() != cas {
				return false, nil
			}
			metaKey, holdKey := s.consulMetaKey(ns, k), s.consulHoldKey(ns, k)
			ops = append(ops, kv.Op{Type: kv.Delete, Key: k, HasExpected: true, Expected: st.dataRev})
			cmps = append(cmps, s.consulCompares(ns, k, st)...)
			more = append(more, clientv3.OpDelete(holdKey))
			if time.Now().Before(st.delay) {
				more = append(more, clientv3.OpPut(metaKey, string(mustJSON(consulKVMeta{DelayUntil: st.delay}))))
			} else {
				more = append(more, clientv3.OpDelete(metaKey))
			}
		}
		_, err = s.kv.CommitWith(ctx, ns, ops, identityOf(ctx).Accessor, cmps, more)
		if errors.Is(err, kv.ErrConflict) || errors.Is(err, kv.ErrCompare) {
			continue
		}
		return err == nil, err
	}
	return false, kv.ErrConflict
}

// consulReleaser finishes the releases of sessions that ended: the keys
// whose hold record the view saw deleted, and after a listing (at start,
// after a compaction) every key whose record still names a holder. What
// fails (etcd away) is tried again, from a second apart up to 30 s.
func (s *Server) consulReleaser(ctx context.Context) {
	c := s.consulKV
	warn := &logLimiter{every: time.Minute}
	backoff := time.Second
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.wake:
		case <-retry.C:
		}
		c.mu.Lock()
		todo, sweep := c.pending, c.sweep
		c.pending, c.sweep = map[string]int64{}, false
		c.mu.Unlock()
		var err error
		if sweep {
			err = s.consulSweepHolders(ctx, todo)
		}
		failed := map[string]int64{}
		for nsKey, at := range todo {
			ns, key, ok := strings.Cut(nsKey, "/")
			if !ok {
				continue
			}
			if rerr := s.consulReleaseKey(ctx, ns, key); rerr != nil && ctx.Err() == nil {
				failed[nsKey] = at
				err = rerr
			}
		}
		if err == nil || ctx.Err() != nil {
			backoff = time.Second
			continue
		}
		if warn.allow() {
			s.log.Warn("consul API: finishing locks released by sessions' ends (trying again)", "keys", len(failed), "sweep", sweep, "err", err)
		}
		c.mu.Lock()
		for k, at := range failed {
			c.pending[k] = at
		}
		c.sweep = c.sweep || sweep && len(failed) == 0
		c.mu.Unlock()
		retry.Reset(backoff)
		backoff = min(2*backoff, 30*time.Second)
	}
}

// consulSweepHolders adds to todo every key whose record names a holder,
// reading the records a thousand at a time.
func (s *Server) consulSweepHolders(ctx context.Context, todo map[string]int64) error {
	prefix := s.store.ConsulKVPrefix()
	end := clientv3.GetPrefixRangeEnd(prefix)
	from := prefix
	for {
		rctx, cancel := context.WithTimeout(ctx, consulKVTimeout)
		resp, err := s.cli.Get(rctx, from, clientv3.WithRange(end), clientv3.WithLimit(1000))
		cancel()
		if err != nil {
			return err
		}
		for _, m := range resp.Kvs {
			var meta consulKVMeta
			if json.Unmarshal(m.Value, &meta) == nil && meta.Holder != "" {
				nsKey := strings.TrimPrefix(string(m.Key), prefix)
				if _, ok := todo[nsKey]; !ok {
					todo[nsKey] = 0
				}
			}
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return nil
		}
		from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

// consulReleaseKey finishes a key's release if it is still to be done,
// reading again when someone else changed the key meanwhile.
func (s *Server) consulReleaseKey(ctx context.Context, ns, key string) error {
	ctx, cancel := context.WithTimeout(ctx, consulKVTimeout)
	defer cancel()
	for range 4 {
		_, states, _, err := s.consulKVStates(ctx, ns, []string{key}, false, false, true, 0)
		if err != nil {
			return err
		}
		st := states[key]
		if !st.releasePending() {
			return nil
		}
		if done, err := s.consulFinishRelease(ctx, ns, key, st); done || err != nil {
			return err
		}
	}
	return fmt.Errorf("key %s/%s kept changing", ns, key)
}

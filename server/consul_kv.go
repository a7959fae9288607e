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
	mu      sync.Mutex
	changed chan struct{}
	log     []kvChange // oldest first
	// forgotten is the newest revision whose changes may be missing from
	// log: a waiter that read before it reads again on any wake.
	forgotten int64
	pending   map[string]bool // "ns/key" whose hold record went with its lease
	sweep     bool            // look at every key for an unfinished release
	wake      chan struct{}
}

type kvChange struct {
	rev   int64
	nsKey string // "ns/key"
}

func newConsulKVState() *consulKVState {
	return &consulKVState{changed: make(chan struct{}), pending: map[string]bool{}, wake: make(chan struct{}, 1)}
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
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.changed
}

// changedSince says whether a key (or a key under the prefix) of ns may
// have changed after revision rev.
func (c *consulKVState) changedSince(rev int64, ns, key string, prefix bool) bool {
	want := ns + "/" + key
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.forgotten > rev {
		return true
	}
	for i := len(c.log) - 1; i >= 0 && c.log[i].rev > rev; i-- {
		if k := c.log[i].nsKey; k == want || prefix && strings.HasPrefix(k, want) {
			return true
		}
	}
	return false
}

// consulNotice is fed the view's events: KV changes are logged and wake
// blocked queries; a hold record deleted is a release the releaser
// finishes (when a write of the Consul API deleted it, it finished it
// already, and the releaser finds nothing to do).
func (s *Server) consulNotice(events []*clientv3.Event, rev int64) {
	c := s.consulKV
	l := s.store.Layout
	var changes []kvChange
	released := false
	for _, ev := range events {
		k := string(ev.Kv.Key)
		var nsKey string
		switch {
		case strings.HasPrefix(k, l.ConsulHoldPrefix()):
			nsKey = k[len(l.ConsulHoldPrefix()):]
			if ev.Type == clientv3.EventTypeDelete {
				released = true
				c.mu.Lock()
				c.pending[nsKey] = true
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
	}
	if released {
		c.kick()
	}
	if len(changes) == 0 {
		return
	}
	c.raise(rev)
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

func (st consulKeyState) pair(ns, key string) consulKVPair {
	p := consulKVPair{Key: key, CreateIndex: st.dataCreate, ModifyIndex: st.modifyIndex(), Value: st.value,
		Flags: st.meta.Flags, LockIndex: st.meta.LockIndex, Session: st.holder}
	if ns != registry.DefaultNamespace {
		p.Namespace = ns
	}
	return p
}

// consulKVStates reads a key, or every key under a prefix, with what Consul
// keeps beside each: keys in order, their states, and the read's
// revision. Serializable unless consistent; at rev when rev > 0.
func (s *Server) consulKVStates(ctx context.Context, ns, key string, prefix, values, consistent bool, rev int64) ([]string, map[string]consulKeyState, int64, error) {
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
	resp, err := s.cli.Txn(ctx).Then(
		clientv3.OpGet(s.consulDataKey(ns, key), dataOpts...),
		clientv3.OpGet(s.consulMetaKey(ns, key), opts...),
		clientv3.OpGet(s.consulHoldKey(ns, key), opts...),
	).Commit()
	if err != nil {
		return nil, nil, 0, err
	}
	data := resp.Responses[0].GetResponseRange().Kvs
	if len(data) > consulMaxKVList {
		return nil, nil, 0, connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("more than %d keys under %q: list a longer prefix", consulMaxKVList, key))
	}
	byKey := func(kvs []*mvccpb.KeyValue, base string) map[string]*mvccpb.KeyValue {
		m := make(map[string]*mvccpb.KeyValue, len(kvs))
		for _, kv := range kvs {
			m[strings.TrimPrefix(string(kv.Key), base)] = kv
		}
		return m
	}
	metas := byKey(resp.Responses[1].GetResponseRange().Kvs, s.consulMetaKey(ns, ""))
	holds := byKey(resp.Responses[2].GetResponseRange().Kvs, s.consulHoldKey(ns, ""))
	states := make(map[string]consulKeyState, max(len(data), 1))
	keys := make([]string, 0, len(data))
	for _, d := range data {
		k := strings.TrimPrefix(string(d.Key), s.consulDataKey(ns, ""))
		keys = append(keys, k)
		states[k] = consulKeyState{dataRev: d.ModRevision, dataCreate: d.CreateRevision, value: d.Value}
	}
	// The records beside a key that is absent still count in the
	// compares of a write (a single key's, read even when absent).
	if !prefix {
		if _, ok := states[key]; !ok {
			states[key] = consulKeyState{}
		}
	}
	for k, st := range states {
		if m := metas[k]; m != nil {
			st.metaRev = m.ModRevision
			if st.dataRev != 0 && m.ModRevision >= st.dataCreate {
				_ = json.Unmarshal(m.Value, &st.meta)
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
	return keys, states, resp.Header.Revision, nil
}

// consulKVIndex is a read's X-Consul-Index: a single key's ModifyIndex,
// else the revision of the server's last KV change (a key's deletion
// leaves no revision of its own to report). For the latter the view is
// first brought up to the read, so the index covers what the read saw.
func (s *Server) consulKVIndex(ctx context.Context, pairs []consulKVPair, single bool, readRev int64) int64 {
	if single && len(pairs) == 1 {
		return pairs[0].ModifyIndex
	}
	wctx, cancel := context.WithTimeout(ctx, readTimeout)
	_ = s.view.WaitRevision(wctx, readRev)
	cancel()
	return s.consulKV.rev.Load()
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
	read := func() ([]consulKVPair, int64, int64, error) {
		keys, states, readRev, err := s.consulKVStates(ctx, q.ns, key, prefix, !keysOnly, q.consistent, 0)
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
		return pairs, s.consulKVIndex(ctx, pairs, !prefix, readRev), readRev, nil
	}
	ok := s.consulBlock(w, r, q, func(ctx context.Context) error {
		for {
			changed := s.consulKV.waitCh()
			_, index, readRev, err := read()
			if err != nil || uint64(index) > q.index {
				return err
			}
			// Read again only when a change may concern this query.
			for !s.consulKV.changedSince(readRev, q.ns, key, prefix) {
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
	pairs, index, _, err := read()
	if err != nil {
		consulError(w, toConnectError(err))
		return
	}
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
		_, states, _, err := s.consulKVStates(ctx, ns, key, false, false, true, 0)
		if err != nil {
			return false, err
		}
		st := states[key]
		if st.releasePending() {
			if err := s.consulFinishRelease(ctx, ns, key, st); err != nil {
				return false, err
			}
			continue // decide on the finished release
		}
		if cas >= 0 && cas != st.modifyIndex() {
			return false, nil
		}
		meta := st.meta
		var more []clientv3.Op
		switch {
		case acquire && st.holder != "" && st.holder != me:
			return false, nil // held by another session
		case acquire && st.holder == "" && time.Now().Before(meta.DelayUntil):
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
		cmps := []clientv3.Cmp{
			clientv3.Compare(clientv3.ModRevision(metaKey), "=", st.metaRev),
			clientv3.Compare(clientv3.ModRevision(holdKey), "=", st.holdRev),
		}
		op := kv.Op{Type: kv.Put, Key: key, Value: value, HasExpected: true, Expected: st.dataRev}
		_, err = s.kv.CommitWith(ctx, ns, []kv.Op{op}, identityOf(ctx).Accessor, cmps, more)
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
// session ended (st.releasePending): under compares on the records as st
// read them, it deletes the key for a session of behavior "delete", or
// clears the holder and starts its lock delay (from now: the end was at
// or before now, so the delay is never shorter than the holder's). A
// compare that fails means someone else finished it, or the key changed:
// nothing to do.
func (s *Server) consulFinishRelease(ctx context.Context, ns, key string, st consulKeyState) error {
	metaKey, holdKey := s.consulMetaKey(ns, key), s.consulHoldKey(ns, key)
	cmps := []clientv3.Cmp{
		clientv3.Compare(clientv3.ModRevision(metaKey), "=", st.metaRev),
		clientv3.Compare(clientv3.ModRevision(holdKey), "=", st.holdRev),
	}
	if st.meta.HolderBehavior == "delete" {
		_, err := s.kv.CommitWith(ctx, ns, []kv.Op{{Type: kv.Delete, Key: key, HasExpected: true, Expected: st.dataRev}},
			"consul-session-end", cmps, []clientv3.Op{clientv3.OpDelete(metaKey), clientv3.OpDelete(holdKey)})
		if errors.Is(err, kv.ErrConflict) || errors.Is(err, kv.ErrCompare) {
			return nil
		}
		return err
	}
	meta := st.meta
	meta.DelayUntil = time.Now().Add(meta.HolderDelay)
	meta.Holder, meta.HolderDelay, meta.HolderBehavior = "", 0, ""
	rec, _ := json.Marshal(meta)
	cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(s.consulDataKey(ns, key)), "=", st.dataRev))
	_, err := s.cli.Txn(ctx).If(cmps...).Then(clientv3.OpPut(metaKey, string(rec))).Commit()
	return err
}

// consulKVDelete is DELETE /v1/kv/KEY (cas; recurse deletes every key
// under the prefix, in transactions of a few keys each).
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
	keys, _, _, err := s.consulKVStates(ctx, q.ns, key, recurse, false, true, 0)
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
// key) must be its ModifyIndex, else false.
func (s *Server) consulKVDeleteKeys(ctx context.Context, ns string, keys []string, cas int64) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, consulKVTimeout)
	defer cancel()
	for range 8 {
		var ops []kv.Op
		var cmps []clientv3.Cmp
		var more []clientv3.Op
		for _, k := range keys {
			_, states, _, err := s.consulKVStates(ctx, ns, k, false, false, true, 0)
			if err != nil {
				return false, err
			}
			st := states[k]
			if cas >= 0 && st.modifyIndex() != cas {
				return false, nil
			}
			metaKey, holdKey := s.consulMetaKey(ns, k), s.consulHoldKey(ns, k)
			ops = append(ops, kv.Op{Type: kv.Delete, Key: k, HasExpected: true, Expected: st.dataRev})
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(metaKey), "=", st.metaRev),
				clientv3.Compare(clientv3.ModRevision(holdKey), "=", st.holdRev))
			more = append(more, clientv3.OpDelete(metaKey), clientv3.OpDelete(holdKey))
		}
		_, err := s.kv.CommitWith(ctx, ns, ops, identityOf(ctx).Accessor, cmps, more)
		if errors.Is(err, kv.ErrConflict) || errors.Is(err, kv.ErrCompare) {
			continue
		}
		return err == nil, err
	}
	return false, kv.ErrConflict
}

// consulReleaser finishes the releases of sessions that ended: the keys
// whose hold record the view saw deleted, and after a listing (at start,
// after a compaction) every key whose record still names a holder. A
// release that fails (etcd away) is tried again a second later.
func (s *Server) consulReleaser(ctx context.Context) {
	c := s.consulKV
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
		c.pending, c.sweep = map[string]bool{}, false
		c.mu.Unlock()
		var err error
		if sweep {
			err = s.consulSweepHolders(ctx, todo)
		}
		failed := map[string]bool{}
		for nsKey := range todo {
			ns, key, ok := strings.Cut(nsKey, "/")
			if !ok {
				continue
			}
			if err := s.consulReleaseKey(ctx, ns, key); err != nil && ctx.Err() == nil {
				failed[nsKey] = true
				s.log.Warn("consul API: finishing a lock released by a session's end", "key", nsKey, "err", err)
			}
		}
		if len(failed) > 0 || err != nil {
			c.mu.Lock()
			for k := range failed {
				c.pending[k] = true
			}
			c.sweep = c.sweep || err != nil
			c.mu.Unlock()
			retry.Reset(time.Second)
		}
	}
}

// consulSweepHolders adds to todo every key whose record names a holder.
func (s *Server) consulSweepHolders(ctx context.Context, todo map[string]bool) error {
	ctx, cancel := context.WithTimeout(ctx, consulKVTimeout)
	defer cancel()
	prefix := s.store.ConsulKVPrefix()
	resp, err := s.cli.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return err
	}
	for _, m := range resp.Kvs {
		var meta consulKVMeta
		if json.Unmarshal(m.Value, &meta) == nil && meta.Holder != "" {
			todo[strings.TrimPrefix(string(m.Key), prefix)] = true
		}
	}
	return nil
}

func (s *Server) consulReleaseKey(ctx context.Context, ns, key string) error {
	ctx, cancel := context.WithTimeout(ctx, consulKVTimeout)
	defer cancel()
	_, states, _, err := s.consulKVStates(ctx, ns, key, false, false, true, 0)
	if err != nil {
		return err
	}
	if st := states[key]; st.releasePending() {
		return s.consulFinishRelease(ctx, ns, key, st)
	}
	return nil
}

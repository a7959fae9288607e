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
	"google.golang.org/protobuf/types/known/durationpb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/internal/store"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/internal/acl"
	"beacon.dev/beacon/server/internal/kv"
)

// Consul's KV and sessions over beacon's KV store and sessions. A Consul
// key is a beacon key of the namespace (the same value, history and
// watches); what Consul keeps beside a value lives in two more records,
// written in the value's transaction:
//
//	kvconsul/{ns}/{key}   {"flags":…,"lock_index":…,"delay_until":…}
//	kvhold/{ns}/{key}     the holding session's id, on that session's lease
//
// A key's ModifyIndex is the newest mod revision of the three, so that an
// acquire or a release moves it as in Consul. When a holder's session ends
// its hold record goes with the lease; the server then writes the key's
// record again (consulReleaser), which moves the index, starts the lock
// delay and, for a session of behavior "delete", deletes the key.

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
}

// consulSession is what a Consul session keeps beside beacon's session.
type consulSession struct {
	Name      string        `json:"name,omitempty"`
	Behavior  string        `json:"behavior"`
	LockDelay time.Duration `json:"lock_delay"`
	TTL       time.Duration `json:"ttl"`
}

// Consul's session defaults.
const (
	consulDefaultLockDelay = 15 * time.Second
	consulMaxLockDelay     = 60 * time.Second
	consulMaxKVList        = 10000 // keys of one recurse or keys query
)

// consulKVState is the server's part of Consul KV: the revision of the
// last KV change it saw (the index of prefix and missing-key queries) and
// a broadcast that wakes blocked KV queries.
type consulKVState struct {
	rev     atomic.Int64
	mu      sync.Mutex
	changed chan struct{}
	// released holds the hold records deleted by a lease's end, by etcd
	// key, with the deletion's revision, for consulReleaser.
	released map[string]int64
	wake     chan struct{}
}

func newConsulKVState() *consulKVState {
	return &consulKVState{changed: make(chan struct{}), released: map[string]int64{}, wake: make(chan struct{}, 1)}
}

// listed starts the KV index at the view's listing: no KV change this
// server could report is newer, so the index never goes back across a
// restart of the server.
func (c *consulKVState) listed(rev int64) {
	for cur := c.rev.Load(); rev > cur && !c.rev.CompareAndSwap(cur, rev); cur = c.rev.Load() {
	}
}

func (c *consulKVState) waitCh() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.changed
}

// notice is fed the view's events: KV changes wake blocked queries, and
// hold records deleted other than by a write of the Consul API (which
// writes the key's record in the same transaction) go to the releaser.
func (s *Server) consulNotice(events []*clientv3.Event, rev int64) {
	c := s.consulKV
	l := s.store.Layout
	touched := false
	for _, ev := range events {
		k := string(ev.Kv.Key)
		switch {
		case strings.HasPrefix(k, l.ConsulHoldPrefix()):
			touched = true
			if ev.Type == clientv3.EventTypeDelete {
				c.mu.Lock()
				c.released[k] = ev.Kv.ModRevision
				c.mu.Unlock()
				select {
				case c.wake <- struct{}{}:
				default:
				}
			}
		case strings.HasPrefix(k, l.KVPrefix()), strings.HasPrefix(k, l.ConsulKVPrefix()):
			touched = true
		}
	}
	if !touched {
		return
	}
	c.listed(rev)
	c.mu.Lock()
	close(c.changed)
	c.changed = make(chan struct{})
	c.mu.Unlock()
}

func (s *Server) consulMetaKey(ns, key string) string {
	return s.store.ConsulKVPrefix() + ns + "/" + key
}
func (s *Server) consulHoldKey(ns, key string) string {
	return s.store.ConsulHoldPrefix() + ns + "/" + key
}
func (s *Server) consulSessionKey(id int64) string {
	return s.store.ConsulSessionPrefix() + store.FormatSessionID(id)
}

// consulKVRead reads a key, or every key under a prefix, with what Consul
// keeps beside each; serializable unless consistent.
func (s *Server) consulKVRead(ctx context.Context, ns, key string, prefix, consistent bool) ([]consulKVPair, error) {
	var opts []clientv3.OpOption
	if !consistent {
		opts = append(opts, clientv3.WithSerializable())
	}
	if prefix {
		opts = append(opts, clientv3.WithPrefix(), clientv3.WithLimit(consulMaxKVList+1))
	}
	base := s.store.KVPrefix() + ns + "/"
	resp, err := s.cli.Txn(ctx).Then(
		clientv3.OpGet(base+key, opts...),
		clientv3.OpGet(s.consulMetaKey(ns, key), opts...),
		clientv3.OpGet(s.consulHoldKey(ns, key), opts...),
	).Commit()
	if err != nil {
		return nil, err
	}
	data := resp.Responses[0].GetResponseRange().Kvs
	if len(data) > consulMaxKVList {
		return nil, connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("more than %d keys under %q: list a longer prefix", consulMaxKVList, key))
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
	out := make([]consulKVPair, 0, len(data))
	for _, d := range data {
		k := strings.TrimPrefix(string(d.Key), base)
		p := consulKVPair{Key: k, CreateIndex: d.CreateRevision, ModifyIndex: d.ModRevision, Value: d.Value}
		if m := metas[k]; m != nil {
			var meta consulKVMeta
			_ = json.Unmarshal(m.Value, &meta)
			p.Flags, p.LockIndex = meta.Flags, meta.LockIndex
			p.ModifyIndex = max(p.ModifyIndex, m.ModRevision)
		}
		if h := holds[k]; h != nil {
			p.Session = string(h.Value)
			p.ModifyIndex = max(p.ModifyIndex, h.ModRevision)
		}
		if ns != registry.DefaultNamespace {
			p.Namespace = ns
		}
		out = append(out, p)
	}
	return out, nil
}

// consulKVIndex is a read's X-Consul-Index: a single key's ModifyIndex,
// else the revision of the server's last KV change (a key's deletion
// leaves no revision of its own to report).
func (s *Server) consulKVIndex(pairs []consulKVPair, single bool) int64 {
	if single && len(pairs) == 1 {
		return pairs[0].ModifyIndex
	}
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
	read := func() ([]consulKVPair, int64, error) {
		pairs, err := s.consulKVRead(ctx, q.ns, key, prefix, q.consistent)
		if err != nil {
			return nil, 0, err
		}
		kept := pairs[:0]
		for _, p := range pairs {
			if identityOf(ctx).Authz.Key(q.ns, p.Key) >= acl.Read {
				kept = append(kept, p)
			} else {
				consulFiltered(w)
			}
		}
		return kept, s.consulKVIndex(kept, !prefix), nil
	}
	if !prefix {
		if err := needKey(ctx, q.ns, key, acl.Read); err != nil {
			consulError(w, err)
			return
		}
	}
	var pairs []consulKVPair
	var index int64
	ok := s.consulBlock(w, r, q, func(ctx context.Context) error {
		for {
			changed := s.consulKV.waitCh()
			_, i, err := read()
			if err != nil || uint64(i) > q.index {
				return err
			}
			select {
			case <-changed:
			case <-ctx.Done():
				return nil
			}
		}
	})
	if !ok {
		return
	}
	if pairs, index, err = read(); err != nil {
		consulError(w, toConnectError(err))
		return
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
			w.Header().Set("X-Consul-Index", strconv.FormatInt(max(index, 1), 10))
			w.WriteHeader(http.StatusNotFound)
			return
		}
		consulJSON(w, index, keys)
	case len(pairs) == 0:
		w.Header().Set("X-Consul-Index", strconv.FormatInt(max(index, 1), 10))
		w.WriteHeader(http.StatusNotFound)
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
	metaKey, holdKey := s.consulMetaKey(ns, key), s.consulHoldKey(ns, key)
	me := store.FormatSessionID(session)
	for range 8 {
		states, err := s.consulKeyStates(ctx, ns, []string{key})
		if err != nil {
			return false, err
		}
		st := states[key]
		meta, dataRev, holder := st.meta, st.dataRev, st.holder
		modify := st.modifyIndex()
		if cas >= 0 && cas != modify {
			return false, nil
		}
		cmps := []clientv3.Cmp{
			clientv3.Compare(clientv3.ModRevision(metaKey), "=", st.metaRev),
			clientv3.Compare(clientv3.ModRevision(holdKey), "=", st.holdRev),
		}
		var more []clientv3.Op
		switch {
		case acquire && holder != "" && holder != me:
			return false, nil // held by another session
		case acquire && holder == "" && time.Now().Before(meta.DelayUntil):
			return false, nil // the lock delay of a holder lost with its session
		case acquire && holder == "":
			meta.LockIndex++
			more = append(more, clientv3.OpPut(holdKey, me, clientv3.WithLease(clientv3.LeaseID(session))))
		case release && holder != me:
			return false, nil
		case release:
			more = append(more, clientv3.OpDelete(holdKey))
		}
		meta.Flags = flags
		rec, _ := json.Marshal(meta)
		more = append(more, clientv3.OpPut(metaKey, string(rec)))
		op := kv.Op{Type: kv.Put, Key: key, Value: value, HasExpected: true, Expected: dataRev}
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

// consulKVDelete is DELETE /v1/kv/KEY (cas; recurse deletes every key
// under the prefix, in transactions of at most --max-kv-txn-ops keys).
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
	pairs, err := s.consulKVRead(ctx, q.ns, key, recurse, true)
	if err != nil {
		consulError(w, toConnectError(err))
		return
	}
	keys := make([]string, 0, len(pairs))
	for _, p := range pairs {
		if err := needKey(ctx, q.ns, p.Key, acl.Write); err != nil {
			consulError(w, err)
			return
		}
		keys = append(keys, p.Key)
	}
	if !recurse {
		if err := needKey(ctx, q.ns, key, acl.Write); err != nil {
			consulError(w, err)
			return
		}
		if cas >= 0 && (len(pairs) == 0 && cas != 0 || len(pairs) == 1 && pairs[0].ModifyIndex != cas) {
			consulJSON(w, -1, false)
			return
		}
	}
	msg := &beaconv1.KVDeleteRequest{Namespace: q.ns, Key: key}
	batch := max(1, s.cfg.Limits.MaxKVTxnOps/3)
	for len(keys) > 0 {
		n := min(batch, len(keys))
		if err = s.spendWrites(ctx, connOf(ctx), n, time.Now()); err == nil {
			err = s.consulKVDeleteKeys(ctx, q.ns, keys[:n], pairs)
		}
		s.audit.record(ctx, beaconv1connect.KVServiceDeleteProcedure, msg, &beaconv1.KVDeleteResponse{}, err)
		if err != nil {
			consulError(w, kvError(err))
			return
		}
		keys, pairs = keys[n:], pairs[n:]
	}
	consulJSON(w, -1, true)
}

func (s *Server) consulKVDeleteKeys(ctx context.Context, ns string, keys []string, pairs []consulKVPair) error {
	ops := make([]kv.Op, len(keys))
	var more []clientv3.Op
	for i, k := range keys {
		ops[i] = kv.Op{Type: kv.Delete, Key: k}
		more = append(more, clientv3.OpDelete(s.consulMetaKey(ns, k)), clientv3.OpDelete(s.consulHoldKey(ns, k)))
	}
	_, err := s.kv.CommitWith(ctx, ns, ops, identityOf(ctx).Accessor, nil, more)
	return err
}

// consulReleaser finishes what a session's end leaves: for each hold
// record gone with its lease, the key's record is written again (its
// ModifyIndex moves, so blocked readers see the lock free), with the
// session's lock delay; a session of behavior "delete" deletes the key.
// Several servers may do it for one release: each write compares first.
func (s *Server) consulReleaser(ctx context.Context) {
	c := s.consulKV
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.wake:
		}
		c.mu.Lock()
		todo := c.released
		c.released = map[string]int64{}
		c.mu.Unlock()
		for k, rev := range todo {
			if err := s.consulRelease(ctx, k, rev); err != nil && ctx.Err() == nil {
				s.log.Warn("consul API: finishing a lock released by a session's end", "key", k, "err", err)
			}
		}
	}
}

func (s *Server) consulRelease(ctx context.Context, holdKey string, rev int64) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	rest := strings.TrimPrefix(holdKey, s.store.ConsulHoldPrefix())
	ns, key, ok := strings.Cut(rest, "/")
	if !ok {
		return nil
	}
	metaKey := s.consulMetaKey(ns, key)
	cur, err := s.cli.Txn(ctx).Then(clientv3.OpGet(metaKey), clientv3.OpGet(holdKey),
		clientv3.OpGet(s.store.KVPrefix()+ns+"/"+key, clientv3.WithCountOnly())).Commit()
	if err != nil {
		return err
	}
	if cur.Responses[2].GetResponseRange().Count == 0 {
		return nil // the key was deleted (with its hold): nothing to release
	}
	var meta consulKVMeta
	var metaRev int64
	if kvs := cur.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
		_ = json.Unmarshal(kvs[0].Value, &meta)
		metaRev = kvs[0].ModRevision
	}
	if metaRev >= rev || len(cur.Responses[1].GetResponseRange().Kvs) > 0 {
		return nil // released by a write, which wrote the record itself; or held again
	}
	// Who held it, and how its session ends: as they were just before.
	settings := consulSession{Behavior: "release", LockDelay: consulDefaultLockDelay}
	if prev, err := s.cli.Get(ctx, holdKey, clientv3.WithRev(rev-1)); err == nil && len(prev.Kvs) > 0 {
		if id, err := store.ParseSessionID(string(prev.Kvs[0].Value)); err == nil {
			if rec, err := s.cli.Get(ctx, s.consulSessionKey(id), clientv3.WithRev(rev-1)); err == nil && len(rec.Kvs) > 0 {
				_ = json.Unmarshal(rec.Kvs[0].Value, &settings)
			}
		}
	}
	cmps := []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(metaKey), "=", metaRev), clientv3.Compare(clientv3.CreateRevision(holdKey), "=", 0)}
	if settings.Behavior == "delete" {
		_, err := s.kv.CommitWith(ctx, ns, []kv.Op{{Type: kv.Delete, Key: key}}, "consul-session-end", cmps, []clientv3.Op{clientv3.OpDelete(metaKey)})
		if errors.Is(err, kv.ErrConflict) {
			return nil
		}
		return err
	}
	meta.DelayUntil = time.Now().Add(settings.LockDelay)
	rec, _ := json.Marshal(meta)
	_, err = s.cli.Txn(ctx).If(cmps...).Then(clientv3.OpPut(metaKey, string(rec))).Commit()
	return err
}

// Sessions.

type consulSessionEntry struct {
	ID, Name, Node, Behavior, TTL string
	LockDelay                     time.Duration
	Checks, NodeChecks            []string
	CreateIndex, ModifyIndex      int64
	Namespace                     string `json:",omitempty"`
}

func (s *Server) consulSessionCreate(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	var body struct {
		Name, Node, Behavior, TTL string
		LockDelay                 json.RawMessage
		Checks, NodeChecks        []string
		ServiceChecks             []any
	}
	if err := s.consulBody(w, r, &body); err != nil && !errors.Is(err, io.EOF) && !strings.Contains(err.Error(), "EOF") {
		consulError(w, err)
		return
	}
	settings := consulSession{Name: body.Name, Behavior: "release", LockDelay: consulDefaultLockDelay}
	switch body.Behavior {
	case "", "release":
	case "delete":
		settings.Behavior = "delete"
	default:
		consulError(w, refused("Behavior", "must be release or delete"))
		return
	}
	for _, c := range append(body.Checks, body.NodeChecks...) {
		if c != "serfHealth" {
			consulError(w, refused("Checks", fmt.Sprintf("%q: beacon sessions end with their TTL, not with checks (only serfHealth is accepted)", c)))
			return
		}
	}
	if len(body.ServiceChecks) > 0 {
		consulError(w, refused("ServiceChecks", "beacon sessions end with their TTL, not with checks"))
		return
	}
	if body.TTL == "" {
		consulError(w, refused("TTL", "beacon sessions need a TTL (e.g. \"15s\"): a session without one would never end if its owner vanished"))
		return
	}
	ttl, err := time.ParseDuration(body.TTL)
	if err != nil {
		consulError(w, refused("TTL", fmt.Sprintf("%q is not a duration such as 15s", body.TTL)))
		return
	}
	ttl = ttl.Round(time.Second)
	settings.TTL = ttl
	if len(body.LockDelay) > 0 {
		var text string
		var num float64
		switch {
		case json.Unmarshal(body.LockDelay, &text) == nil:
			settings.LockDelay, err = time.ParseDuration(text)
		case json.Unmarshal(body.LockDelay, &num) == nil:
			// Consul: a number under 1000 is seconds, else nanoseconds.
			settings.LockDelay = time.Duration(num)
			if num < 1000 {
				settings.LockDelay = time.Duration(num * float64(time.Second))
			}
		default:
			err = errors.New("bad")
		}
		if err != nil || settings.LockDelay < 0 || settings.LockDelay > consulMaxLockDelay {
			consulError(w, refused("LockDelay", fmt.Sprintf("must be a duration of at most %v", consulMaxLockDelay)))
			return
		}
	}
	resp, err := consulCall(s, r.Context(), beaconv1connect.RegistryServiceCreateSessionProcedure,
		&beaconv1.CreateSessionRequest{Ttl: durationpb.New(ttl), Name: consulSessionName(body.Name)}, api{s}.CreateSession)
	if err != nil {
		consulError(w, err)
		return
	}
	rec, _ := json.Marshal(settings)
	if _, err := s.cli.Put(r.Context(), s.consulSessionKey(resp.SessionId), string(rec), clientv3.WithLease(clientv3.LeaseID(resp.SessionId))); err != nil {
		_ = s.store.CloseSession(context.WithoutCancel(r.Context()), resp.SessionId)
		consulError(w, toConnectError(err))
		return
	}
	consulJSON(w, -1, map[string]string{"ID": store.FormatSessionID(resp.SessionId)})
}

// consulSessionName keeps a Consul session name that beacon accepts, and
// drops one it does not (the name is a label; Consul's are free text).
func consulSessionName(name string) string {
	if registry.ValidateSessionName(name) != nil {
		return ""
	}
	return name
}

func (s *Server) consulSessionOf(w http.ResponseWriter, r *http.Request) (int64, bool) {
	id, err := store.ParseSessionID(r.PathValue("id"))
	if err != nil || id == 0 {
		consulError(w, refused("session", fmt.Sprintf("%q is not a session id", r.PathValue("id"))))
		return 0, false
	}
	return id, true
}

// consulSessionEntries reads a session as Consul shows it: [] when it
// does not exist.
func (s *Server) consulSessionEntries(ctx context.Context, id int64) ([]consulSessionEntry, error) {
	resp, err := s.cli.Txn(ctx).Then(clientv3.OpGet(s.store.SessionKey(id)), clientv3.OpGet(s.consulSessionKey(id))).Commit()
	if err != nil {
		return nil, err
	}
	sess := resp.Responses[0].GetResponseRange().Kvs
	if len(sess) == 0 {
		return []consulSessionEntry{}, nil
	}
	settings := consulSession{Behavior: "release", LockDelay: consulDefaultLockDelay}
	if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) > 0 {
		_ = json.Unmarshal(kvs[0].Value, &settings)
	}
	e := consulSessionEntry{ID: store.FormatSessionID(id), Name: settings.Name, Node: s.cfg.Name, Behavior: settings.Behavior,
		LockDelay: settings.LockDelay, Checks: []string{"serfHealth"}, NodeChecks: []string{"serfHealth"},
		CreateIndex: sess[0].CreateRevision, ModifyIndex: sess[0].ModRevision}
	if settings.TTL > 0 {
		e.TTL = settings.TTL.String()
	}
	return []consulSessionEntry{e}, nil
}

func (s *Server) consulSessionRenew(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	id, ok := s.consulSessionOf(w, r)
	if !ok {
		return
	}
	_, err := consulCall(s, r.Context(), beaconv1connect.RegistryServiceKeepAliveProcedure,
		&beaconv1.KeepAliveRequest{SessionId: id}, api{s}.KeepAlive)
	if connect.CodeOf(err) == connect.CodeNotFound {
		consulError(w, connect.NewError(connect.CodeNotFound, fmt.Errorf("Session id '%s' not found", r.PathValue("id"))))
		return
	}
	if err != nil {
		consulError(w, err)
		return
	}
	entries, err := s.consulSessionEntries(r.Context(), id)
	if err != nil {
		consulError(w, toConnectError(err))
		return
	}
	consulJSON(w, -1, entries)
}

// consulSessionDestroy ends a session: its credential, the token that
// made it or session:write may (consul/api's Lock destroys the session it
// made with the same token).
func (s *Server) consulSessionDestroy(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	id, ok := s.consulSessionOf(w, r)
	if !ok {
		return
	}
	ctx := r.Context()
	msg := &beaconv1.CloseSessionRequest{SessionId: id}
	err := api{s}.needKeepAlive(ctx, id)
	if err == nil {
		err = s.spendWrites(ctx, connOf(ctx), 1, time.Now())
	}
	if err == nil {
		err = toConnectError(s.store.CloseSession(ctx, id))
		if errors.Is(err, store.ErrSessionNotFound) || connect.CodeOf(err) == connect.CodeNotFound {
			err = nil // Consul: destroying a gone session succeeds
		}
	}
	s.audit.record(ctx, beaconv1connect.RegistryServiceCloseSessionProcedure, msg, &beaconv1.CloseSessionResponse{}, err)
	if err != nil {
		consulError(w, err)
		return
	}
	consulJSON(w, -1, true)
}

func (s *Server) consulSessionInfo(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	id, ok := s.consulSessionOf(w, r)
	if !ok {
		return
	}
	if !mayReadSessions(identityOf(r.Context())) {
		if err := api.needKeepAlive(api{s}, r.Context(), id); err != nil {
			consulError(w, err)
			return
		}
	}
	entries, err := s.consulSessionEntries(r.Context(), id)
	if err != nil {
		consulError(w, toConnectError(err))
		return
	}
	consulJSON(w, s.consulKV.rev.Load(), entries)
}

// Transactions (PUT /v1/txn): the KV verbs of Consul's transaction API
// over one beacon KV commit — set, cas, get, delete, delete-cas,
// check-index, check-not-exists. All or nothing: a failed compare answers
// 409 naming the operation, and nothing is written.

type consulTxnKV struct {
	Verb, Key string
	Value     []byte
	Flags     uint64
	Index     int64
	Session   string
}

type consulTxnOp struct {
	KV                            *consulTxnKV
	Node, Service, Check, Session any
}

type consulTxnError struct {
	OpIndex int
	What    string
}

// consulKeyState is what a transaction reads of one key before deciding.
type consulKeyState struct {
	dataRev, metaRev, holdRev int64
	meta                      consulKVMeta
	holder                    string // the holding session's id, "" when free
}

func (st consulKeyState) modifyIndex() int64 {
	if st.dataRev == 0 {
		return 0
	}
	return max(st.dataRev, st.metaRev, st.holdRev)
}

func (s *Server) consulKeyStates(ctx context.Context, ns string, keys []string) (map[string]consulKeyState, error) {
	var reads []clientv3.Op
	for _, k := range keys {
		reads = append(reads, clientv3.OpGet(s.store.KVPrefix()+ns+"/"+k, clientv3.WithKeysOnly()),
			clientv3.OpGet(s.consulMetaKey(ns, k)), clientv3.OpGet(s.consulHoldKey(ns, k)))
	}
	resp, err := s.cli.Txn(ctx).Then(reads...).Commit()
	if err != nil {
		return nil, err
	}
	out := make(map[string]consulKeyState, len(keys))
	for i, k := range keys {
		var st consulKeyState
		if kvs := resp.Responses[3*i].GetResponseRange().Kvs; len(kvs) > 0 {
			st.dataRev = kvs[0].ModRevision
		}
		if kvs := resp.Responses[3*i+1].GetResponseRange().Kvs; len(kvs) > 0 {
			st.metaRev = kvs[0].ModRevision
			_ = json.Unmarshal(kvs[0].Value, &st.meta)
		}
		if kvs := resp.Responses[3*i+2].GetResponseRange().Kvs; len(kvs) > 0 {
			st.holdRev, st.holder = kvs[0].ModRevision, string(kvs[0].Value)
		}
		out[k] = st
	}
	return out, nil
}

func (s *Server) consulTxn(w http.ResponseWriter, r *http.Request, q *consulQuery) {
	ctx := r.Context()
	var ops []consulTxnOp
	if err := s.consulBody(w, r, &ops); err != nil {
		consulError(w, err)
		return
	}
	if max := s.cfg.Limits.MaxKVTxnOps; len(ops) > max {
		consulError(w, refused("operations", fmt.Sprintf("%d in one transaction, at most %d (--max-kv-txn-ops)", len(ops), max)))
		return
	}
	seenWrite := map[string]int{}
	seen := map[string]bool{}
	var keys []string
	writes := 0
	for i, op := range ops {
		f := fmt.Sprintf("[%d]", i)
		if op.KV == nil || op.Node != nil || op.Service != nil || op.Check != nil || op.Session != nil {
			consulError(w, refused(f, "only KV operations are served in a transaction (catalog and session ones are not)"))
			return
		}
		need := acl.Read
		switch op.KV.Verb {
		case "set", "cas", "delete", "delete-cas":
			need = acl.Write
			writes++
		case "get", "check-index", "check-not-exists":
		default:
			consulError(w, refused(f+".KV.Verb", fmt.Sprintf("%q: served verbs are set, cas, get, delete, delete-cas, check-index, check-not-exists", op.KV.Verb)))
			return
		}
		if err := registry.ValidateKey(f+".KV.Key", op.KV.Key); err != nil {
			consulError(w, toConnectError(err))
			return
		}
		if need == acl.Write {
			if j, dup := seenWrite[op.KV.Key]; dup {
				consulError(w, refused(f+".KV.Key", fmt.Sprintf("%q written again (already by [%d]): each key is written at most once per transaction", op.KV.Key, j)))
				return
			}
			seenWrite[op.KV.Key] = i
		}
		if !seen[op.KV.Key] {
			seen[op.KV.Key] = true
			keys = append(keys, op.KV.Key)
		}
		if err := needKey(ctx, q.ns, op.KV.Key, need); err != nil {
			consulError(w, err)
			return
		}
		if len(op.KV.Value) > s.cfg.Limits.MaxKVValueBytes {
			consulError(w, s.limitError("max-kv-value-bytes", "value of %s larger than %d bytes", f, s.cfg.Limits.MaxKVValueBytes))
			return
		}
	}
	msg := &beaconv1.KVTxnRequest{Namespace: q.ns}
	var err error
	if writes > 0 {
		if err = (kvAPI{s}).admitKeys(q.ns, keys); err == nil {
			err = s.spendWrites(ctx, connOf(ctx), writes, time.Now())
		}
		if err != nil {
			s.audit.record(ctx, beaconv1connect.KVServiceTxnProcedure, msg, nil, err)
			consulError(w, err)
			return
		}
	}
	var failed []consulTxnError
	for range 8 {
		failed = nil
		var states map[string]consulKeyState
		if states, err = s.consulKeyStates(ctx, q.ns, keys); err != nil {
			break
		}
		var kvOps []kv.Op
		at := map[string]int{} // key -> its op in kvOps (one per key)
		var cmps []clientv3.Cmp
		var more []clientv3.Op
		for i, op := range ops {
			k, st := op.KV.Key, states[op.KV.Key]
			metaKey, holdKey := s.consulMetaKey(q.ns, k), s.consulHoldKey(q.ns, k)
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(metaKey), "=", st.metaRev),
				clientv3.Compare(clientv3.ModRevision(holdKey), "=", st.holdRev))
			base := kv.Op{Key: k, HasExpected: true, Expected: st.dataRev}
			switch op.KV.Verb {
			case "cas", "delete-cas", "check-index":
				if st.modifyIndex() != op.KV.Index {
					failed = append(failed, consulTxnError{i, fmt.Sprintf("current modify index %d != %d", st.modifyIndex(), op.KV.Index)})
				}
			case "check-not-exists":
				if st.dataRev != 0 {
					failed = append(failed, consulTxnError{i, fmt.Sprintf("key %q exists", k)})
				}
			}
			switch op.KV.Verb {
			case "set", "cas":
				base.Type, base.Value = kv.Put, op.KV.Value
				meta := st.meta
				meta.Flags = op.KV.Flags
				rec, _ := json.Marshal(meta)
				more = append(more, clientv3.OpPut(metaKey, string(rec)))
			case "delete", "delete-cas":
				base.Type = kv.Delete
				more = append(more, clientv3.OpDelete(metaKey), clientv3.OpDelete(holdKey))
			default:
				base.Type = kv.Check
			}
			if j, ok := at[k]; ok {
				if base.Type != kv.Check {
					kvOps[j] = base // a write over an earlier read of the key: its compare is the same
				}
				continue
			}
			at[k] = len(kvOps)
			kvOps = append(kvOps, base)
		}
		if len(failed) > 0 {
			break
		}
		_, err = s.kv.CommitWith(ctx, q.ns, kvOps, identityOf(ctx).Accessor, cmps, more)
		if errors.Is(err, kv.ErrConflict) || errors.Is(err, kv.ErrCompare) {
			continue
		}
		break
	}
	if errors.Is(err, kv.ErrCompare) {
		err = kv.ErrConflict
	}
	if writes > 0 {
		s.audit.record(ctx, beaconv1connect.KVServiceTxnProcedure, msg, &beaconv1.KVTxnResponse{}, err)
	}
	if err != nil {
		consulError(w, kvError(err))
		return
	}
	w.Header().Set("Content-Type", "application/json")
	if len(failed) > 0 {
		w.WriteHeader(http.StatusConflict)
		_ = json.NewEncoder(w).Encode(map[string]any{"Results": nil, "Errors": failed})
		return
	}
	// The results: what each operation left, read after the commit (a get
	// sees the transaction's own writes, as in Consul).
	results := []map[string]consulKVPair{}
	for _, op := range ops {
		if op.KV.Verb == "delete" || op.KV.Verb == "delete-cas" || op.KV.Verb == "check-not-exists" {
			continue
		}
		pairs, err := s.consulKVRead(ctx, q.ns, op.KV.Key, false, true)
		if err != nil {
			consulError(w, toConnectError(err))
			return
		}
		if len(pairs) == 1 {
			p := pairs[0]
			if op.KV.Verb != "get" {
				p.Value = nil
			}
			results = append(results, map[string]consulKVPair{"KV": p})
		}
	}
	_ = json.NewEncoder(w).Encode(map[string]any{"Results": results, "Errors": nil})
}

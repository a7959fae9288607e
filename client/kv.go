package client

import (
	"context"
	"errors"
	"maps"
	"sync"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/internal/backoff"
	"beacon.dev/beacon/registry"
)

// ErrCompareFailed is matched (errors.Is) when a compare-and-set or a
// transaction's check found another revision than it expected: nothing
// was written.
var ErrCompareFailed = errors.New("beacon: compare failed")

// KV is the client of the KV config store (docs/kv.md): keys per
// namespace with revisions, compare-and-set, transactions, history,
// rollback and watches. Reads move to another server as the client's
// other calls do; writes move on only when a server could not be reached
// at all (a write a server took may have landed). Errors match
// ErrNotFound (no such key or version), ErrCompareFailed, ErrFenced,
// ErrPermissionDenied, ErrUnavailable and registry.ErrInvalid.
type KV struct{ c *Client }

// KV returns the client's KV store client.
func (c *Client) KV() *KV { return &KV{c} }

// KeyValue is one key's current version.
type KeyValue struct {
	Key   string
	Value []byte
	// ModRevision is the revision of this version (what a compare names),
	// CreateRevision the one that created the key, Version how many writes
	// it has had since.
	ModRevision, CreateRevision, Version int64
}

func kvFromProto(p *beaconv1.KeyValue) KeyValue {
	return KeyValue{Key: p.GetKey(), Value: p.GetValue(), ModRevision: p.GetModRevision(), CreateRevision: p.GetCreateRevision(), Version: p.GetVersion()}
}

// KeyVersion is one kept version of a key.
type KeyVersion struct {
	Revision   int64
	Value      []byte
	Deleted    bool      // the key's deletion
	Time       time.Time // when the server wrote it
	Accessor   string    // the token that wrote it (without ACLs: "")
	RollbackOf int64     // written by a rollback to this revision
}

func kvCall[T any](ctx context.Context, k *KV, mayRepeat bool, f func(context.Context, beaconv1connect.KVServiceClient) (T, error)) (T, error) {
	v, err := failover(ctx, k.c, k.c.kvs, mayRepeat, f)
	return v, kvError(err)
}

func kvError(err error) error {
	if connect.CodeOf(err) == connect.CodeFailedPrecondition {
		var ce *connect.Error
		if errors.As(err, &ce) {
			if ce.Meta().Get("Beacon-Fenced") != "" {
				return &apiError{sentinel: ErrFenced, ce: ce}
			}
			return &apiError{sentinel: ErrCompareFailed, ce: ce}
		}
	}
	return aclError(err)
}

// Get reads a key (the read sees every write acknowledged before it).
func (k *KV) Get(ctx context.Context, key string, opts ...CallOption) (KeyValue, error) {
	req := &beaconv1.KVGetRequest{Namespace: k.c.options(opts).namespace, Key: key}
	return kvCall(ctx, k, repeatable, func(ctx context.Context, s beaconv1connect.KVServiceClient) (KeyValue, error) {
		resp, err := s.Get(ctx, connect.NewRequest(req))
		if err != nil {
			return KeyValue{}, err
		}
		return kvFromProto(resp.Msg.GetKv()), nil
	})
}

// List reads every key starting with prefix, in key order, page by page,
// and the revision of the last page. Keys the token may not read are
// left out.
func (k *KV) List(ctx context.Context, prefix string, opts ...CallOption) ([]KeyValue, int64, error) {
	ns := k.c.options(opts).namespace
	var out []KeyValue
	var rev int64
	after := ""
	for {
		req := &beaconv1.KVListRequest{Namespace: ns, Prefix: prefix, StartAfter: after}
		resp, err := kvCall(ctx, k, repeatable, func(ctx context.Context, s beaconv1connect.KVServiceClient) (*beaconv1.KVListResponse, error) {
			resp, err := s.List(ctx, connect.NewRequest(req))
			if err != nil {
				return nil, err
			}
			return resp.Msg, nil
		})
		if err != nil {
			return nil, 0, err
		}
		for _, kv := range resp.GetKvs() {
			out = append(out, kvFromProto(kv))
		}
		rev = resp.GetRevision()
		if !resp.GetMore() || len(resp.GetKvs()) == 0 {
			return out, rev, nil
		}
		after = resp.GetKvs()[len(resp.GetKvs())-1].GetKey()
	}
}

// Put writes a key whatever its revision and returns the new version's.
func (k *KV) Put(ctx context.Context, key string, value []byte, opts ...CallOption) (int64, error) {
	cfg := k.c.options(opts)
	return k.put(ctx, &beaconv1.KVPutRequest{Namespace: cfg.namespace, Key: key, Value: value, Fence: cfg.fence})
}

// CompareAndSwap writes a key only if its revision is revision (0: only
// if it does not exist); otherwise ErrCompareFailed and nothing changes.
func (k *KV) CompareAndSwap(ctx context.Context, key string, value []byte, revision int64, opts ...CallOption) (int64, error) {
	cfg := k.c.options(opts)
	return k.put(ctx, &beaconv1.KVPutRequest{Namespace: cfg.namespace, Key: key, Value: value, ExpectedRevision: &revision, Fence: cfg.fence})
}

func (k *KV) put(ctx context.Context, req *beaconv1.KVPutRequest) (int64, error) {
	return kvCall(ctx, k, once, func(ctx context.Context, s beaconv1connect.KVServiceClient) (int64, error) {
		resp, err := s.Put(ctx, connect.NewRequest(req))
		if err != nil {
			return 0, err
		}
		return resp.Msg.GetRevision(), nil
	})
}

// Delete deletes a key; found is false when there was none.
func (k *KV) Delete(ctx context.Context, key string, opts ...CallOption) (found bool, revision int64, err error) {
	cfg := k.c.options(opts)
	return k.del(ctx, &beaconv1.KVDeleteRequest{Namespace: cfg.namespace, Key: key, Fence: cfg.fence})
}

// CompareAndDelete deletes a key only if its revision is revision.
func (k *KV) CompareAndDelete(ctx context.Context, key string, revision int64, opts ...CallOption) (int64, error) {
	cfg := k.c.options(opts)
	_, rev, err := k.del(ctx, &beaconv1.KVDeleteRequest{Namespace: cfg.namespace, Key: key, ExpectedRevision: &revision, Fence: cfg.fence})
	return rev, err
}

func (k *KV) del(ctx context.Context, req *beaconv1.KVDeleteRequest) (bool, int64, error) {
	resp, err := kvCall(ctx, k, once, func(ctx context.Context, s beaconv1connect.KVServiceClient) (*beaconv1.KVDeleteResponse, error) {
		resp, err := s.Delete(ctx, connect.NewRequest(req))
		if err != nil {
			return nil, err
		}
		return resp.Msg, nil
	})
	return resp.GetFound(), resp.GetRevision(), err
}

// KVOp is one operation of a transaction: OpPut, OpDelete or OpCheck.
type KVOp struct{ p *beaconv1.KVOp }

// OpPut writes key.
func OpPut(key string, value []byte) KVOp {
	return KVOp{&beaconv1.KVOp{Type: beaconv1.KVOp_TYPE_PUT, Key: key, Value: value}}
}

// OpDelete deletes key.
func OpDelete(key string) KVOp {
	return KVOp{&beaconv1.KVOp{Type: beaconv1.KVOp_TYPE_DELETE, Key: key}}
}

// OpCheck writes nothing: the transaction happens only if key's revision
// is revision (0: the key does not exist).
func OpCheck(key string, revision int64) KVOp {
	return KVOp{&beaconv1.KVOp{Type: beaconv1.KVOp_TYPE_CHECK, Key: key, ExpectedRevision: &revision}}
}

// IfRevision makes a put or a delete also compare the key's revision.
func (o KVOp) IfRevision(revision int64) KVOp {
	p := proto.CloneOf(o.p)
	p.ExpectedRevision = &revision
	return KVOp{p}
}

// Txn applies ops (each key once) all at once, in one revision, or none
// of them (ErrCompareFailed when a compare did not hold).
func (k *KV) Txn(ctx context.Context, ops []KVOp, opts ...CallOption) (int64, error) {
	cfg := k.c.options(opts)
	req := &beaconv1.KVTxnRequest{Namespace: cfg.namespace, Fence: cfg.fence}
	for _, o := range ops {
		req.Ops = append(req.Ops, o.p)
	}
	return kvCall(ctx, k, once, func(ctx context.Context, s beaconv1connect.KVServiceClient) (int64, error) {
		resp, err := s.Txn(ctx, connect.NewRequest(req))
		if err != nil {
			return 0, err
		}
		return resp.Msg.GetRevision(), nil
	})
}

// History returns the kept versions of a key, oldest first; the last is
// the current one (or the key's deletion).
func (k *KV) History(ctx context.Context, key string, opts ...CallOption) ([]KeyVersion, error) {
	req := &beaconv1.KVHistoryRequest{Namespace: k.c.options(opts).namespace, Key: key}
	return kvCall(ctx, k, repeatable, func(ctx context.Context, s beaconv1connect.KVServiceClient) ([]KeyVersion, error) {
		resp, err := s.History(ctx, connect.NewRequest(req))
		if err != nil {
			return nil, err
		}
		var out []KeyVersion
		for _, v := range resp.Msg.GetVersions() {
			out = append(out, KeyVersion{Revision: v.GetRevision(), Value: v.GetValue(), Deleted: v.GetDeleted(), Time: v.GetTime().AsTime(), Accessor: v.GetAccessor(), RollbackOf: v.GetRollbackOf()})
		}
		return out, nil
	})
}

// Rollback writes the version of revision toRevision again, as a new
// version, and returns its revision.
func (k *KV) Rollback(ctx context.Context, key string, toRevision int64, opts ...CallOption) (int64, error) {
	req := &beaconv1.KVRollbackRequest{Namespace: k.c.options(opts).namespace, Key: key, ToRevision: toRevision}
	return kvCall(ctx, k, once, func(ctx context.Context, s beaconv1connect.KVServiceClient) (int64, error) {
		resp, err := s.Rollback(ctx, connect.NewRequest(req))
		if err != nil {
			return 0, err
		}
		return resp.Msg.GetRevision(), nil
	})
}

// KVState is the state of watched keys at a revision. Values (and
// Rollouts) are never modified once handed out.
type KVState struct {
	Revision int64
	Values   map[string]KeyValue
	// Rollouts are the watched keys' staged rollouts (WithRollouts).
	Rollouts map[string]Rollout
}

// Rollout is a key's staged rollout (docs/kv.md, "Staged rollout"): a
// value for the readers it selects.
type Rollout struct {
	Revision int64 // the rollout's own: what its readers report applying
	Value    []byte
	// Selector: readers whose labels include all of Labels, and of them
	// Percent (0 or 100: all) by a stable hash of an identity.
	Labels       map[string]string
	Percent      int32
	BaseRevision int64 // the key's revision when the rollout started
}

func rolloutFromProto(kv *beaconv1.KeyValue, r *beaconv1.KVRollout) Rollout {
	return Rollout{Revision: kv.GetModRevision(), Value: r.GetValue(), Labels: r.GetLabels(), Percent: r.GetPercent(), BaseRevision: r.GetBaseRevision()}
}

// WithRollouts makes a KV watch include the watched keys' staged rollouts
// (KVState.Rollouts).
func WithRollouts() CallOption { return func(c *callConfig) { c.rollouts = true } }

// KVWatcher follows a key or a prefix of keys. It resumes after a broken
// stream, on another server if need be, from the revision it holds: it
// never steps back to an older state.
type KVWatcher struct {
	k       *KV
	req     *beaconv1.KVWatchRequest
	cancel  context.CancelFunc
	done    chan struct{}
	changed chan struct{} // capacity 1: the state moved on

	mu    sync.Mutex
	state KVState // guarded by mu
	err   error   // guarded by mu; why the watcher stopped
	given int64   // guarded by mu; the revision Next last returned
}

// Watch follows key, or every key starting with key with prefix. The
// first Next returns the whole state.
func (k *KV) Watch(ctx context.Context, key string, prefix bool, opts ...CallOption) (*KVWatcher, error) {
	if prefix {
		if err := registry.ValidateKeyPrefix("key", key); err != nil {
			return nil, err
		}
	} else if err := registry.ValidateKey("key", key); err != nil {
		return nil, err
	}
	wctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	cfg := k.c.options(opts)
	w := &KVWatcher{
		k: k, cancel: cancel, done: make(chan struct{}), changed: make(chan struct{}, 1), given: -1,
		req: &beaconv1.KVWatchRequest{Namespace: cfg.namespace, Key: key, Prefix: prefix, IncludeRollouts: cfg.rollouts, Heartbeat: durationpb.New(k.c.watchHeartbeat)},
	}
	if !k.c.ownStream(w) {
		cancel()
		return nil, ErrClosed
	}
	go w.run(wctx) // owned by the watcher: Close (or the client's) stops it
	return w, nil
}

// Next waits for a state newer than the one it last returned.
func (w *KVWatcher) Next(ctx context.Context) (KVState, error) {
	for {
		w.mu.Lock()
		st, err, given := w.state, w.err, w.given
		if st.Values != nil && st.Revision > given {
			w.given = st.Revision
			w.mu.Unlock()
			return st, nil
		}
		w.mu.Unlock()
		if err != nil {
			return KVState{}, err
		}
		select {
		case <-w.changed:
		case <-ctx.Done():
			return KVState{}, ctx.Err()
		}
	}
}

// Close stops the watcher and waits for its goroutine.
func (w *KVWatcher) Close() {
	w.cancel()
	<-w.done
	w.k.c.disownStream(w)
}

func (w *KVWatcher) notify() {
	select {
	case w.changed <- struct{}{}:
	default:
	}
}

// run keeps a stream open, applying what it receives, until the watcher
// closes or the server refuses it for good (a permission, a bad request).
func (w *KVWatcher) run(ctx context.Context) {
	defer close(w.done)
	err := followStreams(ctx, w.k.c, w.stream)
	w.mu.Lock()
	if w.err == nil {
		w.err = err
	}
	w.mu.Unlock()
	w.notify()
}

// followStreams runs stream again and again — on the next server after a
// failure, after a jittered backoff — until ctx ends (ErrClosed) or a
// server refuses it for good: a permission, credentials, a bad request
// (that error). The KV and leader watchers follow their streams with it.
func followStreams(ctx context.Context, c *Client, stream func(context.Context) error) error {
	bo := backoff.New(backoff.DefaultConfig)
	for ctx.Err() == nil {
		err := stream(ctx)
		if ctx.Err() != nil {
			break
		}
		switch connect.CodeOf(err) {
		case connect.CodePermissionDenied, connect.CodeUnauthenticated, connect.CodeInvalidArgument:
			return kvError(err)
		}
		c.suspect(c.current.Load())
		if bo.Wait(ctx) != nil {
			break
		}
	}
	return ErrClosed
}

// stream runs one stream from the state's revision. A stream quiet for
// three heartbeats (a server that hangs) is given up.
func (w *KVWatcher) stream(ctx context.Context) error {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	quiet := 3 * w.k.c.watchHeartbeat
	watchdog := time.AfterFunc(quiet, cancel)
	defer watchdog.Stop()
	req := proto.CloneOf(w.req)
	w.mu.Lock()
	req.AfterRevision = w.state.Revision
	w.mu.Unlock()
	s := w.k.c.kvs[w.k.c.current.Load()]
	st, err := s.Watch(sctx, connect.NewRequest(req))
	if err != nil {
		return err
	}
	defer st.Close()
	var pending []*beaconv1.KVWatchResponse // parts of one revision (more)
	for st.Receive() {
		watchdog.Reset(quiet)
		m := st.Msg()
		pending = append(pending, m)
		if m.GetMore() {
			continue
		}
		w.apply(pending)
		pending = nil
	}
	return st.Err()
}

// apply folds the parts of one message into a new state.
func (w *KVWatcher) apply(parts []*beaconv1.KVWatchResponse) {
	w.mu.Lock()
	defer w.mu.Unlock()
	rev := parts[len(parts)-1].GetRevision()
	// The state's maps are shared with readers and never modified: what
	// changes is copied first, what does not is shared with the next state.
	next, plans := w.state.Values, w.state.Rollouts
	ownValues, ownPlans := false, false
	if parts[0].GetFullState() || w.state.Values == nil {
		next, plans = map[string]KeyValue{}, map[string]Rollout{}
		ownValues, ownPlans = true, true
	}
	for _, p := range parts {
		for _, ev := range p.GetEvents() {
			key := ev.GetKv().GetKey()
			if ev.GetIsRollout() && !ownPlans {
				plans, ownPlans = cloneMap(plans), true
			} else if !ev.GetIsRollout() && !ownValues {
				next, ownValues = cloneMap(next), true
			}
			switch {
			case ev.GetIsRollout() && ev.GetDeleted():
				delete(plans, key)
			case ev.GetIsRollout():
				plans[key] = rolloutFromProto(ev.GetKv(), ev.GetRollout())
			case ev.GetDeleted():
				delete(next, key)
			default:
				next[key] = kvFromProto(ev.GetKv())
			}
		}
	}
	if rev < w.state.Revision {
		return // never step back (a server behind would not send it)
	}
	changed := rev > w.state.Revision || w.state.Values == nil
	w.state = KVState{Revision: rev, Values: next, Rollouts: plans}
	if changed {
		w.notify()
	}
}

// cloneMap copies m (never nil, unlike maps.Clone of nil).
func cloneMap[V any](m map[string]V) map[string]V {
	if m == nil {
		return map[string]V{}
	}
	return maps.Clone(m)
}

// ReportApplied tells the server that this instance (session s, named
// label, or the session if "") applied revision of key — or, with a
// non-nil applyErr, refused it — so that operators see who runs which
// version (Applied, `beacon kv rollout status`). The report goes when
// the session ends.
func (k *KV) ReportApplied(ctx context.Context, key string, s *Session, label string, revision int64, applyErr error, opts ...CallOption) error {
	id, _ := s.Lease()
	req := &beaconv1.KVReportAppliedRequest{Namespace: k.c.options(opts).namespace, Key: key, SessionId: id, Label: label, Revision: revision}
	if applyErr != nil {
		req.Error = applyErr.Error()
		if len(req.Error) > 1024 {
			req.Error = req.Error[:1021] + "..."
		}
	}
	_, err := kvCall(ctx, k, repeatable, func(ctx context.Context, c beaconv1connect.KVServiceClient) (struct{}, error) {
		_, err := c.ReportApplied(ctx, connect.NewRequest(req))
		return struct{}{}, err
	})
	return err
}

// AppliedReport is one instance's last report on a key.
type AppliedReport struct {
	SessionID int64
	Label     string
	Revision  int64
	Error     string // why Revision was refused ("" : applied)
	Time      time.Time
}

// Applied returns the instances' reports on key and the key's current
// revision (0: it does not exist).
func (k *KV) Applied(ctx context.Context, key string, opts ...CallOption) ([]AppliedReport, int64, error) {
	req := &beaconv1.KVAppliedRequest{Namespace: k.c.options(opts).namespace, Key: key}
	resp, err := kvCall(ctx, k, repeatable, func(ctx context.Context, c beaconv1connect.KVServiceClient) (*beaconv1.KVAppliedResponse, error) {
		resp, err := c.Applied(ctx, connect.NewRequest(req))
		if err != nil {
			return nil, err
		}
		return resp.Msg, nil
	})
	if err != nil {
		return nil, 0, err
	}
	out := make([]AppliedReport, 0, len(resp.GetReports()))
	for _, r := range resp.GetReports() {
		out = append(out, AppliedReport{SessionID: r.GetSessionId(), Label: r.GetLabel(), Revision: r.GetRevision(), Error: r.GetError(), Time: r.GetTime().AsTime()})
	}
	return out, resp.GetCurrentRevision(), nil
}

// StartRollout publishes value to the readers of key that the selector
// picks (labels all matching, and percent of them; 0 or 100: all), and
// returns the rollout's revision. One rollout per key at a time.
func (k *KV) StartRollout(ctx context.Context, key string, value []byte, labels map[string]string, percent int32, opts ...CallOption) (int64, error) {
	req := &beaconv1.KVStartRolloutRequest{Namespace: k.c.options(opts).namespace, Key: key, Value: value, Labels: labels, Percent: percent}
	return kvCall(ctx, k, once, func(ctx context.Context, c beaconv1connect.KVServiceClient) (int64, error) {
		resp, err := c.StartRollout(ctx, connect.NewRequest(req))
		if err != nil {
			return 0, err
		}
		return resp.Msg.GetRevision(), nil
	})
}

// EndRollout ends key's rollout: promote writes its value as the key's
// new version (in the same transaction); otherwise it is aborted and its
// readers go back to the key's value.
func (k *KV) EndRollout(ctx context.Context, key string, promote bool, opts ...CallOption) (int64, error) {
	req := &beaconv1.KVEndRolloutRequest{Namespace: k.c.options(opts).namespace, Key: key, Promote: promote}
	return kvCall(ctx, k, once, func(ctx context.Context, c beaconv1connect.KVServiceClient) (int64, error) {
		resp, err := c.EndRollout(ctx, connect.NewRequest(req))
		if err != nil {
			return 0, err
		}
		return resp.Msg.GetRevision(), nil
	})
}

// RolloutStatus is a key's value, its rollout and who applied what.
type RolloutStatus struct {
	Current *KeyValue // nil: the key does not exist
	Rollout *Rollout  // nil: none running
	Reports []AppliedReport
}

// RolloutStatus reads key's value, its rollout and the apply reports.
func (k *KV) RolloutStatus(ctx context.Context, key string, opts ...CallOption) (RolloutStatus, error) {
	req := &beaconv1.KVRolloutStatusRequest{Namespace: k.c.options(opts).namespace, Key: key}
	resp, err := kvCall(ctx, k, repeatable, func(ctx context.Context, c beaconv1connect.KVServiceClient) (*beaconv1.KVRolloutStatusResponse, error) {
		resp, err := c.RolloutStatus(ctx, connect.NewRequest(req))
		if err != nil {
			return nil, err
		}
		return resp.Msg, nil
	})
	if err != nil {
		return RolloutStatus{}, err
	}
	var st RolloutStatus
	if resp.GetCurrent() != nil {
		cur := kvFromProto(resp.GetCurrent())
		st.Current = &cur
	}
	if resp.GetRollout() != nil {
		r := rolloutFromProto(&beaconv1.KeyValue{ModRevision: resp.GetRolloutRevision()}, resp.GetRollout())
		st.Rollout = &r
	}
	for _, r := range resp.GetReports() {
		st.Reports = append(st.Reports, AppliedReport{SessionID: r.GetSessionId(), Label: r.GetLabel(), Revision: r.GetRevision(), Error: r.GetError(), Time: r.GetTime().AsTime()})
	}
	return st, nil
}

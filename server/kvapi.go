package server

import (
	"context"
	"errors"
	"fmt"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/internal/acl"
	"beacon.dev/beacon/server/internal/kv"
)

// kvAPI serves the KV config API (docs/kv.md): reads from etcd
// (linearizable), writes through kv.Store, watches from the replica the
// view feeds.
type kvAPI struct{ s *Server }

var _ beaconv1connect.KVServiceHandler = kvAPI{}

// FencedHeader marks a KV write refused by its fence (the lock is no
// longer held with the write's token).
const FencedHeader = "Beacon-Fenced"

// Pages of KV.List: keys with their values, and keys only.
const (
	DefaultKVListLimit  = 100
	MaxKVListLimit      = 1000
	MaxKVListKeysOnly   = 10000
	maxKVListReplyBytes = 4 << 20
)

func needKey(ctx context.Context, ns, key string, need acl.Access) error {
	id := identityOf(ctx)
	if id.Authz.Key(ns, key) >= need {
		return nil
	}
	return deny(id, "key:"+need.String(), ns+"/"+key, "")
}

// kvKey validates the namespace and key (or lock name: field) a request
// names.
func kvKey(namespace, field, key string) (string, error) {
	ns, err := namespaceOf(namespace)
	if err == nil {
		err = registry.ValidateKey(field, key)
	}
	return ns, toConnectError(err)
}

// keyCall starts a call on one key: the server is ready, the namespace
// and key are valid, and the caller has need on the key.
func (k kvAPI) keyCall(ctx context.Context, namespace, key string, need acl.Access) (string, error) {
	if err := (api{k.s}).ready(); err != nil {
		return "", err
	}
	ns, err := kvKey(namespace, "key", key)
	if err != nil {
		return "", err
	}
	return ns, needKey(ctx, ns, key, need)
}

// kvError maps the KV store's errors onto codes.
func kvError(err error) error {
	var ce *kv.CompareError
	switch {
	case errors.As(err, &ce):
		return connect.NewError(connect.CodeFailedPrecondition, err)
	case errors.Is(err, kv.ErrFenced):
		// failed_precondition too, told apart from a compare by a header
		// (the SDK's ErrFenced).
		cerr := connect.NewError(connect.CodeFailedPrecondition, err)
		cerr.Meta().Set(FencedHeader, "true")
		return cerr
	case errors.Is(err, kv.ErrNoVersion):
		return connect.NewError(connect.CodeNotFound, err)
	case errors.Is(err, kv.ErrConflict):
		return connect.NewError(connect.CodeAborted, err)
	case errors.Is(err, kv.ErrNoRollout):
		return connect.NewError(connect.CodeNotFound, err)
	case errors.Is(err, kv.ErrRolloutExists):
		return connect.NewError(connect.CodeAlreadyExists, err)
	}
	return toConnectError(err)
}

func (k kvAPI) Get(ctx context.Context, req *connect.Request[beaconv1.KVGetRequest]) (*connect.Response[beaconv1.KVGetResponse], error) {
	ns, err := k.keyCall(ctx, req.Msg.GetNamespace(), req.Msg.GetKey(), acl.Read)
	if err != nil {
		return nil, err
	}
	got, rev, err := k.s.kv.Get(ctx, ns, req.Msg.GetKey())
	if err != nil {
		return nil, kvError(err)
	}
	if got == nil {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("key %q: not found in namespace %q", req.Msg.GetKey(), ns))
	}
	return connect.NewResponse(&beaconv1.KVGetResponse{Kv: got, Revision: rev}), nil
}

func (k kvAPI) List(ctx context.Context, req *connect.Request[beaconv1.KVListRequest]) (*connect.Response[beaconv1.KVListResponse], error) {
	if err := (api{k.s}).ready(); err != nil {
		return nil, err
	}
	m := req.Msg
	ns, err := namespaceOf(m.GetNamespace())
	if err == nil {
		err = registry.ValidateKeyPrefix("prefix", m.GetPrefix())
	}
	if err == nil && m.GetStartAfter() != "" {
		err = registry.ValidateKey("start_after", m.GetStartAfter())
	}
	if err != nil {
		return nil, toConnectError(err)
	}
	limit, most := int(m.GetLimit()), MaxKVListLimit
	if m.GetKeysOnly() {
		most = MaxKVListKeysOnly
	}
	switch {
	case limit == 0:
		limit = min(DefaultKVListLimit, most)
	case limit < 0 || limit > most:
		return nil, toConnectError(&registry.FieldError{Field: "limit", Reason: fmt.Sprintf("%d, must be between 1 and %d (%d with keys_only)", limit, MaxKVListLimit, MaxKVListKeysOnly)})
	}
	kvs, rev, more, err := k.s.kv.List(ctx, ns, m.GetPrefix(), m.GetStartAfter(), limit, m.GetKeysOnly())
	if err != nil {
		return nil, kvError(err)
	}
	resp := &beaconv1.KVListResponse{Revision: rev, More: more}
	authz, size := identityOf(ctx).Authz, 0
	for i, e := range kvs {
		if size > maxKVListReplyBytes {
			// A page of large values is cut short: the caller goes on
			// from the last key it got.
			resp.More = true
			break
		}
		if authz.Key(ns, e.GetKey()) < acl.Read {
			resp.ResultsFiltered = true
			continue
		}
		resp.Kvs = append(resp.Kvs, kvs[i])
		size += len(e.GetKey()) + len(e.GetValue())
	}
	return connect.NewResponse(resp), nil
}

// admitKeys refuses writes that would create more keys in a namespace
// than --max-kv-keys (counted from the replica, so a burst of creations
// may pass it by the writes in flight).
func (k kvAPI) admitKeys(ns string, keys []string) error {
	created := 0
	for _, key := range keys {
		if !k.s.kvReplica.Has(ns, key) {
			created++
		}
	}
	if created == 0 {
		return nil
	}
	if lim := k.s.cfg.Limits.MaxKVKeys; k.s.kvReplica.Count(ns)+created > lim {
		return k.s.limitError("max-kv-keys", "namespace %q holds %d KV keys, at most %d", ns, k.s.kvReplica.Count(ns), lim)
	}
	return nil
}

// kvOps validates the operations of a Put, Delete or Txn call (single:
// one Put or Delete, whose errors name the call's own fields) against
// the limits, and returns them as the store's, with the keys they put.
func kvOps(ops []*beaconv1.KVOp, single bool, maxOps, maxValue int) (out []kv.Op, put []string, err error) {
	if len(ops) == 0 {
		return nil, nil, &registry.FieldError{Field: "ops", Reason: "must not be empty"}
	}
	if len(ops) > maxOps {
		return nil, nil, &registry.FieldError{Field: "ops", Reason: fmt.Sprintf("has %d operations, at most %d (--max-kv-txn-ops)", len(ops), maxOps)}
	}
	field := func(i int, name string) string {
		if single {
			return name
		}
		return fmt.Sprintf("ops[%d].%s", i, name)
	}
	tooLarge := func(field string, size int) error {
		return &registry.FieldError{Field: field, Reason: fmt.Sprintf("is %d bytes, at most %d (--max-kv-value-bytes)", size, maxValue)}
	}
	out = make([]kv.Op, len(ops))
	seen := make(map[string]int, len(ops))
	size := 0
	for i, op := range ops {
		key := op.GetKey()
		if err := registry.ValidateKey(field(i, "key"), key); err != nil {
			return nil, nil, err
		}
		if j, dup := seen[key]; dup {
			return nil, nil, &registry.FieldError{Field: field(i, "key"), Value: key, Reason: fmt.Sprintf("is also ops[%d]'s: a transaction names each key once", j)}
		}
		seen[key] = i
		if op.ExpectedRevision != nil && op.GetExpectedRevision() < 0 {
			return nil, nil, &registry.FieldError{Field: field(i, "expected_revision"), Reason: fmt.Sprintf("%d, must be 0 (absent) or a revision", op.GetExpectedRevision())}
		}
		o := kv.Op{Key: key, Expected: op.GetExpectedRevision(), HasExpected: op.ExpectedRevision != nil}
		switch op.GetType() {
		case beaconv1.KVOp_TYPE_PUT:
			o.Type, o.Value = kv.Put, op.GetValue()
			if len(o.Value) > maxValue {
				return nil, nil, tooLarge(field(i, "value"), len(o.Value))
			}
			size += len(o.Value)
			put = append(put, key)
		case beaconv1.KVOp_TYPE_DELETE:
			o.Type = kv.Delete
		case beaconv1.KVOp_TYPE_CHECK:
			if !o.HasExpected {
				return nil, nil, &registry.FieldError{Field: field(i, "expected_revision"), Reason: "a CHECK needs one (0: the key must not exist)"}
			}
			o.Type = kv.Check
		default:
			return nil, nil, &registry.FieldError{Field: field(i, "type"), Value: op.GetType().String(), Reason: "must be PUT, DELETE or CHECK"}
		}
		if o.Type != kv.Put && len(op.GetValue()) > 0 {
			return nil, nil, &registry.FieldError{Field: field(i, "value"), Reason: "only a PUT carries a value"}
		}
		out[i] = o
	}
	if size > maxValue {
		return nil, nil, tooLarge("values", size)
	}
	return out, put, nil
}

func (k kvAPI) Put(ctx context.Context, req *connect.Request[beaconv1.KVPutRequest]) (*connect.Response[beaconv1.KVPutResponse], error) {
	rev, _, err := k.commit(ctx, req.Msg.GetNamespace(), []*beaconv1.KVOp{{
		Type: beaconv1.KVOp_TYPE_PUT, Key: req.Msg.GetKey(), Value: req.Msg.GetValue(), ExpectedRevision: req.Msg.ExpectedRevision,
	}}, req.Msg.GetFence(), true)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&beaconv1.KVPutResponse{Revision: rev}), nil
}

func (k kvAPI) Delete(ctx context.Context, req *connect.Request[beaconv1.KVDeleteRequest]) (*connect.Response[beaconv1.KVDeleteResponse], error) {
	rev, wrote, err := k.commit(ctx, req.Msg.GetNamespace(), []*beaconv1.KVOp{{
		Type: beaconv1.KVOp_TYPE_DELETE, Key: req.Msg.GetKey(), ExpectedRevision: req.Msg.ExpectedRevision,
	}}, req.Msg.GetFence(), true)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&beaconv1.KVDeleteResponse{Revision: rev, Found: wrote}), nil
}

func (k kvAPI) Txn(ctx context.Context, req *connect.Request[beaconv1.KVTxnRequest]) (*connect.Response[beaconv1.KVTxnResponse], error) {
	rev, _, err := k.commit(ctx, req.Msg.GetNamespace(), req.Msg.GetOps(), req.Msg.GetFence(), false)
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&beaconv1.KVTxnResponse{Revision: rev}), nil
}

// commit validates, authorizes and admits ops, then writes them in one
// etcd transaction. single: the ops are one Put or Delete call's, whose
// errors name the call's own fields.
func (k kvAPI) commit(ctx context.Context, namespace string, ops []*beaconv1.KVOp, f *beaconv1.Fence, single bool) (int64, bool, error) {
	if err := (api{k.s}).ready(); err != nil {
		return 0, false, err
	}
	ns, err := namespaceOf(namespace)
	if err != nil {
		return 0, false, toConnectError(err)
	}
	lim := k.s.cfg.Limits
	out, put, err := kvOps(ops, single, lim.MaxKVTxnOps, lim.MaxKVValueBytes)
	if err != nil {
		return 0, false, toConnectError(err)
	}
	for _, op := range out {
		need := acl.Write
		if op.Type == kv.Check {
			need = acl.Read // a compare reveals the key's revision
		}
		if err := needKey(ctx, ns, op.Key, need); err != nil {
			return 0, false, err
		}
	}
	fence, err := k.s.fenceOf(ns, f)
	if err != nil {
		return 0, false, err
	}
	if err := k.admitKeys(ns, put); err != nil {
		return 0, false, err
	}
	res, err := k.s.kv.Commit(ctx, ns, out, identityOf(ctx).Accessor, fence)
	if errors.Is(err, kv.ErrFenced) {
		k.s.metrics.fenced.Inc()
	}
	if err != nil {
		return 0, false, kvError(err)
	}
	return res.Revision, res.Wrote, nil
}

func (k kvAPI) History(ctx context.Context, req *connect.Request[beaconv1.KVHistoryRequest]) (*connect.Response[beaconv1.KVHistoryResponse], error) {
	ns, err := k.keyCall(ctx, req.Msg.GetNamespace(), req.Msg.GetKey(), acl.Read)
	if err != nil {
		return nil, err
	}
	versions, rev, skipped, err := k.s.kv.History(ctx, ns, req.Msg.GetKey())
	if err != nil {
		return nil, kvError(err)
	}
	if skipped > 0 {
		k.s.log.Warn("kv: history records that do not decode were left out (edited outside beacon?)", "namespace", ns, "key", req.Msg.GetKey(), "records", skipped)
	}
	return connect.NewResponse(&beaconv1.KVHistoryResponse{Versions: versions, Revision: rev}), nil
}

func (k kvAPI) Rollback(ctx context.Context, req *connect.Request[beaconv1.KVRollbackRequest]) (*connect.Response[beaconv1.KVRollbackResponse], error) {
	if err := (api{k.s}).ready(); err != nil {
		return nil, err
	}
	m := req.Msg
	ns, err := kvKey(m.GetNamespace(), "key", m.GetKey())
	if err != nil {
		return nil, err
	}
	if m.GetToRevision() <= 0 {
		return nil, toConnectError(&registry.FieldError{Field: "to_revision", Reason: fmt.Sprintf("%d, must be a revision from the key's history", m.GetToRevision())})
	}
	if m.ExpectedRevision != nil && m.GetExpectedRevision() < 0 {
		return nil, toConnectError(&registry.FieldError{Field: "expected_revision", Reason: fmt.Sprintf("%d, must be 0 (absent) or a revision", m.GetExpectedRevision())})
	}
	if err := needKey(ctx, ns, m.GetKey(), acl.Write); err != nil {
		return nil, err
	}
	if err := k.admitKeys(ns, []string{m.GetKey()}); err != nil {
		return nil, err
	}
	res, err := k.s.kv.Rollback(ctx, ns, m.GetKey(), m.GetToRevision(), m.GetExpectedRevision(), m.ExpectedRevision != nil, identityOf(ctx).Accessor)
	if err != nil {
		return nil, kvError(err)
	}
	return connect.NewResponse(&beaconv1.KVRollbackResponse{Revision: res.Revision}), nil
}

// maxKVWatchMessageBytes is where a watch message is split (a single
// larger value goes alone): see KVWatchResponse.more.
const maxKVWatchMessageBytes = 256 << 10

func (k kvAPI) Watch(ctx context.Context, req *connect.Request[beaconv1.KVWatchRequest], stream *connect.ServerStream[beaconv1.KVWatchResponse]) error {
	if err := (api{k.s}).ready(); err != nil {
		return err
	}
	m := req.Msg
	ns, err := namespaceOf(m.GetNamespace())
	if err == nil {
		if m.GetPrefix() {
			err = registry.ValidateKeyPrefix("key", m.GetKey())
		} else {
			err = registry.ValidateKey("key", m.GetKey())
		}
	}
	if err == nil && m.GetAfterRevision() < 0 {
		err = &registry.FieldError{Field: "after_revision", Reason: fmt.Sprintf("%d, must be 0 (start with the whole state) or a revision", m.GetAfterRevision())}
	}
	if err != nil {
		return toConnectError(err)
	}
	heartbeat, err := heartbeatOf(m.GetHeartbeat())
	if err != nil {
		return err
	}
	authz := identityOf(ctx).Authz
	if !m.GetPrefix() {
		// One key: refused outright. A prefix is filtered key by key.
		if err := needKey(ctx, ns, m.GetKey(), acl.Read); err != nil {
			return err
		}
	}
	giveBack, err := k.s.openWatchStream(ctx)
	if err != nil {
		return err
	}
	defer giveBack()
	var atLeast int64
	if m.GetAfterRevision() == 0 {
		// The whole state holds every write acknowledged before the watch
		// began (if etcd answers within the read timeout).
		(api{k.s}).catchUp(ctx)
		atLeast = k.s.view.Revision()
	}
	sub := k.s.kvReplica.Subscribe(ns, m.GetKey(), m.GetPrefix(), m.GetIncludeRollouts(), m.GetAfterRevision(), atLeast, func(key string) bool { return authz.Key(ns, key) >= acl.Read })
	defer sub.Close()
	valid := recheck(ctx)
	var quiet *time.Timer
	var quietC <-chan time.Time
	if heartbeat > 0 {
		quiet = time.NewTimer(heartbeat)
		defer quiet.Stop()
		quietC = quiet.C
	}
	for {
		resp, err := sub.Next(ctx, quietC)
		if quiet != nil {
			quiet.Reset(heartbeat)
		}
		if verr := valid(); verr != nil {
			return verr
		}
		if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
			if err := stream.Send(&beaconv1.KVWatchResponse{Revision: sub.Cursor()}); err != nil {
				return nil
			}
			continue
		}
		if err != nil {
			return nil // the client went away or the server is stopping
		}
		for _, part := range splitKVMessage(resp) {
			if err := stream.Send(part); err != nil {
				return nil // gone, or cut after --write-timeout without reading
			}
		}
	}
}

// splitKVMessage cuts a watch message into parts of about
// maxKVWatchMessageBytes, every part but the last marked more.
func splitKVMessage(resp *beaconv1.KVWatchResponse) []*beaconv1.KVWatchResponse {
	if len(resp.GetEvents()) <= 1 {
		return []*beaconv1.KVWatchResponse{resp} // one event goes alone whatever its size
	}
	var parts []*beaconv1.KVWatchResponse
	cur := &beaconv1.KVWatchResponse{Revision: resp.GetRevision(), FullState: resp.GetFullState()}
	size := 0
	for _, ev := range resp.GetEvents() {
		n := proto.Size(ev)
		if size > 0 && size+n > maxKVWatchMessageBytes {
			cur.More = true
			parts = append(parts, cur)
			cur = &beaconv1.KVWatchResponse{Revision: resp.GetRevision()}
			size = 0
		}
		cur.Events = append(cur.Events, ev)
		size += n
	}
	return append(parts, cur)
}

// Bounds of an apply report.
const (
	MaxAppliedLabelBytes = 128
	MaxAppliedErrorBytes = 1 << 10
)

func (k kvAPI) ReportApplied(ctx context.Context, req *connect.Request[beaconv1.KVReportAppliedRequest]) (*connect.Response[beaconv1.KVReportAppliedResponse], error) {
	if err := (api{k.s}).ready(); err != nil {
		return nil, err
	}
	m := req.Msg
	ns, err := kvKey(m.GetNamespace(), "key", m.GetKey())
	if err != nil {
		return nil, err
	}
	switch {
	case m.GetSessionId() == 0:
		err = &registry.FieldError{Field: "session_id", Reason: "must name the reporting instance's session"}
	case len(m.GetLabel()) > MaxAppliedLabelBytes:
		err = &registry.FieldError{Field: "label", Reason: fmt.Sprintf("is %d bytes, at most %d", len(m.GetLabel()), MaxAppliedLabelBytes)}
	case len(m.GetError()) > MaxAppliedErrorBytes:
		err = &registry.FieldError{Field: "error", Reason: fmt.Sprintf("is %d bytes, at most %d", len(m.GetError()), MaxAppliedErrorBytes)}
	case m.GetRevision() < 0:
		err = &registry.FieldError{Field: "revision", Reason: fmt.Sprintf("%d, must be a revision", m.GetRevision())}
	}
	if err != nil {
		return nil, toConnectError(err)
	}
	if err := needKey(ctx, ns, m.GetKey(), acl.Read); err != nil {
		return nil, err
	}
	if err := (api{k.s}).needKeepAlive(ctx, m.GetSessionId()); err != nil {
		return nil, err
	}
	if err := k.s.kvApplied.Report(ctx, ns, m.GetKey(), m.GetSessionId(), m.GetLabel(), m.GetRevision(), m.GetError()); err != nil {
		if errors.Is(err, kv.ErrSessionNotFound) {
			return nil, connect.NewError(connect.CodeNotFound, err)
		}
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&beaconv1.KVReportAppliedResponse{}), nil
}

func (k kvAPI) Applied(ctx context.Context, req *connect.Request[beaconv1.KVAppliedRequest]) (*connect.Response[beaconv1.KVAppliedResponse], error) {
	ns, err := k.keyCall(ctx, req.Msg.GetNamespace(), req.Msg.GetKey(), acl.Read)
	if err != nil {
		return nil, err
	}
	reports, err := k.s.kvApplied.List(ctx, ns, req.Msg.GetKey())
	if err != nil {
		return nil, toConnectError(err)
	}
	cur, _, err := k.s.kv.Get(ctx, ns, req.Msg.GetKey())
	if err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&beaconv1.KVAppliedResponse{Reports: reports, CurrentRevision: cur.GetModRevision()}), nil
}

// Bounds of a rollout's selector.
const (
	MaxRolloutLabels     = 16
	MaxRolloutLabelBytes = 128
)

func (k kvAPI) StartRollout(ctx context.Context, req *connect.Request[beaconv1.KVStartRolloutRequest]) (*connect.Response[beaconv1.KVStartRolloutResponse], error) {
	if err := (api{k.s}).ready(); err != nil {
		return nil, err
	}
	m := req.Msg
	ns, err := kvKey(m.GetNamespace(), "key", m.GetKey())
	if err != nil {
		return nil, err
	}
	switch {
	case len(m.GetValue()) > k.s.cfg.Limits.MaxKVValueBytes:
		err = &registry.FieldError{Field: "value", Reason: fmt.Sprintf("is %d bytes, at most %d (--max-kv-value-bytes)", len(m.GetValue()), k.s.cfg.Limits.MaxKVValueBytes)}
	case m.GetPercent() < 0 || m.GetPercent() > 100:
		err = &registry.FieldError{Field: "percent", Reason: fmt.Sprintf("%d, must be between 0 and 100 (0: all the readers the labels select)", m.GetPercent())}
	case len(m.GetLabels()) > MaxRolloutLabels:
		err = &registry.FieldError{Field: "labels", Reason: fmt.Sprintf("has %d, at most %d", len(m.GetLabels()), MaxRolloutLabels)}
	}
	for lk, lv := range m.GetLabels() {
		if err == nil && (lk == "" || len(lk) > MaxRolloutLabelBytes || len(lv) > MaxRolloutLabelBytes) {
			err = &registry.FieldError{Field: "labels", Value: lk, Reason: fmt.Sprintf("names and values must be 1 to %d bytes (a name may not be empty)", MaxRolloutLabelBytes)}
		}
	}
	if err != nil {
		return nil, toConnectError(err)
	}
	if err := needKey(ctx, ns, m.GetKey(), acl.Write); err != nil {
		return nil, err
	}
	rev, err := k.s.kvRollouts.Start(ctx, ns, m.GetKey(), m.GetValue(), m.GetLabels(), m.GetPercent(), identityOf(ctx).Accessor)
	if err != nil {
		return nil, kvError(err)
	}
	return connect.NewResponse(&beaconv1.KVStartRolloutResponse{Revision: rev}), nil
}

func (k kvAPI) EndRollout(ctx context.Context, req *connect.Request[beaconv1.KVEndRolloutRequest]) (*connect.Response[beaconv1.KVEndRolloutResponse], error) {
	ns, err := k.keyCall(ctx, req.Msg.GetNamespace(), req.Msg.GetKey(), acl.Write)
	if err != nil {
		return nil, err
	}
	rev, err := k.s.kvRollouts.End(ctx, ns, req.Msg.GetKey(), req.Msg.GetPromote(), identityOf(ctx).Accessor)
	if err != nil {
		return nil, kvError(err)
	}
	return connect.NewResponse(&beaconv1.KVEndRolloutResponse{Revision: rev}), nil
}

func (k kvAPI) RolloutStatus(ctx context.Context, req *connect.Request[beaconv1.KVRolloutStatusRequest]) (*connect.Response[beaconv1.KVRolloutStatusResponse], error) {
	ns, err := k.keyCall(ctx, req.Msg.GetNamespace(), req.Msg.GetKey(), acl.Read)
	if err != nil {
		return nil, err
	}
	cur, _, err := k.s.kv.Get(ctx, ns, req.Msg.GetKey())
	if err != nil {
		return nil, toConnectError(err)
	}
	plan, planRev, err := k.s.kvRollouts.Get(ctx, ns, req.Msg.GetKey())
	if err != nil {
		return nil, toConnectError(err)
	}
	reports, err := k.s.kvApplied.List(ctx, ns, req.Msg.GetKey())
	if err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&beaconv1.KVRolloutStatusResponse{Current: cur, Rollout: plan, RolloutRevision: planRev, Reports: reports}), nil
}

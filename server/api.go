package server

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"connectrpc.com/connect"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"golang.org/x/sync/semaphore"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/internal/store"
	"beacon.dev/beacon/internal/wire"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/internal/acl"
	"beacon.dev/beacon/server/internal/view"
)

// api implements the registry service on the store (writes) and the view
// (reads and watches).
type api struct{ s *Server }

var _ beaconv1connect.RegistryServiceHandler = api{}

// readTimeout bounds how long a read waits for the view to catch up with
// etcd before it answers from what the view holds.
const readTimeout = 2 * time.Second

// toConnectError maps internal errors onto the codes clients act on.
func toConnectError(err error) error {
	var ce *connect.Error
	switch {
	case err == nil:
		return nil
	case errors.As(err, &ce):
		return err
	case errors.Is(err, registry.ErrInvalid):
		return connect.NewError(connect.CodeInvalidArgument, err)
	case errors.Is(err, store.ErrSessionNotFound):
		return connect.NewError(connect.CodeNotFound, err)
	case errors.Is(err, store.ErrConflict), errors.Is(err, store.ErrSettingsConflict):
		// The record kept changing under the write; the caller may retry.
		return connect.NewError(connect.CodeAborted, err)
	case errors.Is(err, rpctypes.ErrNoSpace), errors.Is(err, rpctypes.ErrGRPCNoSpace):
		// etcd's NOSPACE alarm: no server can write until space is freed
		// (docs/operations.md), so trying another one does not help.
		return connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("etcd is out of space (NOSPACE alarm; see --etcd-quota-backend-bytes): %w", err))
	case errors.Is(err, context.Canceled):
		return connect.NewError(connect.CodeCanceled, err)
	case errors.Is(err, context.DeadlineExceeded):
		return connect.NewError(connect.CodeDeadlineExceeded, err)
	default:
		// etcd errors: no leader, lost quorum, timeouts. Clients retry or
		// move to another server.
		return connect.NewError(connect.CodeUnavailable, err)
	}
}

// ownDeadlineInterceptor answers Unavailable, not DeadlineExceeded, when
// a call ran out of the server's own time for etcd while the caller's
// deadline still holds: etcd could not commit (no quorum, no leader), and
// the caller should hear that the registry is unavailable — a reason to
// try another server or later — not that its own deadline passed.
type ownDeadlineInterceptor struct{}

func (ownDeadlineInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		resp, err := next(ctx, req)
		if err != nil && ctx.Err() == nil && connect.CodeOf(err) == connect.CodeDeadlineExceeded {
			return nil, connect.NewError(connect.CodeUnavailable, fmt.Errorf("etcd did not answer within the server's deadline (no quorum or no leader?): %w", err))
		}
		return resp, err
	}
}

func (ownDeadlineInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (ownDeadlineInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

func (a api) ready() error {
	select {
	case <-a.s.ready:
		return nil
	default:
		return connect.NewError(connect.CodeUnavailable, errors.New("server: not ready yet"))
	}
}

// instanceKeyOf validates the namespace, service and id a request names.
func instanceKeyOf(namespace, service, id string) (registry.InstanceKey, error) {
	ns, err := namespaceOf(namespace)
	if err == nil {
		err = registry.ValidateName("service", service)
	}
	if err == nil {
		err = registry.ValidateID("id", id)
	}
	return registry.InstanceKey{Namespace: ns, Service: service, ID: id}, err
}

func instanceNotFound(k registry.InstanceKey) error {
	return connect.NewError(connect.CodeNotFound, fmt.Errorf("instance %s/%s/%s: not found", k.Namespace, k.Service, k.ID))
}

func namespaceOf(ns string) (string, error) {
	if ns == "" {
		return registry.DefaultNamespace, nil
	}
	return ns, registry.ValidateNamespace(ns)
}

func (a api) CreateSession(ctx context.Context, req *connect.Request[beaconv1.CreateSessionRequest]) (*connect.Response[beaconv1.CreateSessionResponse], error) {
	if err := a.ready(); err != nil {
		return nil, err
	}
	ttl := time.Duration(0)
	if d := req.Msg.GetTtl(); d != nil {
		if err := d.CheckValid(); err != nil {
			return nil, toConnectError(&registry.FieldError{Field: "ttl", Reason: err.Error()})
		}
		ttl = d.AsDuration()
	}
	who := identityOf(ctx)
	if a.s.acl != nil && (who.Session != 0 || !who.Authz.MayCreateSessions()) {
		return nil, deny(who, "service:write", "", "a session is made by a token that may register some service, or has session:write (not by a session credential)")
	}
	if n, max := a.s.view.SessionCount(), a.s.cfg.Limits.MaxSessions; n >= max {
		return nil, a.s.limitError("max-sessions", "%d live sessions, at most %d", n, max)
	}
	if a.s.acl != nil {
		if n, max := a.s.acl.SessionsOf(who.Accessor), a.s.cfg.Limits.MaxSessionsPerToken; n >= max {
			return nil, a.s.limitError("max-sessions-per-token", "token %s has %d live sessions, at most %d", who.Accessor, n, max)
		}
	}
	id, granted, err := a.s.store.CreateSession(ctx, ttl, req.Msg.GetName())
	if err != nil {
		return nil, toConnectError(err)
	}
	resp := &beaconv1.CreateSessionResponse{SessionId: id, Ttl: durationpb.New(granted)}
	if a.s.acl != nil {
		if resp.SessionToken, err = a.s.acl.BindSession(ctx, id, who.Accessor); err != nil {
			_ = a.s.store.CloseSession(context.WithoutCancel(ctx), id)
			return nil, toConnectError(err)
		}
	}
	return connect.NewResponse(resp), nil
}

func (a api) KeepAlive(ctx context.Context, req *connect.Request[beaconv1.KeepAliveRequest]) (*connect.Response[beaconv1.KeepAliveResponse], error) {
	if req.Msg.GetSessionId() == 0 {
		return nil, toConnectError(&registry.FieldError{Field: "session_id", Reason: "must be set"})
	}
	if err := a.needKeepAlive(ctx, req.Msg.GetSessionId()); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, keepAliveTimeout)
	defer cancel()
	ttl, err := a.keepAlive(ctx, req.Msg.GetSessionId())
	if err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&beaconv1.KeepAliveResponse{Ttl: durationpb.New(ttl)}), nil
}

func (a api) keepAlive(ctx context.Context, id int64) (time.Duration, error) {
	r := a.s.store.KeepAliveMany(ctx, []int64{id})[0]
	a.countKeepAlive(1, r.Err)
	return r.TTL, r.Err
}

// countKeepAlive counts n keepalives that ended with err; one that could
// not be forwarded to etcd in time is also counted as a refusal under a
// limit and logged (at most once a minute).
func (a api) countKeepAlive(n int, err error) {
	for range n {
		a.s.metrics.countKeepAlive(err)
	}
	if errors.Is(err, store.ErrOverloaded) {
		a.s.metrics.limitHits.WithLabelValues("keepalive-queue").Add(float64(n))
		if keepAliveOverloadLog.allow() {
			a.s.log.Warn("keepalives not forwarded to etcd in time: answered with an error, clients retry (counted in beacon_limit_refusals_total{limit=\"keepalive-queue\"})", "sessions", n)
		}
	}
}

var keepAliveOverloadLog = &logLimiter{every: time.Minute}

// maxKeepAliveBatch bounds the sessions one KeepAliveStream message renews;
// maxKeepAliveIDsInFlight the sessions of one stream being renewed, and
// maxKeepAliveBatchesInFlight its messages: a stream that pipelines huge
// batches (and reads no answer) waits for its own, and the server's queue
// to etcd (store.ErrOverloaded) holds at most two of them per stream.
// keepAliveTimeout bounds a renewal: past it the client gets an error
// result (neither ttl nor expired) and retries, the SDK with a unary call.
const (
	maxKeepAliveBatch           = 10000
	maxKeepAliveIDsInFlight     = 2 * maxKeepAliveBatch
	maxKeepAliveBatchesInFlight = 16
	keepAliveTimeout            = 5 * time.Second
)

// KeepAliveStream renews each message's sessions together and answers with
// one message; a batch still in etcd does not hold up the next one.
//
// One goroutine writes the answers, so nothing waits on the client's
// reading but that writer and the batches queued for it; the handler
// returns when ctx ends, or when the client half-closes and the batches in
// flight are answered. A write the client does not read is cut after
// --write-timeout (guardAPI).
func (a api) KeepAliveStream(ctx context.Context, stream *connect.BidiStream[beaconv1.KeepAliveBatch, beaconv1.KeepAliveBatchResult]) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// A batch weighs its ids, at least a 16th of the stream's share.
	inFlight := semaphore.NewWeighted(maxKeepAliveIDsInFlight)
	weight := func(n int) int64 { return int64(max(n, maxKeepAliveIDsInFlight/maxKeepAliveBatchesInFlight)) }
	var batches sync.WaitGroup
	results := make(chan *beaconv1.KeepAliveBatchResult, 1)
	writerDone := make(chan struct{})
	go func() { // the stream's only writer; owned by this handler
		defer close(writerDone)
		for resp := range results {
			if ctx.Err() != nil {
				continue // drain: the batches exit by ctx
			}
			if err := stream.Send(resp); err != nil {
				cancel() // gone, or cut for not reading
			}
		}
	}()
	halfClosed := false
	defer func() {
		if !halfClosed {
			cancel() // the batches and the writer stop at once
		}
		// After a half-close the batches in flight are answered first.
		batches.Wait()
		close(results)
		<-writerDone
	}()
	// Receive blocks on the request body, which a cancelled context does
	// not interrupt: read in a goroutine so that server shutdown ends this
	// handler at once. Returning closes the body, which ends the reader.
	reqs, recvDone := make(chan *beaconv1.KeepAliveBatch), make(chan struct{})
	go func() {
		defer close(recvDone)
		for {
			req, err := stream.Receive()
			if err != nil {
				return // the client closed the stream or went away
			}
			select {
			case reqs <- req:
			case <-ctx.Done():
				return
			}
		}
	}()
	for {
		var req *beaconv1.KeepAliveBatch
		select {
		case req = <-reqs:
		case <-recvDone:
			halfClosed = true
			return nil
		case <-ctx.Done():
			return nil
		}
		if err := stillValid(ctx); err != nil {
			return err
		}
		ids := req.GetSessionIds()
		if len(ids) > maxKeepAliveBatch {
			return toConnectError(&registry.FieldError{Field: "session_ids", Reason: fmt.Sprintf("must hold at most %d sessions, has %d", maxKeepAliveBatch, len(ids))})
		}
		for i, id := range ids {
			if id == 0 {
				return toConnectError(&registry.FieldError{Field: fmt.Sprintf("session_ids[%d]", i), Reason: "must be set"})
			}
			if err := a.needKeepAlive(ctx, id); err != nil {
				return err
			}
		}
		// A client that floods the stream waits here for its own batches;
		// it piles up neither goroutines nor renewals in the server.
		if err := inFlight.Acquire(ctx, weight(len(ids))); err != nil {
			return nil
		}
		batches.Add(1)
		go func() {
			defer batches.Done()
			defer inFlight.Release(weight(len(ids)))
			bctx, bcancel := context.WithTimeout(ctx, keepAliveTimeout)
			rs := a.s.store.KeepAliveMany(bctx, ids)
			bcancel()
			resp := &beaconv1.KeepAliveBatchResult{Results: make([]*beaconv1.KeepAliveResult, len(ids))}
			overloaded := 0
			for i, r := range rs {
				res := &beaconv1.KeepAliveResult{SessionId: ids[i]}
				switch {
				case r.Err == nil:
					res.Ttl = durationpb.New(r.TTL)
				case errors.Is(r.Err, store.ErrSessionNotFound):
					res.Expired = true
				case errors.Is(r.Err, store.ErrOverloaded):
					overloaded++
					resp.Results[i] = res
					continue // counted below, once for the batch
				}
				a.s.metrics.countKeepAlive(r.Err)
				resp.Results[i] = res
			}
			if overloaded > 0 {
				a.countKeepAlive(overloaded, store.ErrOverloaded)
			}
			select { // neither ttl nor expired: an error result, the client retries
			case results <- resp:
			case <-ctx.Done():
			}
		}()
	}
}

func (a api) CloseSession(ctx context.Context, req *connect.Request[beaconv1.CloseSessionRequest]) (*connect.Response[beaconv1.CloseSessionResponse], error) {
	if req.Msg.GetSessionId() == 0 {
		return nil, toConnectError(&registry.FieldError{Field: "session_id", Reason: "must be set"})
	}
	if err := needSession(ctx, req.Msg.GetSessionId()); err != nil {
		return nil, err
	}
	if err := a.s.store.CloseSession(ctx, req.Msg.GetSessionId()); err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&beaconv1.CloseSessionResponse{}), nil
}

// instanceForRegister turns a register request into a validated instance;
// the handler and FuzzRegisterJSON share it.
func instanceForRegister(msg *beaconv1.RegisterRequest) (*registry.Instance, error) {
	if msg.GetInstance() == nil {
		return nil, &registry.FieldError{Field: "instance", Reason: "must be set"}
	}
	in := wire.InstanceFromProto(msg.GetInstance())
	in.Revision = 0
	switch sid := msg.GetSessionId(); {
	case sid != 0 && in.SessionID != 0 && sid != in.SessionID:
		return nil, &registry.FieldError{Field: "instance.session_id", Reason: fmt.Sprintf("must be 0 or equal to session_id %d", sid)}
	case sid != 0:
		in.SessionID = sid
	}
	in.ApplyDefaults()
	if err := in.Validate(); err != nil {
		return nil, err
	}
	return &in, nil
}

func (a api) Register(ctx context.Context, req *connect.Request[beaconv1.RegisterRequest]) (*connect.Response[beaconv1.RegisterResponse], error) {
	if err := a.ready(); err != nil {
		return nil, err
	}
	in, err := instanceForRegister(req.Msg)
	if err == nil {
		err = a.s.targets.Check(in)
	}
	if err != nil {
		return nil, toConnectError(err)
	}
	guard, err := a.needRegister(ctx, in)
	if err != nil {
		return nil, err
	}
	if err := a.admit(in); err != nil {
		return nil, err
	}
	// A TTL check registered passing (or warning) has its TTL start now,
	// as in Consul: without a heartbeat its first probe would find it
	// silent and mark it critical before its TTL ran out.
	for _, c := range in.Checks {
		if c.Kind == registry.CheckTTL && c.Status != registry.HealthCritical {
			if err := a.s.store.RenewTTL(ctx, in.Key(), c.Name, c.Interval); err != nil {
				return nil, toConnectError(err)
			}
		}
	}
	var rev int64
	if guard != nil {
		rev, err = a.s.store.RegisterGuarded(ctx, in, keepObservations, guard)
	} else {
		rev, err = a.s.store.RegisterMerge(ctx, in, keepObservations)
	}
	if err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&beaconv1.RegisterResponse{Revision: rev}), nil
}

// RegisterBatch registers each instance as Register would, answering for
// each. Registration is idempotent, so an etcd failure fails the whole
// call (the client retries it, perhaps on another server) rather than
// leave the caller to sort out which writes landed.
func (a api) RegisterBatch(ctx context.Context, req *connect.Request[beaconv1.RegisterBatchRequest]) (*connect.Response[beaconv1.RegisterBatchResponse], error) {
	if err := a.ready(); err != nil {
		return nil, err
	}
	msgs := req.Msg.GetInstances()
	if lim := a.s.cfg.Limits.registerBatchMax(); len(msgs) > lim {
		return nil, a.s.limitError("max-register-batch", "%d instances in one RegisterBatch, at most %d (the least of --max-register-batch and the --write-burst* flags)", len(msgs), lim)
	}
	results := make([]*beaconv1.RegisterResult, len(msgs))
	var regs []store.Registration
	var at []int // regs[j] answers results[at[j]]
	seen := make(map[registry.InstanceKey]int, len(msgs))
	var added batchAdmission
	for i, m := range msgs {
		in, err := instanceForRegister(&beaconv1.RegisterRequest{Instance: m, SessionId: req.Msg.GetSessionId()})
		if err == nil {
			if j, dup := seen[in.Key()]; dup {
				err = &registry.FieldError{Field: fmt.Sprintf("instances[%d]", i), Reason: fmt.Sprintf("registers %s/%s again (already instances[%d]): each instance at most once per batch", in.Service, in.ID, j)}
			} else {
				seen[in.Key()] = i
			}
		}
		if err == nil {
			err = a.s.targets.Check(in)
		}
		var guard store.Guard
		if err == nil {
			guard, err = a.needRegister(ctx, in)
		}
		if err == nil {
			err = a.admitIn(in, &added)
		}
		if err != nil {
			results[i] = registerResult(0, err)
			continue
		}
		regs = append(regs, store.Registration{Instance: in, Merge: keepObservations, Guard: guard})
		at = append(at, i)
	}
	revs, errs := a.s.store.RegisterMany(ctx, regs)
	for j, err := range errs {
		if ctx.Err() != nil {
			return nil, toConnectError(ctx.Err())
		}
		if err != nil && connect.CodeOf(toConnectError(err)) == connect.CodeUnavailable {
			return nil, toConnectError(err)
		}
		results[at[j]] = registerResult(revs[j], err)
	}
	return connect.NewResponse(&beaconv1.RegisterBatchResponse{Results: results}), nil
}

func registerResult(rev int64, err error) *beaconv1.RegisterResult {
	if err == nil {
		return &beaconv1.RegisterResult{Revision: rev}
	}
	var ce *connect.Error
	errors.As(toConnectError(err), &ce)
	return &beaconv1.RegisterResult{ErrorCode: uint32(ce.Code()), Error: ce.Message(), Held: ce.Meta().Get(HeldHeader) != ""}
}

// batchAdmission counts what a batch admitted so far, which the view does
// not hold yet: new instances per service, and new services per namespace.
type batchAdmission struct {
	instances map[registry.ServiceKey]int
	services  map[string]int
}

// admit refuses a new instance past --max-instances-per-service, or the
// first instance of a new service past --max-services. Registering an
// instance again is always admitted. The counts come from the view, so
// concurrent registrations can overshoot by a few: the limits protect the
// server from a runaway client, not an exact budget.
func (a api) admit(in *registry.Instance) error { return a.admitIn(in, nil) }

// admitIn is admit within a batch: it counts the batch's earlier
// admissions (b; nil outside a batch) and records this one.
func (a api) admitIn(in *registry.Instance, b *batchAdmission) error {
	lim := a.s.cfg.Limits
	sk := registry.ServiceKey{Namespace: in.Namespace, Service: in.Service}
	snap := a.s.view.Snapshot(sk)
	if _, again := slices.BinarySearchFunc(snap.Instances, in.ID, func(have *registry.Instance, id string) int { return strings.Compare(have.ID, id) }); again {
		return nil // sorted by id: no scan of a 10,000-instance service per registration
	}
	var earlier, earlierServices int
	if b != nil {
		earlier, earlierServices = b.instances[sk], b.services[in.Namespace]
	}
	if n := len(snap.Instances) + earlier; n >= lim.MaxInstancesPerService {
		return a.s.limitError("max-instances-per-service", "service %q has %d instances, at most %d", in.Service, n, lim.MaxInstancesPerService)
	}
	newService := len(snap.Instances) == 0 && earlier == 0
	if newService {
		if n := a.s.view.ServiceCount(in.Namespace) + earlierServices; n >= lim.MaxServices {
			return a.s.limitError("max-services", "namespace %q has %d services, at most %d", in.Namespace, n, lim.MaxServices)
		}
	}
	if b != nil {
		if b.instances == nil {
			b.instances, b.services = map[registry.ServiceKey]int{}, map[string]int{}
		}
		b.instances[sk]++
		if newService {
			b.services[in.Namespace]++
		}
	}
	return nil
}

// keepObservations carries over what the registry, not the instance,
// decides when an instance is registered again: the state of checks whose
// spec did not change, and an operator's OUT_OF_SERVICE. cur is the record
// etcd holds, read by the store inside the write's group commit, which
// writes only if cur is still current — never this server's view, which
// may lag (just after a restart) or race a SetStatus or a check's write.
func keepObservations(cur, in *registry.Instance) { store.KeepObservations(cur, in) }

func (a api) SetStatus(ctx context.Context, req *connect.Request[beaconv1.SetStatusRequest]) (*connect.Response[beaconv1.SetStatusResponse], error) {
	if err := a.ready(); err != nil {
		return nil, err
	}
	k, err := instanceKeyOf(req.Msg.GetNamespace(), req.Msg.GetService(), req.Msg.GetId())
	status := registry.Status(req.Msg.GetStatus())
	if err == nil && (status <= registry.StatusUnspecified || status > registry.StatusOutOfService) {
		err = &registry.FieldError{Field: "status", Reason: "must be one of STARTING, UP, DRAINING, OUT_OF_SERVICE"}
	}
	if err != nil {
		return nil, toConnectError(err)
	}
	if err := a.needInstanceWrite(ctx, k); err != nil {
		return nil, err
	}
	var after registry.Instance
	var refused error
	rev, err := a.s.store.Update(ctx, k, func(in *registry.Instance) bool {
		if refused = mayChange(ctx, in); refused != nil {
			return false // the record changed hands since the check above
		}
		in.Status = status
		after = in.Clone()
		return true
	})
	if errors.Is(err, store.ErrInstanceNotFound) {
		return nil, instanceNotFound(k)
	}
	if err == nil {
		err = refused
	}
	if err != nil {
		return nil, toConnectError(err)
	}
	after.Revision = rev
	// Return once this server's view holds the change, so that a
	// registration that follows keeps the operator's status.
	wctx, cancel := context.WithTimeout(ctx, readTimeout)
	_ = a.s.view.WaitRevision(wctx, rev)
	cancel()
	return connect.NewResponse(&beaconv1.SetStatusResponse{Revision: rev, Instance: wire.InstanceToProto(&after)}), nil
}

func (a api) SetServiceConfig(ctx context.Context, req *connect.Request[beaconv1.SetServiceConfigRequest]) (*connect.Response[beaconv1.SetServiceConfigResponse], error) {
	if err := a.ready(); err != nil {
		return nil, err
	}
	ns, err := namespaceOf(req.Msg.GetNamespace())
	if err == nil {
		err = registry.ValidateName("service", req.Msg.GetService())
	}
	if err == nil {
		err = registry.ValidateProtectionThreshold(req.Msg.GetProtectionThreshold())
	}
	if err != nil {
		return nil, toConnectError(err)
	}
	if err := needGlobal(ctx, acl.Operator, acl.Write); err != nil {
		return nil, err
	}
	sk := registry.ServiceKey{Namespace: ns, Service: req.Msg.GetService()}
	var rev int64
	if req.Msg.GetUseDefault() {
		rev, err = a.s.store.DeleteServiceConfig(ctx, sk)
	} else {
		rev, err = a.s.store.PutServiceConfig(ctx, sk, req.Msg.GetProtectionThreshold())
	}
	if err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&beaconv1.SetServiceConfigResponse{Revision: rev}), nil
}

func (a api) UpdateCheck(ctx context.Context, req *connect.Request[beaconv1.UpdateCheckRequest]) (*connect.Response[beaconv1.UpdateCheckResponse], error) {
	if err := a.ready(); err != nil {
		return nil, err
	}
	msg := req.Msg
	k, err := instanceKeyOf(msg.GetNamespace(), msg.GetService(), msg.GetId())
	name := msg.GetCheck()
	if name == "" {
		name = "ttl"
	}
	if err == nil {
		err = registry.ValidateName("check", name)
	}
	status := registry.Health(msg.GetStatus())
	if err == nil && (status < registry.HealthPassing || status > registry.HealthCritical) {
		err = &registry.FieldError{Field: "status", Reason: "must be one of PASSING, WARNING, CRITICAL"}
	}
	if err == nil && len(msg.GetOutput()) > registry.MaxCheckOutputLen {
		err = &registry.FieldError{Field: "output", Reason: fmt.Sprintf("must be at most %d bytes, has %d", registry.MaxCheckOutputLen, len(msg.GetOutput()))}
	}
	if err != nil {
		return nil, toConnectError(err)
	}
	if err := a.needInstanceWrite(ctx, k); err != nil {
		return nil, err
	}
	in := a.s.view.Instance(k)
	if in == nil { // registered a moment ago? (catching up costs a probe write on old etcd: only when needed)
		a.catchUp(ctx)
		if in = a.s.view.Instance(k); in == nil {
			return nil, instanceNotFound(k)
		}
	}
	if who := identityOf(ctx); !actsForAnySession(who) && a.s.acl != nil {
		if err := ownedBy(who, in); err != nil {
			return nil, err // checked again here: it may have come after needInstanceWrite looked
		}
	}
	var spec *registry.Check
	for n := range in.Checks {
		if in.Checks[n].Name == name {
			spec = &in.Checks[n]
		}
	}
	if spec == nil || spec.Kind != registry.CheckTTL {
		return nil, toConnectError(&registry.FieldError{Field: "check", Reason: "the instance has no TTL check of that name", Value: name})
	}
	if err := a.s.store.RenewTTL(ctx, k, name, spec.Interval); err != nil {
		return nil, toConnectError(err)
	}
	// Only transitions are written — judged against the stored record, not
	// the view: the view may not have this client's previous update yet
	// (PASSING then CRITICAL in quick succession would drop the CRITICAL).
	var refused error
	rev, err := a.s.store.Update(ctx, k, func(in *registry.Instance) bool {
		if refused = mayChange(ctx, in); refused != nil {
			return false
		}
		for n := range in.Checks {
			if c := &in.Checks[n]; c.Name == name && c.Kind == registry.CheckTTL && c.Status != status {
				c.Status, c.Output, c.Since = status, msg.GetOutput(), time.Now()
				return true
			}
		}
		return false
	})
	if errors.Is(err, store.ErrInstanceNotFound) {
		return nil, instanceNotFound(k)
	}
	if err == nil {
		err = refused
	}
	if err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&beaconv1.UpdateCheckResponse{Revision: rev}), nil
}

func (a api) Deregister(ctx context.Context, req *connect.Request[beaconv1.DeregisterRequest]) (*connect.Response[beaconv1.DeregisterResponse], error) {
	k, err := instanceKeyOf(req.Msg.GetNamespace(), req.Msg.GetService(), req.Msg.GetId())
	if err != nil {
		return nil, toConnectError(err)
	}
	// A session deletes only instances still bound to it; 0 (operators)
	// deletes whatever is there.
	sid := req.Msg.GetSessionId()
	if err := needService(ctx, k.Namespace, k.Service, acl.Write); err != nil {
		return nil, err
	}
	if who := identityOf(ctx); !actsForAnySession(who) {
		switch {
		case who.Session != 0 && sid != 0 && sid != who.Session:
			return nil, needSession(ctx, sid)
		case who.Session != 0:
			sid = who.Session // a session credential deletes only its session's instances
		case sid != 0:
			return nil, needSession(ctx, sid)
		default:
			sid = store.PersistentOnly // a token deletes only instances of no session
		}
	}
	rev, found, err := a.s.store.DeregisterSession(ctx, k, sid)
	if err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&beaconv1.DeregisterResponse{Revision: rev, Found: found}), nil
}

// catchUp makes reads linearizable: it waits until the view holds every
// write etcd acknowledged before the read began. If etcd cannot be reached
// the read is served from the view as it is.
func (a api) catchUp(ctx context.Context) { a.catchUpWithin(ctx, readTimeout) }

// catchUpWithin is catchUp bounded by d.
func (a api) catchUpWithin(ctx context.Context, d time.Duration) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	rev, err := a.s.store.CurrentRevision(ctx)
	if err != nil {
		return
	}
	_ = a.s.view.WaitRevision(ctx, rev)
}

func (a api) ListInstances(ctx context.Context, req *connect.Request[beaconv1.ListInstancesRequest]) (*connect.Response[beaconv1.ListInstancesResponse], error) {
	if err := a.ready(); err != nil {
		return nil, err
	}
	ns, err := namespaceOf(req.Msg.GetNamespace())
	if err == nil {
		err = registry.ValidateName("service", req.Msg.GetService())
	}
	if err != nil {
		return nil, toConnectError(err)
	}
	who := identityOf(ctx)
	if who.Authz.Service(ns, req.Msg.GetService()) < acl.Read {
		// Filtered, not failed: as if the service had no instances.
		return connect.NewResponse(&beaconv1.ListInstancesResponse{ResultsFiltered: true}), nil
	}
	a.catchUp(ctx)
	snap := a.s.view.Snapshot(registry.ServiceKey{Namespace: ns, Service: req.Msg.GetService()})
	redact := !mayReadSessions(who)
	if redact {
		snap = redactSessions(snap)
	}
	resp := wire.ListInstancesResponse(snap, req.Msg.GetAll())
	resp.ResultsFiltered = redact && len(snap.Instances) > 0
	return connect.NewResponse(resp), nil
}

func (a api) ListServices(ctx context.Context, req *connect.Request[beaconv1.ListServicesRequest]) (*connect.Response[beaconv1.ListServicesResponse], error) {
	if err := a.ready(); err != nil {
		return nil, err
	}
	ns, err := namespaceOf(req.Msg.GetNamespace())
	if err != nil {
		return nil, toConnectError(err)
	}
	a.catchUp(ctx)
	resp := &beaconv1.ListServicesResponse{Revision: a.s.view.Revision()}
	who := identityOf(ctx)
	for _, snap := range a.s.view.Services(ns) {
		if who.Authz.Service(ns, snap.Service) < acl.Read {
			resp.ResultsFiltered = true
			continue
		}
		resp.Services = append(resp.Services, &beaconv1.ServiceSummary{
			Name: snap.Service, Instances: int32(len(snap.Instances)),
			Routable: int32(len(snap.Routable())), Revision: snap.Revision,
		})
	}
	return connect.NewResponse(resp), nil
}

// subscribe validates a watch request, takes a place under the watcher
// limits and subscribes to the view once the view is at least as new as
// anything the client already holds. release ends the subscription and
// gives the places back.
func (a api) subscribe(ctx context.Context, msg *beaconv1.WatchRequest) (w *watch, release func(), err error) {
	if err := a.ready(); err != nil {
		return nil, nil, err
	}
	ns, err := namespaceOf(msg.GetNamespace())
	if err != nil {
		return nil, nil, toConnectError(err)
	}
	lim := a.s.cfg.Limits
	if n := len(msg.GetServices()); n > lim.MaxWatchServices {
		return nil, nil, toConnectError(&registry.FieldError{Field: "services", Reason: fmt.Sprintf("names %d services, at most %d (--max-watch-services)", n, lim.MaxWatchServices)})
	}
	if n := len(msg.GetKnownRevisions()); n > lim.MaxWatchServices {
		return nil, nil, toConnectError(&registry.FieldError{Field: "known_revisions", Reason: fmt.Sprintf("has %d services, at most %d (--max-watch-services)", n, lim.MaxWatchServices)})
	}
	for i, svc := range msg.GetServices() {
		if err := registry.ValidateName(fmt.Sprintf("services[%d]", i), svc); err != nil {
			return nil, nil, toConnectError(err)
		}
	}
	newest := int64(0)
	for svc, rev := range msg.GetKnownRevisions() {
		if err := registry.ValidateName("known_revisions key", svc); err != nil {
			return nil, nil, toConnectError(err)
		}
		newest = max(newest, rev)
	}
	giveBack, err := a.s.openWatchStream(ctx)
	if err != nil {
		return nil, nil, err
	}
	if newest > a.s.view.Revision() {
		wctx, cancel := context.WithTimeout(ctx, readTimeout)
		err := a.s.view.WaitRevision(wctx, newest)
		cancel()
		if err != nil && ctx.Err() != nil {
			giveBack()
			return nil, nil, toConnectError(ctx.Err())
		}
	}
	if len(msg.GetKnownRevisions()) == 0 {
		// A new watch's first message holds every write etcd acknowledged
		// before it began, as a List does: a client that registers and
		// then watches sees its own instance at once. (A resumed watch
		// waited above for the revisions it knows.) Within a heartbeat,
		// so that a server cut off from etcd still answers in time.
		wait := readTimeout
		if hb := msg.GetHeartbeat(); hb != nil && hb.AsDuration() > 0 {
			wait = min(wait, hb.AsDuration())
		}
		a.catchUpWithin(ctx, wait)
	}
	if err := ctx.Err(); err != nil {
		giveBack()
		return nil, nil, toConnectError(err)
	}
	// Filtered, not failed: the services the token may not read are left
	// out, named or not, and the messages say so.
	w = &watch{redact: !mayReadSessions(identityOf(ctx)), deltas: msg.GetDeltas(), readable: func(svc string) bool { return identityOf(ctx).Authz.Service(ns, svc) >= acl.Read }}
	services, known := msg.GetServices(), msg.GetKnownRevisions()
	authz := identityOf(ctx).Authz
	readable := func(svc string) bool {
		if authz.Service(ns, svc) >= acl.Read {
			return true
		}
		w.filtered.Store(true)
		return false
	}
	if len(services) > 0 {
		services = slices.DeleteFunc(slices.Clone(services), func(svc string) bool { return !readable(svc) })
		if len(services) == 0 { // all of them hidden: not "the whole namespace"
			services = []string{}
			readable = func(string) bool { return false }
		}
	}
	if len(known) > 0 {
		known = maps.Clone(known)
		maps.DeleteFunc(known, func(svc string, _ int64) bool { return !readable(svc) })
	}
	w.sub = a.s.view.SubscribeFiltered(ns, services, known, readable)
	return w, func() { w.sub.Close(); giveBack() }, nil
}

// openWatchStream counts a watch stream (registry or KV) against the
// server's, the connection's and the token's limits; giveBack ends it.
func (s *Server) openWatchStream(ctx context.Context) (giveBack func(), err error) {
	lim := s.cfg.Limits
	cc := connOf(ctx)
	if !take(&s.watchers, lim.MaxWatchers) {
		return nil, s.limitError("max-watchers", "%d watch streams open on this server", lim.MaxWatchers)
	}
	if !take(&cc.watchers, lim.MaxWatchersPerConn) {
		s.watchers.Add(-1)
		return nil, s.limitError("max-watchers-per-conn", "%d watch streams open on this connection", lim.MaxWatchersPerConn)
	}
	giveBack = func() {
		cc.watchers.Add(-1)
		s.watchers.Add(-1)
	}
	if s.acl != nil {
		acc := identityOf(ctx).Accessor
		if !s.quotas.takeWatcher(acc) {
			giveBack()
			return nil, s.limitError("max-watchers-per-token", "token %s has %d watch streams open on this server", acc, lim.MaxWatchersPerToken)
		}
		perConn := giveBack
		giveBack = func() { perConn(); s.quotas.releaseWatcher(acc) }
	}
	return giveBack, nil
}

// watch is one watch stream's subscription and what its token hides.
type watch struct {
	sub      *view.Subscription
	readable func(service string) bool // what the token may read (for acknowledgements)
	redact   bool                      // blank session ids: the token may not read sessions
	deltas   bool                      // the client applies deltas
	filtered atomic.Bool               // a service was left out
}

// hidden says whether the stream's messages leave something out.
func (w *watch) hidden() bool { return w.redact || w.filtered.Load() }

// encoding is the wire form of a pending snapshot this watcher gets.
func (w *watch) encoding(p view.Pending) view.Encoding {
	e := view.Full
	if w.deltas && p.Delta {
		e = view.Delta
	}
	if w.redact {
		e++ // FullRedacted, DeltaRedacted
	}
	return e
}

// encoded is a pending snapshot's shared encoding, as this watcher may see it.
func (w *watch) encoded(p view.Pending) []byte {
	return p.Enc.Get(w.encoding(p), p.Published, encodePublished)
}

// snapshot is a pending snapshot as this watcher may see it.
func (w *watch) snapshot(p view.Pending) *beaconv1.ServiceSnapshot {
	return snapshotProto(w.encoding(p), p.Published)
}

// snapshotProto is a published snapshot in wire form e: whole, or only what
// changed since its base; with session ids or without.
func snapshotProto(e view.Encoding, pub view.Published) *beaconv1.ServiceSnapshot {
	redact := e == view.FullRedacted || e == view.DeltaRedacted
	if e == view.Full || e == view.FullRedacted {
		snap := pub.Snap
		if redact {
			snap = redactSessions(snap)
		}
		return wire.SnapshotToProto(snap)
	}
	upserted, removed := view.Changes(pub.Base, pub.Snap)
	delta := &registry.Snapshot{
		Namespace: pub.Snap.Namespace, Service: pub.Snap.Service, Revision: pub.Snap.Revision,
		Instances: upserted, ProtectionThreshold: pub.Snap.ProtectionThreshold,
	}
	if redact {
		delta = redactSessions(delta)
	}
	out := wire.SnapshotToProto(delta)
	out.BaseRevision, out.Removed = pub.Base.Revision, removed
	return out
}

// maxWatchMessageBytes bounds one watch message (but for a single larger
// snapshot, which goes alone): a watcher that stops reading holds at most
// one message in the server's memory, and the rest waits as references to
// the view's shared snapshots, coalesced.
const maxWatchMessageBytes = 256 << 10

// nextMessage takes the snapshots of a watcher's next message; with a
// heartbeat timer, it gives up when the timer fires with
// context.DeadlineExceeded.
func nextMessage(ctx context.Context, w *watch, heartbeat *time.Timer) ([]view.Pending, bool, error) {
	size := 0
	var quiet <-chan time.Time
	if heartbeat != nil {
		quiet = heartbeat.C
	}
	return w.sub.NextBatchUntil(ctx, quiet, func(p view.Pending) bool {
		size += len(w.encoded(p))
		return size <= maxWatchMessageBytes
	})
}

// Bounds of a watch stream's heartbeat interval.
const (
	MinWatchHeartbeat = 100 * time.Millisecond
	MaxWatchHeartbeat = time.Minute
)

// heartbeatOf validates a watch request's heartbeat interval (0: none).
func heartbeatOf(d *durationpb.Duration) (time.Duration, error) {
	if d == nil {
		return 0, nil
	}
	if err := d.CheckValid(); err != nil {
		return 0, toConnectError(&registry.FieldError{Field: "heartbeat", Reason: err.Error()})
	}
	h := d.AsDuration()
	if h < MinWatchHeartbeat || h > MaxWatchHeartbeat {
		return 0, toConnectError(&registry.FieldError{Field: "heartbeat", Reason: fmt.Sprintf("%v, must be in [%v, %v]", h, MinWatchHeartbeat, MaxWatchHeartbeat)})
	}
	return h, nil
}

func (a api) Watch(ctx context.Context, req *connect.Request[beaconv1.WatchRequest], stream *connect.ServerStream[beaconv1.WatchResponse]) error {
	heartbeat, err := heartbeatOf(req.Msg.GetHeartbeat())
	if err != nil {
		return err
	}
	w, release, err := a.subscribe(ctx, req.Msg)
	if err != nil {
		return err
	}
	defer release()
	var watchID uint64
	if req.Msg.GetAcknowledge() {
		ns, _ := namespaceOf(req.Msg.GetNamespace()) // validated by subscribe
		watchID = a.s.acks.join(identityOf(ctx).Accessor, ns, req.Msg.GetServices(), w.readable, w.sub.Wake)
		defer a.s.acks.leave(watchID)
	}
	first := true
	binary := !strings.Contains(req.Header().Get("Content-Type"), "json")
	valid := recheck(ctx)
	// One timer for the stream, reset after every message: a context with
	// a deadline per message cost more than the message at N = 1000.
	var quiet *time.Timer
	if heartbeat > 0 {
		quiet = time.NewTimer(heartbeat)
		defer quiet.Stop()
	}
	for {
		pending, synced, err := nextMessage(ctx, w, quiet)
		if quiet != nil {
			quiet.Reset(heartbeat)
		}
		if verr := valid(); verr != nil {
			return verr
		}
		if err != nil && ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
			// Quiet for a heartbeat: say so, so that the client knows
			// this server is alive.
			if err := stream.Send(&beaconv1.WatchResponse{WatchId: watchID}); err != nil {
				return nil
			}
			continue
		}
		if err != nil {
			return nil // the client went away or the server is stopping
		}
		resp := &beaconv1.WatchResponse{Synced: synced, WatchId: watchID, ResultsFiltered: w.hidden()}
		if watchID != 0 {
			resp.AckWanted = a.s.acks.takeWanted(watchID)
			resp.AcknowledgeOnRequest = first
		}
		first = false
		if binary {
			// Each snapshot is encoded once and its bytes shared by every
			// watcher; they travel as the message's repeated field 1.
			var raw []byte
			for _, p := range pending {
				raw = protowire.AppendTag(raw, snapshotsField, protowire.BytesType)
				raw = protowire.AppendBytes(raw, w.encoded(p))
			}
			resp.ProtoReflect().SetUnknown(raw)
		} else {
			for _, p := range pending {
				resp.Snapshots = append(resp.Snapshots, w.snapshot(p))
			}
		}
		if err := stream.Send(resp); err != nil {
			return nil // gone, or cut after --write-timeout without reading
		}
		a.s.metrics.observeSent(pending)
	}
}

// MaxAckServices bounds the services one AckWatch call may carry.
const MaxAckServices = 10000

func (a api) AckWatch(ctx context.Context, req *connect.Request[beaconv1.AckWatchRequest]) (*connect.Response[beaconv1.AckWatchResponse], error) {
	if err := a.ready(); err != nil {
		return nil, err
	}
	revs := req.Msg.GetRevisions()
	if n := len(revs); n > MaxAckServices {
		return nil, toConnectError(&registry.FieldError{Field: "revisions", Reason: fmt.Sprintf("%d services, at most %d", n, MaxAckServices)})
	}
	for svc, rev := range revs {
		if err := registry.ValidateName("revisions key", svc); err != nil {
			return nil, toConnectError(err)
		}
		if rev < 0 {
			return nil, toConnectError(&registry.FieldError{Field: "revisions[" + svc + "]", Reason: "must not be negative"})
		}
	}
	// Only the token that opened the stream may acknowledge for it.
	if !a.s.acks.ack(identityOf(ctx).Accessor, req.Msg.GetWatchId(), revs) {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("watch_id %d: no such acknowledging watch stream on this server", req.Msg.GetWatchId()))
	}
	return connect.NewResponse(&beaconv1.AckWatchResponse{}), nil
}

// Bounds of AwaitWatchers' wait.
const (
	DefaultAwaitTimeout = 5 * time.Second
	MaxAwaitTimeout     = 5 * time.Minute
)

func (a api) AwaitWatchers(ctx context.Context, req *connect.Request[beaconv1.AwaitWatchersRequest]) (*connect.Response[beaconv1.AwaitWatchersResponse], error) {
	if err := a.ready(); err != nil {
		return nil, err
	}
	msg := req.Msg
	ns, err := namespaceOf(msg.GetNamespace())
	if err != nil {
		return nil, toConnectError(err)
	}
	if err := registry.ValidateName("service", msg.GetService()); err != nil {
		return nil, toConnectError(err)
	}
	if err := needService(ctx, ns, msg.GetService(), acl.Read); err != nil {
		return nil, err
	}
	if msg.GetRevision() <= 0 {
		return nil, toConnectError(&registry.FieldError{Field: "revision", Reason: "must be positive"})
	}
	timeout := DefaultAwaitTimeout
	if d := msg.GetTimeout(); d != nil {
		if err := d.CheckValid(); err != nil {
			return nil, toConnectError(&registry.FieldError{Field: "timeout", Reason: err.Error()})
		}
		timeout = d.AsDuration()
		if timeout <= 0 || timeout > MaxAwaitTimeout {
			return nil, toConnectError(&registry.FieldError{Field: "timeout", Reason: fmt.Sprintf("%v, must be in (0, %v]", timeout, MaxAwaitTimeout)})
		}
	}
	lim, cc := a.s.cfg.Limits, connOf(ctx)
	if !take(&a.s.awaits, lim.MaxAwaits) {
		return nil, a.s.limitError("max-awaits", "%d AwaitWatchers calls waiting on this server", lim.MaxAwaits)
	}
	defer a.s.awaits.Add(-1)
	if !take(&cc.awaits, lim.MaxAwaitsPerConn) {
		return nil, a.s.limitError("max-awaits-per-conn", "%d AwaitWatchers calls waiting on this connection", lim.MaxAwaitsPerConn)
	}
	defer cc.awaits.Add(-1)
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	r := a.s.acks.await(wctx, ns, msg.GetService(), msg.GetRevision())
	return connect.NewResponse(&beaconv1.AwaitWatchersResponse{
		Watchers: int32(r.Watchers), Acknowledged: int32(r.Acknowledged), Gone: int32(r.Gone), Complete: r.Complete(),
	}), nil
}

// snapshotsField is WatchResponse.snapshots' field number.
var snapshotsField = protowire.Number((&beaconv1.WatchResponse{}).ProtoReflect().Descriptor().Fields().ByName("snapshots").Number())

func encodePublished(e view.Encoding, pub view.Published) []byte {
	b, err := proto.Marshal(snapshotProto(e, pub))
	if err != nil {
		panic("server: marshalling a snapshot cannot fail: " + err.Error())
	}
	return b
}

func (m *metrics) observeSent(pending []view.Pending) {
	now := time.Now()
	for _, p := range pending {
		m.sent.Inc()
		m.coalesced.Add(float64(p.Coalesce))
		m.fanout.Observe(now.Sub(p.Queued).Seconds())
	}
}

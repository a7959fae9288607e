package server

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/endpoint"
	"beacon.dev/beacon/internal/store"
	"beacon.dev/beacon/internal/wire"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/internal/acl"
)

// The calls an operator's tools (the web console, docs/console.md) need
// beyond a client's: namespaces, sessions, the cluster, and why an
// instance does or does not get traffic.

const (
	maxListSessions = 1000
	// explainAckWait bounds how long ExplainInstance waits for watchers to
	// say which revision they applied.
	explainAckWait = time.Second
	maxRemovals    = 4096
)

func (a api) ListNamespaces(ctx context.Context, _ *connect.Request[beaconv1.ListNamespacesRequest]) (*connect.Response[beaconv1.ListNamespacesResponse], error) {
	if err := a.ready(); err != nil {
		return nil, err
	}
	a.catchUp(ctx)
	who := identityOf(ctx)
	byName := map[string]*beaconv1.NamespaceSummary{}
	resp := &beaconv1.ListNamespacesResponse{}
	for _, snap := range a.s.view.All() {
		if len(snap.Instances) == 0 {
			continue
		}
		if who.Authz.Service(snap.Namespace, snap.Service) < acl.Read {
			resp.ResultsFiltered = true
			continue
		}
		ns := byName[snap.Namespace]
		if ns == nil {
			ns = &beaconv1.NamespaceSummary{Name: snap.Namespace}
			byName[snap.Namespace] = ns
			resp.Namespaces = append(resp.Namespaces, ns)
		}
		ns.Services++
		ns.Instances += int32(len(snap.Instances))
	}
	if _, ok := byName[registry.DefaultNamespace]; !ok {
		// Always there, if empty: the namespace of every call that names none.
		resp.Namespaces = append(resp.Namespaces, &beaconv1.NamespaceSummary{Name: registry.DefaultNamespace})
	}
	slices.SortFunc(resp.Namespaces, func(x, y *beaconv1.NamespaceSummary) int { return strings.Compare(x.Name, y.Name) })
	return connect.NewResponse(resp), nil
}

func (a api) ListSessions(ctx context.Context, req *connect.Request[beaconv1.ListSessionsRequest]) (*connect.Response[beaconv1.ListSessionsResponse], error) {
	if err := a.ready(); err != nil {
		return nil, err
	}
	if err := needGlobal(ctx, acl.Session, acl.Read); err != nil {
		return nil, err
	}
	limit := int(req.Msg.GetLimit())
	switch {
	case limit < 0 || limit > maxListSessions:
		return nil, toConnectError(&registry.FieldError{Field: "limit", Value: fmt.Sprint(limit), Reason: fmt.Sprintf("must be between 1 and %d (0: %d)", maxListSessions, maxListSessions)})
	case limit == 0:
		limit = maxListSessions
	}
	list, more, err := a.s.store.ListSessions(ctx, req.Msg.GetAfter(), limit)
	if err != nil {
		return nil, toConnectError(err)
	}
	owned := map[int64]int32{}
	who := identityOf(ctx)
	for _, snap := range a.s.view.All() {
		if who.Authz.Service(snap.Namespace, snap.Service) < acl.Read {
			continue // a count of what the caller may not read tells of it
		}
		for _, in := range snap.Instances {
			if in.SessionID != 0 {
				owned[in.SessionID]++
			}
		}
	}
	resp := &beaconv1.ListSessionsResponse{More: more}
	for _, si := range list {
		resp.Sessions = append(resp.Sessions, &beaconv1.SessionInfo{
			Id: si.ID, Name: si.Name, Ttl: durationpb.New(si.TTL), Created: timestamppb.New(si.Created), Instances: owned[si.ID],
		})
	}
	return connect.NewResponse(resp), nil
}

func (a api) ExplainInstance(ctx context.Context, req *connect.Request[beaconv1.ExplainInstanceRequest]) (*connect.Response[beaconv1.ExplainInstanceResponse], error) {
	if err := a.ready(); err != nil {
		return nil, err
	}
	sk, err := serviceKeyOf(req.Msg.GetNamespace(), req.Msg.GetService())
	if err == nil {
		err = registry.ValidateName("id", req.Msg.GetId())
	}
	if err != nil {
		return nil, toConnectError(err)
	}
	if err := needService(ctx, sk.Namespace, sk.Service, acl.Read); err != nil {
		return nil, err
	}
	a.catchUp(ctx)
	k := registry.InstanceKey{Namespace: sk.Namespace, Service: sk.Service, ID: req.Msg.GetId()}
	snap := a.s.view.Snapshot(sk)
	resp := &beaconv1.ExplainInstanceResponse{Revision: snap.Revision}
	var in *registry.Instance
	for _, x := range snap.Instances {
		if x.ID == k.ID {
			in = x
		}
	}
	var ackRev int64
	if in == nil {
		detail, rev := a.explainAbsent(ctx, k)
		resp.Reasons = append(resp.Reasons, &beaconv1.ExplainReason{Rule: "registered", Excludes: true, Detail: detail})
		ackRev = rev
	} else {
		shown, sessions := in, mayReadSessions(identityOf(ctx))
		if !sessions {
			c := in.Clone()
			c.SessionID = 0
			shown = &c
		}
		resp.Instance = wire.InstanceToProto(shown)
		resp.GetsTraffic, resp.Reasons = explainPresent(snap, in, sessions)
		ackRev = in.Revision
	}
	if ackRev > 0 {
		if r, ok := a.explainAcks(ctx, sk, ackRev); ok {
			resp.Reasons = append(resp.Reasons, r)
		}
	}
	// The rules that exclude first, in the order found.
	slices.SortStableFunc(resp.Reasons, func(x, y *beaconv1.ExplainReason) int {
		switch {
		case x.Excludes == y.Excludes:
			return 0
		case x.Excludes:
			return -1
		}
		return 1
	})
	return connect.NewResponse(resp), nil
}

// explainPresent applies the routability rules (registry.Instance.Routable,
// Snapshot.Available, the SDK's tiers) to a registered instance.
func explainPresent(snap *registry.Snapshot, in *registry.Instance, sessionsShown bool) (gets bool, reasons []*beaconv1.ExplainReason) {
	add := func(rule string, excludes bool, format string, args ...any) {
		reasons = append(reasons, &beaconv1.ExplainReason{Rule: rule, Excludes: excludes, Detail: fmt.Sprintf(format, args...)})
	}
	available, protected := snap.Available()
	inAvailable := slices.Contains(available, in)
	switch in.Status {
	case registry.StatusUp:
		add("status", false, "declared UP")
	case registry.StatusStarting:
		add("status", true, "declared STARTING: it is not ready yet (it says UP when it is)")
	case registry.StatusDraining:
		add("status", true, "declared DRAINING: shutting down, callers send it no new calls")
	case registry.StatusOutOfService:
		add("status", true, "declared OUT_OF_SERVICE by an operator or the instance")
	default:
		add("status", true, "declared %s", in.Status)
	}
	if len(in.Checks) == 0 {
		switch in.Health {
		case registry.HealthCritical:
			add("health", !inAvailable, "declared CRITICAL by the instance itself (it has no checks)")
		case registry.HealthWarning:
			add("health", false, "declared WARNING by the instance (still routable)")
		default:
			add("health", false, "no checks; the instance declares itself %s", in.Health)
		}
	}
	for _, c := range in.Checks {
		since := ""
		if !c.Since.IsZero() {
			since = " since " + c.Since.UTC().Format(time.RFC3339)
		}
		output := ""
		if c.Output != "" {
			output = ": " + c.Output
		}
		switch c.Status {
		case registry.HealthCritical:
			add("check", !inAvailable, "check %q (%s) is CRITICAL%s%s", c.Name, c.Kind, since, output)
		case registry.HealthWarning:
			add("check", false, "check %q (%s) is WARNING%s%s (still routable)", c.Name, c.Kind, since, output)
		default:
			add("check", false, "check %q (%s) is %s%s", c.Name, c.Kind, c.Status, since)
		}
	}
	if snap.ProtectionThreshold > 0 {
		up, routable := 0, 0
		for _, x := range snap.Instances {
			if x.Status == registry.StatusUp {
				up++
				if x.Routable() {
					routable++
				}
			}
		}
		switch {
		case protected && !in.Routable() && inAvailable:
			add("protection", false, "protection engaged: only %d of the %d instances declared UP are healthy, below the threshold %.0f%%, so callers use every instance declared UP, this unhealthy one included", routable, up, 100*snap.ProtectionThreshold)
		case protected:
			add("protection", false, "protection engaged (%d of %d declared UP are healthy, threshold %.0f%%): callers spread over every instance declared UP", routable, up, 100*snap.ProtectionThreshold)
		default:
			add("protection", false, "protection not engaged: %d of %d instances declared UP are healthy (threshold %.0f%%)", routable, up, 100*snap.ProtectionThreshold)
		}
	}
	if in.Suspect {
		add("mass_expiry", false, "its session expired together with many others at once, which looks like the registry's own trouble: the server keeps it listed, routable, for the mass-expiry guard's grace period (docs/health.md)")
	}
	// The SDK routes to the lowest tier with an available instance
	// (endpoint.TierOf: metadata tier, a number; anything else is 0).
	gets = inAvailable
	if inAvailable {
		lowest, inLowest := endpoint.TierOf(available[0]), 0
		for _, x := range available {
			lowest = min(lowest, endpoint.TierOf(x))
		}
		for _, x := range available {
			if endpoint.TierOf(x) == lowest {
				inLowest++
			}
		}
		switch tier := endpoint.TierOf(in); {
		case tier > lowest:
			gets = false
			add("tier", true, "tier %d (metadata tier=%q): callers use the lowest tier with an available instance, tier %d, which has %d", tier, in.Metadata[endpoint.MetaTier], lowest, inLowest)
		case tier > 0:
			add("tier", false, "tier %d (metadata tier=%q), in use: no instance of a lower tier is available", tier, in.Metadata[endpoint.MetaTier])
		}
	}
	switch {
	case !sessionsShown:
		// Whether a session owns it is the caller's to know only with
		// session:read (the instance's session id is blanked too).
	case in.SessionID != 0:
		add("session", false, "its session is alive (the instance goes when the session ends)")
	default:
		add("session", false, "persistent: no session, it stays until deregistered")
	}
	return gets, reasons
}

// explainAcks asks this server's acknowledging watchers of the service
// whether they applied rev, waiting at most explainAckWait.
func (a api) explainAcks(ctx context.Context, sk registry.ServiceKey, rev int64) (*beaconv1.ExplainReason, bool) {
	lim, cc := a.s.cfg.Limits, connOf(ctx)
	if !take(&a.s.awaits, lim.MaxAwaits) {
		return &beaconv1.ExplainReason{Rule: "acknowledged", Detail: "not asked: too many waits for acknowledgements on this server (--max-awaits)"}, true
	}
	defer a.s.awaits.Add(-1)
	if !take(&cc.awaits, lim.MaxAwaitsPerConn) {
		return &beaconv1.ExplainReason{Rule: "acknowledged", Detail: "not asked: too many waits for acknowledgements on this connection (--max-awaits-per-conn)"}, true
	}
	defer cc.awaits.Add(-1)
	wctx, cancel := context.WithTimeout(ctx, explainAckWait)
	defer cancel()
	r := a.s.acks.await(wctx, sk.Namespace, sk.Service, rev)
	if r.Watchers == 0 {
		return nil, false
	}
	detail := fmt.Sprintf("%d of %d acknowledging watchers on this server applied revision %d", r.Acknowledged, r.Watchers, rev)
	if pending := r.Watchers - r.Acknowledged - r.Gone; pending > 0 {
		detail += fmt.Sprintf("; %d have not yet and still route by what they had before", pending)
	}
	return &beaconv1.ExplainReason{Rule: "acknowledged", Detail: detail}, true
}

// explainAbsent says what became of an instance that is not registered,
// and the revision of its removal (0: unknown).
func (a api) explainAbsent(ctx context.Context, k registry.InstanceKey) (string, int64) {
	rm, ok := a.s.removals.get(k)
	if !ok {
		return "not registered: no instance with this id has been removed since this server started, or it never existed", 0
	}
	detail := fmt.Sprintf("not registered: removed at revision %d (%s)", rm.rev, rm.at.UTC().Format(time.RFC3339))
	ctx, cancel := context.WithTimeout(ctx, readTimeout)
	defer cancel()
	// The record as it was just before its removal says whether a session
	// owned it; etcd keeps it until compaction.
	resp, err := a.s.cli.Get(ctx, a.s.store.InstanceKey(k), clientv3.WithRev(rm.rev-1))
	if err != nil || len(resp.Kvs) == 0 {
		return detail, rm.rev
	}
	in, err := a.s.store.DecodeInstance(string(resp.Kvs[0].Key), resp.Kvs[0].Value, resp.Kvs[0].ModRevision)
	if err != nil || in.SessionID == 0 {
		return detail + ": deregistered", rm.rev
	}
	// A session's end deletes its record and its instances (one lease) in
	// one revision: the record gone at that very revision says so.
	before, err := a.s.cli.Get(ctx, a.s.store.SessionKey(in.SessionID), clientv3.WithRev(rm.rev-1), clientv3.WithCountOnly())
	if err != nil {
		return detail, rm.rev
	}
	after, err := a.s.cli.Get(ctx, a.s.store.SessionKey(in.SessionID), clientv3.WithRev(rm.rev), clientv3.WithCountOnly())
	if err != nil {
		return detail, rm.rev
	}
	if before.Count == 1 && after.Count == 0 {
		return detail + ": its session ended (expired, or closed by its owner) and took the instance with it", rm.rev
	}
	return detail + ": deregistered", rm.rev
}

func (a api) ServicePropagation(ctx context.Context, req *connect.Request[beaconv1.ServicePropagationRequest]) (*connect.Response[beaconv1.ServicePropagationResponse], error) {
	if err := a.ready(); err != nil {
		return nil, err
	}
	sk, err := serviceKeyOf(req.Msg.GetNamespace(), req.Msg.GetService())
	if err != nil {
		return nil, toConnectError(err)
	}
	if err := needService(ctx, sk.Namespace, sk.Service, acl.Read); err != nil {
		return nil, err
	}
	seen := a.s.view.Snapshot(sk).Revision
	if seen == 0 {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("service %s/%s has had no instance since this server started: nothing to track", sk.Namespace, sk.Service))
	}
	until, changes, ok := a.s.acks.track(sk, identityOf(ctx).Accessor, seen, time.Now())
	if !ok {
		return nil, connect.NewError(connect.CodeResourceExhausted, fmt.Errorf("propagation tracking: at most %d services tracked on a server, %d started by one token, for %v after their last look", maxTracked, maxTrackedPerToken, trackFor))
	}
	resp := &beaconv1.ServicePropagationResponse{TrackedUntil: timestamppb.New(until)}
	for _, c := range changes {
		rp := &beaconv1.RevisionPropagation{Revision: c.rev, Published: timestamppb.New(c.published),
			Watchers: int32(c.watchers), Acknowledged: int32(c.acked), Gone: int32(c.gone)}
		if !c.lastAck.IsZero() {
			rp.LastAck = timestamppb.New(c.lastAck)
		}
		resp.Changes = append(resp.Changes, rp)
	}
	return connect.NewResponse(resp), nil
}

func (a api) ClusterStatus(ctx context.Context, _ *connect.Request[beaconv1.ClusterStatusRequest]) (*connect.Response[beaconv1.ClusterStatusResponse], error) {
	if err := a.ready(); err != nil {
		return nil, err
	}
	if err := needGlobal(ctx, acl.Operator, acl.Read); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	resp := &beaconv1.ClusterStatusResponse{Revision: a.s.view.Revision()}
	for _, id := range a.s.members.Live() {
		name, addr, _ := strings.Cut(id, "@")
		resp.Servers = append(resp.Servers, &beaconv1.ClusterMember{Name: name, Addresses: []string{addr}, Self: id == a.s.members.Self()})
	}
	list, err := a.s.cli.MemberList(ctx)
	if err != nil {
		return nil, connect.NewError(connect.CodeUnavailable, fmt.Errorf("etcd: listing members: %w", err))
	}
	members := make([]*beaconv1.ClusterMember, len(list.Members))
	var wg sync.WaitGroup
	for i, m := range list.Members {
		cm := &beaconv1.ClusterMember{Name: m.Name, Addresses: m.ClientURLs}
		members[i] = cm
		if len(m.ClientURLs) == 0 {
			cm.Error = "not started yet (no client URL)"
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			st, err := a.s.cli.Status(ctx, m.ClientURLs[0])
			if err != nil {
				cm.Error = err.Error()
				return
			}
			cm.Healthy = len(st.Errors) == 0
			cm.Error = strings.Join(st.Errors, "; ")
			cm.Leader = st.Leader == m.ID
			cm.Self = a.s.etcd != nil && uint64(a.s.etcd.Server.MemberID()) == m.ID
			cm.DbSizeBytes, cm.RaftIndex, cm.Version = st.DbSize, int64(st.RaftIndex), st.Version
		}()
	}
	wg.Wait()
	resp.Etcd = members
	if alarms, err := a.s.cli.AlarmList(ctx); err == nil {
		for _, al := range alarms.Alarms {
			resp.Alarms = append(resp.Alarms, fmt.Sprintf("%s on member %x", al.Alarm, al.MemberID))
		}
	}
	return connect.NewResponse(resp), nil
}

// removals remembers the last instance removals the view saw (key →
// revision and time), so that ExplainInstance can say what became of an
// instance that is gone.
type removals struct {
	mu    sync.Mutex
	byKey map[registry.InstanceKey]removal // guarded by mu
	order []registry.InstanceKey           // guarded by mu; oldest first
}

type removal struct {
	rev int64
	at  time.Time
}

// notice records the instance deletions among events (the view's Changed
// hook: it must not block).
func (r *removals) notice(events []*clientv3.Event, layout store.Layout) {
	now := time.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, ev := range events {
		if ev.Type != mvccpb.DELETE || !strings.HasPrefix(string(ev.Kv.Key), layout.NamespacesPrefix()) {
			continue
		}
		k, err := layout.ParseInstanceKey(string(ev.Kv.Key))
		if err != nil {
			continue
		}
		if r.byKey == nil {
			r.byKey = make(map[registry.InstanceKey]removal)
		}
		if _, seen := r.byKey[k]; !seen {
			if len(r.order) == maxRemovals {
				delete(r.byKey, r.order[0])
				r.order = r.order[1:]
			}
			r.order = append(r.order, k)
		}
		r.byKey[k] = removal{rev: ev.Kv.ModRevision, at: now}
	}
}

func (r *removals) get(k registry.InstanceKey) (removal, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	rm, ok := r.byKey[k]
	return rm, ok
}

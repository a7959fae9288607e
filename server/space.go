package server

// etcd space: bounded history, the quota alarm, and recovery from it.
//
// etcd refuses every write once its database reaches the backend quota
// (the NOSPACE alarm) and keeps refusing — across restarts, the alarm is
// stored — until someone compacts, defragments and disarms. A client that
// overwrites its records fast enough fills a 2 GiB quota with history in
// under a minute, and etcd's own revision compactor only runs every five
// minutes. So the server owns compaction (keep the last
// EtcdCompactionRetention revisions, checked every EtcdSpaceCheckInterval),
// shows alarms on /readyz, /healthz and /metrics, and recovers by itself
// once the data left after compaction fits: compact to the current
// revision, defragment every member, disarm.

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"
	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Defaults of the space settings.
const (
	// DefaultEtcdQuotaBackendBytes is etcd's own default quota, 2 GiB.
	DefaultEtcdQuotaBackendBytes = int64(2 << 30)
	// MaxEtcdQuotaBackendBytes is the largest quota etcd suggests, 8 GiB.
	MaxEtcdQuotaBackendBytes = int64(8 << 30)
	// DefaultEtcdCompactionRetention is how many revisions of history the
	// server keeps. A watcher further behind than that re-lists (the view
	// and the SDK's etcd backend both do), so this only bounds how much a
	// watcher can resume without a listing; at 4 KB a record it is 40 MB.
	DefaultEtcdCompactionRetention = int64(10000)
	// DefaultEtcdSpaceCheckInterval is how often the server reads etcd's
	// status and alarms, and compacts.
	DefaultEtcdSpaceCheckInterval = 5 * time.Second
	// DefaultEtcdDefragInterval is the least time between two automatic
	// defragmentations: a defragmentation blocks the member while it
	// rewrites the database.
	DefaultEtcdDefragInterval = 5 * time.Minute
	// SafeSpaceFraction is the share of the quota the database must be
	// under before the NOSPACE alarm is disarmed; above it, the next few
	// writes would raise it again.
	SafeSpaceFraction = 0.8
)

// validateSpace checks the space settings, naming the flag and its limits.
func (c *Config) validateSpace() error {
	if q := c.EtcdQuotaBackendBytes; q < 1<<20 || q > MaxEtcdQuotaBackendBytes {
		return fmt.Errorf("server: invalid --etcd-quota-backend-bytes %d: must be between 1 MiB (%d) and 8 GiB (%d)", q, 1<<20, MaxEtcdQuotaBackendBytes)
	}
	if r := c.EtcdCompactionRetention; r < 0 || r > 0 && r < 100 {
		return fmt.Errorf("server: invalid --etcd-compaction-retention %d: must be at least 100 revisions (0: never compact)", r)
	}
	if c.EtcdCompactionRetention == 0 && c.Embedded() {
		return errors.New("server: invalid --etcd-compaction-retention 0: the embedded etcd's history would grow until the quota; 0 only with --etcd-endpoints")
	}
	if d := c.EtcdSpaceCheckInterval; d < 0 || d > 0 && (d < 10*time.Millisecond || d > 10*time.Minute) {
		return fmt.Errorf("server: invalid --etcd-space-check-interval %s: must be between 10ms and 10m (0: the default, %s)", d, DefaultEtcdSpaceCheckInterval)
	}
	if d := c.EtcdDefragInterval; d < 0 {
		return fmt.Errorf("server: invalid --etcd-defrag-interval %s: must not be negative (0: the default, %s)", d, DefaultEtcdDefragInterval)
	}
	return nil
}

// bindSpaceFlags binds the space settings to flags.
func (c *Config) bindSpaceFlags(fs *pflag.FlagSet) {
	fs.Int64Var(&c.EtcdQuotaBackendBytes, "etcd-quota-backend-bytes", c.EtcdQuotaBackendBytes, "embedded etcd: database size at which etcd raises the NOSPACE alarm and refuses writes (with --etcd-endpoints: the quota assumed for an etcd before 3.6, which does not report it)")
	fs.Int64Var(&c.EtcdCompactionRetention, "etcd-compaction-retention", c.EtcdCompactionRetention, "revisions of etcd history the server keeps, compacting the rest (0: never compact; only with --etcd-endpoints)")
	fs.DurationVar(&c.EtcdSpaceCheckInterval, "etcd-space-check-interval", c.EtcdSpaceCheckInterval, "how often the server reads etcd's database size and alarms, and compacts")
	fs.BoolVar(&c.EtcdAutoRecover, "etcd-auto-recover", c.EtcdAutoRecover, "recover from etcd's NOSPACE alarm by itself once the data fits: compact, defragment every member, disarm")
	fs.DurationVar(&c.EtcdDefragInterval, "etcd-defrag-interval", c.EtcdDefragInterval, "least time between two automatic defragmentations (each blocks the member while it runs)")
}

// spaceOwnerKey is the work item whose owner among the servers sharing an
// etcd compacts and recovers (members.Owner).
const spaceOwnerKey = "etcd-space"

// Per-call deadlines.
const (
	spaceStatusTimeout  = 5 * time.Second
	spaceCompactTimeout = time.Minute // physical compaction walks the history
	spaceDefragTimeout  = 5 * time.Minute
)

// ErrSpaceInUse means the data etcd holds after compaction is above
// SafeSpaceFraction of the quota: compacting and defragmenting cannot make
// room. Delete records or raise the quota (--etcd-quota-backend-bytes).
var ErrSpaceInUse = errors.New("server: etcd space in use above the safe share of the quota; delete records or raise --etcd-quota-backend-bytes")

// Space is what etcd reports about its database space.
type Space struct {
	// Revision is the cluster's current revision.
	Revision int64 `json:"revision"`
	// Members has one entry per member asked, in endpoint order.
	Members []MemberSpace `json:"members"`
	// Alarms are the active alarms over the whole cluster.
	Alarms []Alarm `json:"alarms"`
}

// MemberSpace is one member's database sizes.
type MemberSpace struct {
	Endpoint string `json:"endpoint"`
	MemberID uint64 `json:"member_id,omitempty"`
	// DBSize is the size of the database (the quota applies to it),
	// DBSizeInUse the part of it holding data; the rest is free pages
	// that only a defragmentation returns.
	DBSize      int64 `json:"db_size_bytes"`
	DBSizeInUse int64 `json:"db_size_in_use_bytes"`
	// Quota is the member's backend quota: reported by etcd 3.6 and
	// later, else the quota given to ReadSpace.
	Quota int64 `json:"quota_bytes"`
	// Err is why the member did not answer; the sizes are then zero.
	Err string `json:"error,omitempty"`
}

// Alarm is an active etcd alarm.
type Alarm struct {
	MemberID uint64 `json:"member_id"`
	Type     string `json:"type"` // NOSPACE or CORRUPT
}

// Has reports whether an alarm of type typ is active.
func (sp *Space) Has(typ string) bool {
	return slices.ContainsFunc(sp.Alarms, func(a Alarm) bool { return a.Type == typ })
}

// measured reports whether the member with this id answered.
func (sp *Space) measured(id uint64) bool {
	return slices.ContainsFunc(sp.Members, func(m MemberSpace) bool { return m.Err == "" && m.MemberID == id })
}

// largest returns the member nearest to its quota (the one alarms follow).
func (sp *Space) largest() (MemberSpace, bool) {
	var best MemberSpace
	found := false
	for _, m := range sp.Members {
		if m.Err == "" && (!found || m.DBSize > best.DBSize) {
			best, found = m, true
		}
	}
	return best, found
}

// SpaceEndpoints returns the client URL of every etcd member (the first
// one each advertises), falling back to the client's own endpoints when
// the member list is not available.
//
// A client connected through a unix socket gets its own endpoints: it
// measures the one member behind the socket. The others' advertised URLs
// are not its to reach — sockets on other machines (at a path that may be
// the same on every machine, which would lead back to this member), or
// listeners that want a certificate. Likewise a member that advertises
// only a socket is left out of the list.
func SpaceEndpoints(ctx context.Context, cli *clientv3.Client) []string {
	if slices.ContainsFunc(cli.Endpoints(), unixEndpoint) {
		return cli.Endpoints()
	}
	ctx, cancel := context.WithTimeout(ctx, spaceStatusTimeout)
	defer cancel()
	resp, err := cli.MemberList(ctx)
	if err != nil {
		return cli.Endpoints()
	}
	var eps []string
	for _, m := range resp.Members {
		if len(m.ClientURLs) > 0 && !unixEndpoint(m.ClientURLs[0]) {
			eps = append(eps, m.ClientURLs[0])
		}
	}
	if len(eps) == 0 {
		return cli.Endpoints()
	}
	sort.Strings(eps)
	return eps
}

func unixEndpoint(ep string) bool {
	return strings.HasPrefix(ep, "unix:") || strings.HasPrefix(ep, "unixs:")
}

// ReadSpace asks each endpoint for its database sizes and the cluster for
// its alarms. quota stands in for members that do not report one (etcd
// before 3.6); 0 means etcd's default. An endpoint that does not answer is
// reported in its MemberSpace.Err; the error is for the alarm list, or for
// no endpoint answering.
func ReadSpace(ctx context.Context, cli *clientv3.Client, endpoints []string, quota int64) (*Space, error) {
	if quota <= 0 {
		quota = DefaultEtcdQuotaBackendBytes
	}
	sp := &Space{}
	answered := 0
	var last error
	for _, ep := range endpoints {
		sctx, cancel := context.WithTimeout(ctx, spaceStatusTimeout)
		st, err := cli.Status(sctx, ep)
		cancel()
		m := MemberSpace{Endpoint: ep}
		if err != nil {
			m.Err, last = err.Error(), err
		} else {
			answered++
			m.MemberID, m.DBSize, m.DBSizeInUse, m.Quota = st.Header.MemberId, st.DbSize, st.DbSizeInUse, st.DbSizeQuota
			if m.Quota <= 0 {
				m.Quota = quota
			}
			sp.Revision = max(sp.Revision, st.Header.Revision)
		}
		sp.Members = append(sp.Members, m)
	}
	if answered == 0 {
		return sp, fmt.Errorf("server: etcd status: no endpoint of %v answered: %w", endpoints, last)
	}
	actx, cancel := context.WithTimeout(ctx, spaceStatusTimeout)
	defer cancel()
	resp, err := cli.AlarmList(actx)
	if err != nil {
		return sp, fmt.Errorf("server: etcd alarm list: %w", err)
	}
	for _, a := range resp.Alarms {
		if a.Alarm != etcdserverpb.AlarmType_NONE {
			sp.Alarms = append(sp.Alarms, Alarm{MemberID: a.MemberID, Type: a.Alarm.String()})
		}
	}
	return sp, nil
}

// RecoverOptions tune RecoverSpace.
type RecoverOptions struct {
	// Endpoints are the members to defragment (nil: SpaceEndpoints).
	Endpoints []string
	// Quota stands in for members that do not report theirs (0: etcd's
	// default, 2 GiB).
	Quota int64
	// OnlyWhenFreed skips the defragmentation (returning ErrSpaceInUse)
	// when the data left after compaction is above SafeSpaceFraction of
	// the quota, where it would block the members and free nothing that
	// helps. The server's automatic recovery sets it.
	OnlyWhenFreed bool
	// MaxInUse, with OnlyWhenFreed, also skips the defragmentation when a
	// member has this much in use or more (0: no further bound). The
	// server sets it after a defragmentation that did not make room, so
	// that it tries again within EtcdDefragInterval only once records
	// have been deleted since.
	MaxInUse int64
}

// RecoverReport says what RecoverSpace did.
type RecoverReport struct {
	// CompactedTo is the revision compacted to (the current one).
	CompactedTo int64 `json:"compacted_to"`
	// Before and After are the members' sizes before the
	// defragmentation and after it (After is empty if it did not run).
	Before []MemberSpace `json:"before"`
	After  []MemberSpace `json:"after,omitempty"`
	// Defragmented reports whether the members were defragmented.
	Defragmented bool `json:"defragmented"`
	// Disarmed are the NOSPACE alarms disarmed.
	Disarmed []Alarm `json:"disarmed,omitempty"`
}

// RecoverSpace frees etcd's space and lifts the NOSPACE alarm: it compacts
// all history up to the current revision (watchers behind it re-list),
// defragments every member in turn (each blocks while it rewrites its
// database), and disarms NOSPACE once every member's database is under
// SafeSpaceFraction of its quota. "Every member" is every member it
// reaches (opts.Endpoints, or SpaceEndpoints): it disarms the alarms of
// those members only, as a member raises NOSPACE when its own database
// hits the quota. A compaction someone else already made is no error.
// With no alarm it still compacts and defragments.
func RecoverSpace(ctx context.Context, cli *clientv3.Client, opts RecoverOptions) (*RecoverReport, error) {
	eps := opts.Endpoints
	if len(eps) == 0 {
		eps = SpaceEndpoints(ctx, cli)
	}
	rep := &RecoverReport{}
	sp, err := ReadSpace(ctx, cli, eps, opts.Quota)
	if err != nil {
		return rep, err
	}
	if err := compact(ctx, cli, sp.Revision, true); err != nil {
		return rep, err
	}
	rep.CompactedTo = sp.Revision
	if sp, err = ReadSpace(ctx, cli, eps, opts.Quota); err != nil {
		return rep, err
	}
	rep.Before = sp.Members
	if err := allAnswered(sp); err != nil {
		return rep, err
	}
	if opts.OnlyWhenFreed {
		if err := overLimit(sp, func(m MemberSpace) int64 { return m.DBSizeInUse }, "in use"); err != nil {
			return rep, err
		}
		if n := maxInUse(sp.Members); opts.MaxInUse > 0 && n >= opts.MaxInUse {
			return rep, fmt.Errorf("%w: %s in use, no less than at the last defragmentation, which did not make room", ErrSpaceInUse, formatBytes(n))
		}
	}
	for _, ep := range eps {
		dctx, cancel := context.WithTimeout(ctx, spaceDefragTimeout)
		_, err := cli.Defragment(dctx, ep)
		cancel()
		rep.Defragmented = true
		if err != nil {
			return rep, fmt.Errorf("server: etcd defragment %s: %w", ep, err)
		}
	}
	if sp, err = ReadSpace(ctx, cli, eps, opts.Quota); err != nil {
		return rep, err
	}
	rep.After = sp.Members
	if err := allAnswered(sp); err != nil {
		return rep, err
	}
	if err := overLimit(sp, func(m MemberSpace) int64 { return m.DBSize }, "after defragmentation"); err != nil {
		return rep, err
	}
	for _, a := range sp.Alarms {
		if a.Type != etcdserverpb.AlarmType_NOSPACE.String() || !sp.measured(a.MemberID) {
			continue
		}
		actx, cancel := context.WithTimeout(ctx, spaceStatusTimeout)
		_, err := cli.AlarmDisarm(actx, &clientv3.AlarmMember{MemberID: a.MemberID, Alarm: etcdserverpb.AlarmType_NOSPACE})
		cancel()
		if err != nil {
			return rep, fmt.Errorf("server: etcd alarm disarm NOSPACE on member %x: %w", a.MemberID, err)
		}
		rep.Disarmed = append(rep.Disarmed, a)
	}
	return rep, nil
}

// compact compacts to rev; a revision already compacted is no error
// (another server, etcd's own compactor or an operator got there first).
func compact(ctx context.Context, cli *clientv3.Client, rev int64, physical bool) error {
	if rev <= 1 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, spaceCompactTimeout)
	defer cancel()
	var opts []clientv3.CompactOption
	if physical {
		opts = append(opts, clientv3.WithCompactPhysical())
	}
	if _, err := cli.Compact(ctx, rev, opts...); err != nil && !errors.Is(err, rpctypes.ErrCompacted) {
		return fmt.Errorf("server: etcd compact to revision %d: %w", rev, err)
	}
	return nil
}

func allAnswered(sp *Space) error {
	for _, m := range sp.Members {
		if m.Err != "" {
			return fmt.Errorf("server: etcd member %s did not answer (%s); every member must be defragmented before the alarm is disarmed", m.Endpoint, m.Err)
		}
	}
	return nil
}

func overLimit(sp *Space, size func(MemberSpace) int64, what string) error {
	for _, m := range sp.Members {
		limit := int64(float64(m.Quota) * SafeSpaceFraction)
		if size(m) >= limit {
			return fmt.Errorf("%w: member %s holds %s %s, the limit is %s (%.0f%% of the quota %s)",
				ErrSpaceInUse, m.Endpoint, formatBytes(size(m)), what, formatBytes(limit), SafeSpaceFraction*100, formatBytes(m.Quota))
		}
	}
	return nil
}

// formatBytes prints n in the largest binary unit that keeps it above 1.
func formatBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTP"[exp])
}

// spaceMonitor is the server's loop over etcd's space: it reads status and
// alarms, compacts, recovers, and is the Prometheus collector of what it
// read. Its zero value is ready; Server.watchSpace fills it (under s.wg, until runCtx ends).
type spaceMonitor struct {
	state       atomic.Pointer[Space] // last successful read; nil before
	compactedTo atomic.Int64
	compactions atomic.Int64
	compactErrs atomic.Int64
	recoveries  [3]atomic.Int64 // by recoveryResults
}

var recoveryResults = [3]string{"recovered", "in_use", "error"}

// alarmReason returns why the server is not ready because of an etcd
// alarm, "" when there is none.
func (sm *spaceMonitor) alarmReason() string {
	sp := sm.state.Load()
	if sp == nil || len(sp.Alarms) == 0 {
		return ""
	}
	var b strings.Builder
	for _, t := range alarmTypes(sp) {
		if b.Len() > 0 {
			b.WriteString("; ")
		}
		switch t {
		case "NOSPACE":
			b.WriteString("etcd alarm NOSPACE: database space exceeded, writes are refused")
			if m, ok := sp.largest(); ok {
				fmt.Fprintf(&b, " (database %s, %s in use, quota %s)", formatBytes(m.DBSize), formatBytes(m.DBSizeInUse), formatBytes(m.Quota))
			}
		case "CORRUPT":
			b.WriteString("etcd alarm CORRUPT: a member's data is inconsistent")
		default:
			b.WriteString("etcd alarm " + t)
		}
	}
	b.WriteString("; see docs/operations.md")
	return b.String()
}

func alarmTypes(sp *Space) []string {
	var ts []string
	for _, a := range sp.Alarms {
		if !slices.Contains(ts, a.Type) {
			ts = append(ts, a.Type)
		}
	}
	sort.Strings(ts)
	return ts
}

// watchSpace runs the space monitor until ctx ends. Start runs it under
// s.wg with s.runCtx.
func (s *Server) watchSpace(ctx context.Context) {
	defer s.wg.Done()
	interval := s.cfg.EtcdSpaceCheckInterval
	if interval <= 0 {
		interval = DefaultEtcdSpaceCheckInterval
	}
	var (
		rs          recoveryState
		alarmed     []string // alarm types last logged
		failedReads int
	)
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		sp, err := ReadSpace(ctx, s.cli, SpaceEndpoints(ctx, s.cli), s.cfg.EtcdQuotaBackendBytes)
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			// Keep the last state: /healthz reports an unreachable etcd.
			if failedReads++; failedReads == 3 {
				s.log.Warn("cannot read etcd's space and alarms", "err", err)
			}
		default:
			failedReads = 0
			s.space.state.Store(sp)
			if ts := alarmTypes(sp); !slices.Equal(ts, alarmed) {
				if len(ts) > 0 {
					s.log.Error("etcd alarm raised: writes are refused", "alarms", strings.Join(ts, ","), "reason", s.space.alarmReason())
				} else {
					s.log.Info("etcd alarms cleared", "were", strings.Join(alarmed, ","))
				}
				alarmed = ts
			}
			mine := s.ownsSpace()
			if mine && s.cfg.EtcdCompactionRetention > 0 {
				s.compactHistory(ctx, sp.Revision)
			}
			if s.cfg.EtcdAutoRecover && s.recovers(sp, mine) && s.autoRecover(ctx, sp, &rs) {
				continue // read the state again at once: /readyz clears now
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// recoveryState is what watchSpace remembers between recoveries.
type recoveryState struct {
	lastDefrag  time.Time
	defragInUse int64  // largest in use at lastDefrag
	lastResult  string // last logged
}

// autoRecover runs RecoverSpace for the monitor, counts and logs the
// result (a result like the last one is not logged again), and reports
// whether NOSPACE was disarmed. It defragments at most once per
// EtcdDefragInterval, unless a tenth of the quota has been freed since the
// last defragmentation.
func (s *Server) autoRecover(ctx context.Context, sp *Space, rs *recoveryState) bool {
	every := s.cfg.EtcdDefragInterval
	if every <= 0 {
		every = DefaultEtcdDefragInterval
	}
	opts := RecoverOptions{Quota: s.cfg.EtcdQuotaBackendBytes, OnlyWhenFreed: true}
	if !rs.lastDefrag.IsZero() && time.Since(rs.lastDefrag) < every {
		opts.MaxInUse = max(1, rs.defragInUse-quotaOf(sp)/10)
	}
	rep, err := RecoverSpace(ctx, s.cli, opts)
	if rep.Defragmented {
		rs.lastDefrag, rs.defragInUse = time.Now(), maxInUse(rep.Before)
	}
	if ctx.Err() != nil {
		return false // shutting down
	}
	result := "recovered"
	switch {
	case errors.Is(err, ErrSpaceInUse):
		result = "in_use"
	case err != nil:
		result = "error"
	}
	s.space.countRecovery(result)
	if result != rs.lastResult || result == "recovered" {
		switch result {
		case "recovered":
			s.log.Info("etcd space recovered: compacted, defragmented, NOSPACE disarmed", "compacted_to", rep.CompactedTo,
				"db_size_before", formatBytes(maxSize(rep.Before)), "db_size_after", formatBytes(maxSize(rep.After)))
		case "in_use":
			s.log.Warn("etcd space cannot be recovered automatically: delete records or raise the quota", "err", err)
		default:
			s.log.Warn("etcd space recovery failed; retrying", "err", err)
		}
		rs.lastResult = result
	}
	return err == nil
}

func maxInUse(ms []MemberSpace) int64 {
	var n int64
	for _, m := range ms {
		n = max(n, m.DBSizeInUse)
	}
	return n
}

func maxSize(ms []MemberSpace) int64 {
	var n int64
	for _, m := range ms {
		n = max(n, m.DBSize)
	}
	return n
}

// quotaOf returns the smallest quota of the members that answered.
func quotaOf(sp *Space) int64 {
	var q int64
	for _, m := range sp.Members {
		if m.Err == "" && (q == 0 || m.Quota < q) {
			q = m.Quota
		}
	}
	return q
}

// recovers reports whether this server recovers from sp's NOSPACE alarm:
// on an external etcd, the owner (ownsSpace) does, for every member; on
// the embedded etcd each server does for its own member — the one it
// measures, as its etcd client reaches no other (SpaceEndpoints) — which
// is the whole cluster on a single node.
func (s *Server) recovers(sp *Space, mine bool) bool {
	if s.etcd == nil {
		return mine && sp.Has("NOSPACE")
	}
	return slices.ContainsFunc(sp.Alarms, func(a Alarm) bool {
		return a.Type == etcdserverpb.AlarmType_NOSPACE.String() && sp.measured(a.MemberID)
	})
}

// ownsSpace reports whether this server compacts and recovers: the owner
// of spaceOwnerKey among the servers on this etcd, or any server when none
// is known (the membership needs a lease, which etcd refuses to grant
// while NOSPACE is raised; compaction is idempotent).
func (s *Server) ownsSpace() bool {
	o := s.members.Owner(spaceOwnerKey)
	return o == "" || o == s.members.Self()
}

// compactHistory keeps the last EtcdCompactionRetention revisions,
// compacting once a tenth of the retention has accumulated since the last
// compaction so that etcd does not walk its index every few seconds for a
// handful of revisions.
func (s *Server) compactHistory(ctx context.Context, rev int64) {
	keep := s.cfg.EtcdCompactionRetention
	target := rev - keep
	last := s.space.compactedTo.Load()
	if target <= 1 || target-last < max(1, keep/10) {
		return
	}
	if err := compact(ctx, s.cli, target, false); err != nil {
		if ctx.Err() == nil {
			s.space.compactErrs.Add(1)
			s.log.Debug("etcd compaction failed; retrying next check", "err", err)
		}
		return
	}
	s.space.compactions.Add(1)
	s.space.compactedTo.Store(target)
}

func (sm *spaceMonitor) countRecovery(result string) {
	if i := slices.Index(recoveryResults[:], result); i >= 0 {
		sm.recoveries[i].Add(1)
	}
}

var (
	descAlarm = prometheus.NewDesc("beacon_etcd_alarm",
		"Active etcd alarms by type (NOSPACE: writes refused for space; CORRUPT), 1 when raised.", []string{"type"}, nil)
	descDBSize = prometheus.NewDesc("beacon_etcd_db_size_bytes",
		"Size of the etcd database (the quota applies to it), the largest over the members this server measures (its own member with the embedded etcd, every member of an external one).", nil, nil)
	descDBInUse = prometheus.NewDesc("beacon_etcd_db_size_in_use_bytes",
		"Part of the etcd database holding data (of the member reported in beacon_etcd_db_size_bytes); the rest is freed by defragmentation.", nil, nil)
	descQuota = prometheus.NewDesc("beacon_etcd_quota_bytes",
		"etcd backend quota: at this database size etcd raises NOSPACE and refuses writes.", nil, nil)
	descCompactedTo = prometheus.NewDesc("beacon_etcd_compacted_revision",
		"Revision this server last compacted etcd's history to (0: none yet).", nil, nil)
	descCompactions = prometheus.NewDesc("beacon_etcd_compactions_total",
		"History compactions by this server, by result (ok, error).", []string{"result"}, nil)
	descRecoveries = prometheus.NewDesc("beacon_etcd_space_recoveries_total",
		"Automatic recoveries from the NOSPACE alarm by result (recovered; in_use: the data left does not fit, nothing done; error).", []string{"result"}, nil)
)

// Describe implements prometheus.Collector.
func (sm *spaceMonitor) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descAlarm, descDBSize, descDBInUse, descQuota, descCompactedTo, descCompactions, descRecoveries} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (sm *spaceMonitor) Collect(ch chan<- prometheus.Metric) {
	sp := sm.state.Load()
	if sp == nil {
		sp = &Space{}
	}
	for _, t := range []string{"NOSPACE", "CORRUPT"} {
		v := 0.0
		if sp.Has(t) {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(descAlarm, prometheus.GaugeValue, v, t)
	}
	if m, ok := sp.largest(); ok {
		ch <- prometheus.MustNewConstMetric(descDBSize, prometheus.GaugeValue, float64(m.DBSize))
		ch <- prometheus.MustNewConstMetric(descDBInUse, prometheus.GaugeValue, float64(m.DBSizeInUse))
		ch <- prometheus.MustNewConstMetric(descQuota, prometheus.GaugeValue, float64(m.Quota))
	}
	ch <- prometheus.MustNewConstMetric(descCompactedTo, prometheus.GaugeValue, float64(sm.compactedTo.Load()))
	ch <- prometheus.MustNewConstMetric(descCompactions, prometheus.CounterValue, float64(sm.compactions.Load()), "ok")
	ch <- prometheus.MustNewConstMetric(descCompactions, prometheus.CounterValue, float64(sm.compactErrs.Load()), "error")
	for i, r := range recoveryResults {
		ch <- prometheus.MustNewConstMetric(descRecoveries, prometheus.CounterValue, float64(sm.recoveries[i].Load()), r)
	}
}

package acl

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Identity is who a call comes from, as far as access goes.
type Identity struct {
	Accessor string      // the token's accessor id; AnonymousAccessor without a token
	Authz    *Authorizer // what it may do
	Session  int64       // a session-bound credential's session; 0 otherwise
}

// ErrUnknownToken is matched by the error for a well-formed secret that
// names no live token (deleted, expired, or never made).
var ErrUnknownToken = errors.New("acl: unknown token")

// System keeps the ACL records of one etcd prefix in memory (Get, then
// Watch from rev+1; relist on compaction) and writes them.
type System struct {
	cli    *clientv3.Client
	prefix string // …/acl/
	log    *slog.Logger
	now    func() time.Time

	state atomic.Pointer[state]
	ready chan struct{}

	mu       sync.Mutex
	notify   chan struct{}           // closed and replaced when the revision advances; guarded by mu
	sessions map[Hash]sessionBinding // guarded by mu
	bySess   map[int64]Hash          // guarded by mu
	perToken map[string]int          // guarded by mu; live sessions by the accessor that made them
	sessRev  int64                   // guarded by mu; the revision the session credentials are at
}

type sessionBinding struct {
	session int64
	parent  string
}

// state is one immutable generation of the tokens, policies and roles.
type state struct {
	rev          int64
	bootstrapped bool
	tokens       map[string]*Token // by accessor
	policies     map[string]*Policy
	roles        map[string]*Role
	byHash       map[Hash]*compiled
	byAccessor   map[string]*compiled
	byRole       map[string]*compiled // for client certificates, by role name
	anonymous    *compiled
}

type compiled struct {
	accessor string
	authz    *Authorizer
	expires  time.Time
}

// New makes a System over the ACL records under prefix.
func New(cli *clientv3.Client, prefix string, log *slog.Logger) *System {
	s := &System{
		cli: cli, prefix: prefix, log: log, now: time.Now,
		ready: make(chan struct{}), notify: make(chan struct{}),
		sessions: map[Hash]sessionBinding{}, bySess: map[int64]Hash{}, perToken: map[string]int{},
	}
	s.state.Store(build(0, nil))
	return s
}

// Prefix is where the records live; the registry's view skips it.
func (s *System) Prefix() string { return s.prefix }

func (s *System) tokenKey(accessor string) string { return s.prefix + "tokens/" + accessor }
func (s *System) policyKey(name string) string    { return s.prefix + "policies/" + name }
func (s *System) roleKey(name string) string      { return s.prefix + "roles/" + name }
func (s *System) sessionKey(id int64) string {
	return s.prefix + "sessions/" + strconv.FormatUint(uint64(id), 16)
}
func (s *System) bootstrapKey() string { return s.prefix + "bootstrap" }

// Ready closes once the records are loaded.
func (s *System) Ready() <-chan struct{} { return s.ready }

// Identify resolves a presented secret; "" is the anonymous token.
func (s *System) Identify(secret string) (Identity, error) {
	st := s.state.Load()
	if secret == "" {
		return Identity{Accessor: AnonymousAccessor, Authz: st.anonymous.authz}, nil
	}
	prefix, h, err := ParseSecret(secret)
	if err != nil {
		return Identity{}, err
	}
	if prefix == SessionPrefix {
		s.mu.Lock()
		b, ok := s.sessions[h]
		s.mu.Unlock()
		if !ok {
			return Identity{}, fmt.Errorf("%w: the session of this session credential has ended", ErrUnknownToken)
		}
		p := st.parent(b.parent)
		if p == nil || p.expired(s.now()) {
			return Identity{}, fmt.Errorf("%w: the token that made this session credential's session (%s) is gone or expired", ErrUnknownToken, b.parent)
		}
		return Identity{Accessor: b.parent, Authz: p.authz, Session: b.session}, nil
	}
	c := st.byHash[h]
	if c == nil {
		return Identity{}, fmt.Errorf("%w (deleted, or never made)", ErrUnknownToken)
	}
	if c.expired(s.now()) {
		return Identity{}, fmt.Errorf("%w: token %s expired at %s", ErrUnknownToken, c.accessor, c.expires.UTC().Format(time.RFC3339))
	}
	return Identity{Accessor: c.accessor, Authz: c.authz}, nil
}

// parent finds the identity a session credential acts within: a token,
// the anonymous token, or a client certificate's role.
func (st *state) parent(accessor string) *compiled {
	if accessor == AnonymousAccessor {
		return st.anonymous
	}
	if role, ok := strings.CutPrefix(accessor, RoleAccessorPrefix); ok {
		return st.byRole[role]
	}
	return st.byAccessor[accessor]
}

// IdentifyRole is the identity of a client certificate whose common name
// names a role (false if no role has that name).
func (s *System) IdentifyRole(name string) (Identity, bool) {
	c := s.state.Load().byRole[name]
	if c == nil {
		return Identity{}, false
	}
	return Identity{Accessor: c.accessor, Authz: c.authz}, true
}

// RoleAccessorPrefix marks, in logs and errors, an identity that is a
// client certificate's role rather than a token.
const RoleAccessorPrefix = "role:"

func (c *compiled) expired(now time.Time) bool { return !c.expires.IsZero() && !now.Before(c.expires) }

// SessionParent returns the accessor of the token that made a session (""
// if the session has no credential: made without ACLs, or gone).
func (s *System) SessionParent(id int64) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if h, ok := s.bySess[id]; ok {
		return s.sessions[h].parent
	}
	return ""
}

// Bootstrapped reports whether the one-time bootstrap happened.
func (s *System) Bootstrapped() bool { return s.state.Load().bootstrapped }

// Token, Policy and Role read one record (nil if absent).
func (s *System) Token(accessor string) *Token { return s.state.Load().tokens[accessor] }
func (s *System) Policy(name string) *Policy   { return s.state.Load().policies[name] }
func (s *System) Role(name string) *Role       { return s.state.Load().roles[name] }

// Tokens, Policies and Roles list the records.
func (s *System) Tokens() map[string]*Token    { return s.state.Load().tokens }
func (s *System) Policies() map[string]*Policy { return s.state.Load().policies }
func (s *System) Roles() map[string]*Role      { return s.state.Load().roles }
func (s *System) Authorizer(accessor string) *Authorizer {
	if c := s.state.Load().parent(accessor); c != nil {
		return c.authz
	}
	return nil
}

type records struct {
	rev          int64
	bootstrapped bool
	tokens       map[string]*Token
	policies     map[string]*Policy
	roles        map[string]*Role
}

// build compiles every token's authorizer.
func build(rev int64, r *records) *state {
	st := &state{rev: rev, tokens: map[string]*Token{}, policies: map[string]*Policy{}, roles: map[string]*Role{},
		byHash: map[Hash]*compiled{}, byAccessor: map[string]*compiled{}, byRole: map[string]*compiled{}}
	if r != nil {
		st.bootstrapped, st.tokens, st.policies, st.roles = r.bootstrapped, r.tokens, r.policies, r.roles
	}
	parsed := map[string][]Rule{}
	for name, p := range st.policies {
		rules, err := ParseRules(p.Rules)
		if err == nil { // written through Validate: a bad one is a hand edit, and grants nothing
			parsed[name] = rules
		}
	}
	rulesOf := func(policies []string, ids []ServiceIdentity, into [][]Rule) [][]Rule {
		for _, p := range policies {
			if p == ManagementPolicy {
				into = append(into, ManagementRules)
			} else if rs, ok := parsed[p]; ok {
				into = append(into, rs)
			}
		}
		for _, id := range ids {
			into = append(into, id.Rules())
		}
		return into
	}
	compile := func(t *Token) *compiled {
		rules := rulesOf(t.Policies, t.ServiceIdentities, nil)
		for _, rn := range t.Roles {
			if role := st.roles[rn]; role != nil {
				rules = rulesOf(role.Policies, role.ServiceIdentities, rules)
			}
		}
		return &compiled{accessor: t.Accessor, authz: Compile(rules...), expires: t.ExpiresAt}
	}
	st.anonymous = &compiled{accessor: AnonymousAccessor, authz: Compile()}
	for name, role := range st.roles {
		acc := RoleAccessorPrefix + name
		st.byRole[name] = &compiled{accessor: acc, authz: Compile(rulesOf(role.Policies, role.ServiceIdentities, nil)...)}
	}
	for acc, t := range st.tokens {
		c := compile(t)
		if acc == AnonymousAccessor {
			st.anonymous = c
			continue
		}
		st.byAccessor[acc] = c
		if h, err := ParseHash(t.SecretHash); err == nil {
			st.byHash[h] = c
		}
	}
	return st
}

// Run keeps the records current until ctx ends.
func (s *System) Run(ctx context.Context) {
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		rev, err := s.relist(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			s.log.Warn("acl: listing failed, retrying", "err", err, "in", backoff)
			t := time.NewTimer(backoff)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			backoff = min(2*backoff, 5*time.Second)
			continue
		}
		backoff = 100 * time.Millisecond
		s.watch(ctx, rev)
	}
}

func (s *System) relist(ctx context.Context) (int64, error) {
	resp, err := s.cli.Get(ctx, s.prefix, clientv3.WithPrefix())
	if err != nil {
		return 0, err
	}
	r := &records{tokens: map[string]*Token{}, policies: map[string]*Policy{}, roles: map[string]*Role{}}
	creds := map[int64]*SessionCredential{}
	for _, kv := range resp.Kvs {
		s.load(r, creds, string(kv.Key), kv.Value)
	}
	s.mu.Lock()
	s.sessions, s.bySess, s.perToken = map[Hash]sessionBinding{}, map[int64]Hash{}, map[string]int{}
	for id, c := range creds {
		s.bindLocked(id, c)
	}
	s.sessRev = resp.Header.Revision
	s.mu.Unlock()
	s.publish(build(resp.Header.Revision, r))
	select {
	case <-s.ready:
	default:
		close(s.ready)
	}
	return resp.Header.Revision, nil
}

func (s *System) bindLocked(id int64, c *SessionCredential) {
	h, err := ParseHash(c.SecretHash)
	if err != nil {
		return
	}
	s.unbindLocked(id) // a record written again, or made known by BindSession first
	s.sessions[h] = sessionBinding{session: id, parent: c.Parent}
	s.bySess[id] = h
	s.perToken[c.Parent]++
}

func (s *System) unbindLocked(id int64) {
	h, ok := s.bySess[id]
	if !ok {
		return
	}
	parent := s.sessions[h].parent
	delete(s.sessions, h)
	delete(s.bySess, id)
	if s.perToken[parent]--; s.perToken[parent] <= 0 {
		delete(s.perToken, parent)
	}
}

// SessionsOf counts the live sessions a token made.
func (s *System) SessionsOf(accessor string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.perToken[accessor]
}

// load decodes one record into r (or creds); bad records are logged and
// skipped: they grant nothing.
func (s *System) load(r *records, creds map[int64]*SessionCredential, key string, value []byte) {
	rest := strings.TrimPrefix(key, s.prefix)
	kind, name, _ := strings.Cut(rest, "/")
	var err error
	switch kind {
	case "bootstrap":
		r.bootstrapped = true
	case "tokens":
		t := &Token{}
		if err = decode(value, t); err == nil {
			r.tokens[name] = t
		}
	case "policies":
		p := &Policy{}
		if err = decode(value, p); err == nil {
			r.policies[name] = p
		}
	case "roles":
		ro := &Role{}
		if err = decode(value, ro); err == nil {
			r.roles[name] = ro
		}
	case "sessions":
		c := &SessionCredential{}
		var id uint64
		if id, err = strconv.ParseUint(name, 16, 64); err == nil {
			if err = decode(value, c); err == nil {
				creds[int64(id)] = c
			}
		}
	default:
		err = errors.New("not an ACL record")
	}
	if err != nil {
		s.log.Warn("acl: skipping a bad record", "key", key, "err", err)
	}
}

func (s *System) watch(ctx context.Context, rev int64) {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	for resp := range s.cli.Watch(wctx, s.prefix, clientv3.WithPrefix(), clientv3.WithRev(rev+1), clientv3.WithProgressNotify()) {
		if err := resp.Err(); err != nil {
			if !errors.Is(err, rpctypes.ErrCompacted) {
				s.log.Warn("acl: watch ended, listing again", "err", err)
			}
			return
		}
		cur := s.state.Load()
		if resp.IsProgressNotify() || len(resp.Events) == 0 {
			if resp.Header.Revision > cur.rev {
				next := *cur
				next.rev = resp.Header.Revision
				s.publish(&next)
			}
			continue
		}
		r := &records{rev: resp.Header.Revision, bootstrapped: cur.bootstrapped,
			tokens: clone(cur.tokens), policies: clone(cur.policies), roles: clone(cur.roles)}
		changedRecords := false
		s.mu.Lock()
		for _, ev := range resp.Events {
			key := string(ev.Kv.Key)
			kind, name, _ := strings.Cut(strings.TrimPrefix(key, s.prefix), "/")
			if kind == "sessions" {
				// In order: a credential put and deleted in one response
				// stays deleted.
				s.applySessionLocked(key, name, ev)
				continue
			}
			if ev.Type == mvccpb.DELETE {
				switch kind {
				case "tokens":
					delete(r.tokens, name)
				case "policies":
					delete(r.policies, name)
				case "roles":
					delete(r.roles, name)
				case "bootstrap":
					r.bootstrapped = false
				}
				changedRecords = true
				continue
			}
			s.load(r, nil, key, ev.Kv.Value)
			changedRecords = true
		}
		s.sessRev = resp.Header.Revision
		s.mu.Unlock()
		if changedRecords {
			s.publish(build(resp.Header.Revision, r))
		} else {
			next := *cur
			next.rev = resp.Header.Revision
			s.publish(&next)
		}
	}
}

func (s *System) applySessionLocked(key, name string, ev *clientv3.Event) {
	id, err := strconv.ParseUint(name, 16, 64)
	if err != nil {
		s.log.Warn("acl: skipping a bad record", "key", key, "err", err)
		return
	}
	if ev.Type == mvccpb.DELETE {
		s.unbindLocked(int64(id))
		return
	}
	c := &SessionCredential{}
	if err := decode(ev.Kv.Value, c); err != nil {
		s.log.Warn("acl: skipping a bad record", "key", key, "err", err)
		return
	}
	s.bindLocked(int64(id), c)
}

func clone[V any](m map[string]V) map[string]V {
	out := make(map[string]V, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

func (s *System) publish(st *state) {
	s.state.Store(st)
	s.mu.Lock()
	close(s.notify)
	s.notify = make(chan struct{})
	s.mu.Unlock()
}

// WaitRevision waits until the records are at least as new as rev.
func (s *System) WaitRevision(ctx context.Context, rev int64) error {
	for {
		s.mu.Lock()
		ch := s.notify
		s.mu.Unlock()
		if s.state.Load().rev >= rev {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// CatchUp waits until the records hold every write etcd acknowledged
// before the call: a token made on another server a moment ago is then
// known here.
func (s *System) CatchUp(ctx context.Context) error {
	resp, err := s.cli.Get(ctx, s.prefix+"\x00", clientv3.WithCountOnly())
	if err != nil {
		return err
	}
	if resp.Header.Revision <= s.state.Load().rev {
		return nil
	}
	if err := s.cli.RequestProgress(clientv3.WithRequireLeader(ctx)); err != nil {
		return err
	}
	return s.WaitRevision(ctx, resp.Header.Revision)
}

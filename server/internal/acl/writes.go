package acl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"beacon.dev/beacon/registry"
)

// Errors of the writes; the API maps them to codes.
var (
	ErrBootstrapped = errors.New("acl: already bootstrapped")
	ErrNotFound     = errors.New("acl: not found")
	ErrExists       = errors.New("acl: already exists")
)

// MaxTokens, MaxPolicies and MaxRoles bound what the ACL records may hold
// in etcd and in every server's memory.
const (
	MaxTokens   = 100000
	MaxPolicies = 10000
	MaxRoles    = 10000
)

// put writes a record; create refuses to replace one, update to make one.
func (s *System) put(ctx context.Context, key string, v any, create, update bool) (int64, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return 0, err
	}
	var cmps []clientv3.Cmp
	switch {
	case create:
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(key), "=", 0))
	case update:
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(key), ">", 0))
	}
	resp, err := s.cli.Txn(ctx).If(cmps...).Then(clientv3.OpPut(key, string(b))).Commit()
	if err != nil {
		return 0, err
	}
	if !resp.Succeeded {
		if create {
			return 0, ErrExists
		}
		return 0, ErrNotFound
	}
	s.settle(ctx, resp.Header.Revision)
	return resp.Header.Revision, nil
}

// settle waits, briefly, until this server's records hold a write etcd
// committed, so that the caller's next call here sees it. It never fails
// the write: a token etcd holds must reach its caller with its secret.
func (s *System) settle(ctx context.Context, rev int64) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), settleTimeout)
	defer cancel()
	_ = s.WaitRevision(ctx, rev)
}

const settleTimeout = 5 * time.Second

func (s *System) del(ctx context.Context, key string) (int64, error) {
	resp, err := s.cli.Delete(ctx, key)
	if err != nil {
		return 0, err
	}
	if resp.Deleted == 0 {
		return 0, ErrNotFound
	}
	s.settle(ctx, resp.Header.Revision)
	return resp.Header.Revision, nil
}

// Bootstrap makes the first management token, once. The secret is
// returned, never stored.
func (s *System) Bootstrap(ctx context.Context) (*Token, string, error) {
	t, secret := s.managementToken("bootstrap management token")
	b, _ := json.Marshal(t)
	resp, err := s.cli.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(s.bootstrapKey()), "=", 0)).
		Then(clientv3.OpPut(s.bootstrapKey(), t.Accessor), clientv3.OpPut(s.tokenKey(t.Accessor), string(b))).
		Commit()
	if err != nil {
		return nil, "", err
	}
	if !resp.Succeeded {
		return nil, "", ErrBootstrapped
	}
	s.settle(ctx, resp.Header.Revision)
	return t, secret, nil
}

// BreakGlass makes a new management token whether or not the system was
// bootstrapped; the caller proved it can read the server's data dir.
func (s *System) BreakGlass(ctx context.Context) (*Token, string, error) {
	t, secret := s.managementToken("break-glass management token")
	b, _ := json.Marshal(t)
	resp, err := s.cli.Txn(ctx).Then(clientv3.OpPut(s.bootstrapKey(), t.Accessor), clientv3.OpPut(s.tokenKey(t.Accessor), string(b))).Commit()
	if err != nil {
		return nil, "", err
	}
	s.settle(ctx, resp.Header.Revision)
	return t, secret, nil
}

func (s *System) managementToken(desc string) (*Token, string) {
	secret, h := NewSecret(TokenPrefix)
	return &Token{Accessor: NewAccessor(), SecretHash: h.String(), Description: desc,
		Policies: []string{ManagementPolicy}, CreatedAt: s.now().UTC()}, secret
}

// CreateToken stores a new token made of t's fields (its accessor and
// secret are made here) and returns it with its secret.
func (s *System) CreateToken(ctx context.Context, t Token) (*Token, string, error) {
	if err := t.Validate(); err != nil {
		return nil, "", err
	}
	if n := len(s.Tokens()); n >= MaxTokens {
		return nil, "", &registry.FieldError{Field: "tokens", Reason: fmt.Sprintf("%d tokens exist, at most %d", n, MaxTokens)}
	}
	secret, h := NewSecret(TokenPrefix)
	t.Accessor, t.SecretHash, t.CreatedAt = NewAccessor(), h.String(), s.now().UTC()
	if _, err := s.put(ctx, s.tokenKey(t.Accessor), &t, true, false); err != nil {
		return nil, "", err
	}
	return &t, secret, nil
}

// UpdateToken replaces a token's description, policies, roles, service
// identities and expiry; its accessor and secret stay. The anonymous
// token is made on its first update.
func (s *System) UpdateToken(ctx context.Context, t Token) (*Token, error) {
	if err := t.Validate(); err != nil {
		return nil, err
	}
	if t.Accessor == AnonymousAccessor && !t.ExpiresAt.IsZero() {
		return nil, &registry.FieldError{Field: "expires_at", Reason: "the anonymous token does not expire (give it fewer policies instead)"}
	}
	old := s.Token(t.Accessor)
	switch {
	case old != nil:
		t.SecretHash, t.CreatedAt = old.SecretHash, old.CreatedAt
	case t.Accessor == AnonymousAccessor:
		t.CreatedAt = s.now().UTC()
	default:
		return nil, ErrNotFound
	}
	if _, err := s.put(ctx, s.tokenKey(t.Accessor), &t, false, t.Accessor != AnonymousAccessor); err != nil {
		return nil, err
	}
	return &t, nil
}

// DeleteToken deletes a token; the session credentials it made stop
// working with it.
func (s *System) DeleteToken(ctx context.Context, accessor string) error {
	_, err := s.del(ctx, s.tokenKey(accessor))
	return err
}

// PutPolicy creates or replaces a policy.
func (s *System) PutPolicy(ctx context.Context, p Policy) error {
	if err := p.Validate(); err != nil {
		return err
	}
	if n := len(s.Policies()); s.Policy(p.Name) == nil && n >= MaxPolicies {
		return &registry.FieldError{Field: "policies", Reason: fmt.Sprintf("%d policies exist, at most %d", n, MaxPolicies)}
	}
	_, err := s.put(ctx, s.policyKey(p.Name), &p, false, false)
	return err
}

// DeletePolicy deletes a policy; tokens and roles naming it lose what it
// granted.
func (s *System) DeletePolicy(ctx context.Context, name string) error {
	_, err := s.del(ctx, s.policyKey(name))
	return err
}

// PutRole creates or replaces a role.
func (s *System) PutRole(ctx context.Context, r Role) error {
	if err := r.Validate(); err != nil {
		return err
	}
	if n := len(s.Roles()); s.Role(r.Name) == nil && n >= MaxRoles {
		return &registry.FieldError{Field: "roles", Reason: fmt.Sprintf("%d roles exist, at most %d", n, MaxRoles)}
	}
	_, err := s.put(ctx, s.roleKey(r.Name), &r, false, false)
	return err
}

// DeleteRole deletes a role.
func (s *System) DeleteRole(ctx context.Context, name string) error {
	_, err := s.del(ctx, s.roleKey(name))
	return err
}

// BindSession gives a session its credential, stored on the session's
// lease so that it ends with the session, and returns the secret.
func (s *System) BindSession(ctx context.Context, session int64, parent string) (string, error) {
	secret, h := NewSecret(SessionPrefix)
	b, _ := json.Marshal(&SessionCredential{SecretHash: h.String(), Parent: parent})
	resp, err := s.cli.Put(ctx, s.sessionKey(session), string(b), clientv3.WithLease(clientv3.LeaseID(session)))
	if err != nil {
		return "", err
	}
	// Known here at once: the session's next call may come before the
	// watch delivers the record — unless the watch is past the put
	// already, and may have seen the session end.
	s.mu.Lock()
	if s.sessRev < resp.Header.Revision {
		s.bindLocked(session, &SessionCredential{SecretHash: h.String(), Parent: parent})
	}
	s.mu.Unlock()
	return secret, nil
}

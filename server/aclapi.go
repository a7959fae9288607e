package server

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/timestamppb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/internal/acl"
)

// aclAPI serves tokens, policies and roles (docs/security.md). acl:read
// reads them, acl:write changes them; a token with acl:write can make any
// token, so it is as strong as a management token.
type aclAPI struct{ s *Server }

var _ beaconv1connect.AclServiceHandler = aclAPI{}

// MaxTokenTTL bounds a token's time to live when it has one.
const MaxTokenTTL = 10 * 365 * 24 * time.Hour

var errACLOff = connect.NewError(connect.CodeFailedPrecondition, errors.New("acl: ACLs are off on this server: start it with --acl"))

// need checks that ACLs are on and the caller has access to the ACL system.
func (a aclAPI) need(ctx context.Context, access acl.Access) error {
	if a.s.acl == nil {
		return errACLOff
	}
	return needGlobal(ctx, acl.ACL, access)
}

func aclError(err error) error {
	switch {
	case errors.Is(err, acl.ErrNotFound):
		return connect.NewError(connect.CodeNotFound, err)
	case errors.Is(err, acl.ErrExists):
		return connect.NewError(connect.CodeAlreadyExists, err)
	case errors.Is(err, acl.ErrBootstrapped):
		return connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("%w: a lost management token is replaced with `beacon acl bootstrap --break-glass FILE` (docs/security.md)", err))
	}
	return toConnectError(err)
}

func identitiesFromProto(ids []*beaconv1.AclServiceIdentity) []acl.ServiceIdentity {
	var out []acl.ServiceIdentity
	for _, id := range ids {
		ns := id.GetNamespace()
		if ns == "" {
			ns = registry.DefaultNamespace
		}
		out = append(out, acl.ServiceIdentity{Namespace: ns, Service: id.GetService()})
	}
	return out
}

func identitiesToProto(ids []acl.ServiceIdentity) []*beaconv1.AclServiceIdentity {
	var out []*beaconv1.AclServiceIdentity
	for _, id := range ids {
		out = append(out, &beaconv1.AclServiceIdentity{Namespace: id.Namespace, Service: id.Service})
	}
	return out
}

func tokenToProto(t *acl.Token, secret string) *beaconv1.AclToken {
	p := &beaconv1.AclToken{
		AccessorId: t.Accessor, SecretId: secret, Description: t.Description,
		Policies: t.Policies, Roles: t.Roles, ServiceIdentities: identitiesToProto(t.ServiceIdentities),
	}
	if !t.CreatedAt.IsZero() {
		p.CreatedAt = timestamppb.New(t.CreatedAt)
	}
	if !t.ExpiresAt.IsZero() {
		p.ExpiresAt = timestamppb.New(t.ExpiresAt)
	}
	return p
}

func tokenFromProto(p *beaconv1.AclToken) acl.Token {
	t := acl.Token{
		Accessor: p.GetAccessorId(), Description: p.GetDescription(),
		Policies: p.GetPolicies(), Roles: p.GetRoles(), ServiceIdentities: identitiesFromProto(p.GetServiceIdentities()),
	}
	if p.GetExpiresAt() != nil {
		t.ExpiresAt = p.GetExpiresAt().AsTime()
	}
	return t
}

func (a aclAPI) Bootstrap(ctx context.Context, req *connect.Request[beaconv1.BootstrapRequest]) (*connect.Response[beaconv1.BootstrapResponse], error) {
	if a.s.acl == nil {
		return nil, errACLOff
	}
	var t *acl.Token
	var secret string
	var err error
	if key := req.Msg.GetBreakGlassKey(); key != "" {
		ok, rerr := a.s.breakGlass.use(key)
		if !ok {
			return nil, connect.NewError(connect.CodePermissionDenied, fmt.Errorf("acl: the break-glass key does not match: it is replaced at every start and after every use; read it again from %s", a.s.breakGlass.path))
		}
		if rerr != nil {
			a.s.log.Error("acl: writing the next break-glass key failed; restart the server to make one", "err", rerr)
		}
		t, secret, err = a.s.acl.BreakGlass(ctx)
		if err == nil {
			a.s.log.Warn("acl: a management token was made with the break-glass key", "accessor", t.Accessor, "source", connOf(ctx).addr)
		}
	} else {
		t, secret, err = a.s.acl.Bootstrap(ctx)
	}
	if err != nil {
		return nil, aclError(err)
	}
	return connect.NewResponse(&beaconv1.BootstrapResponse{Token: tokenToProto(t, secret)}), nil
}

func (a aclAPI) CreateToken(ctx context.Context, req *connect.Request[beaconv1.CreateTokenRequest]) (*connect.Response[beaconv1.CreateTokenResponse], error) {
	if err := a.need(ctx, acl.Write); err != nil {
		return nil, err
	}
	t := tokenFromProto(req.Msg.GetToken())
	if d := req.Msg.GetTtl(); d != nil {
		if err := d.CheckValid(); err != nil || d.AsDuration() <= 0 || d.AsDuration() > MaxTokenTTL || !t.ExpiresAt.IsZero() {
			return nil, toConnectError(&registry.FieldError{Field: "ttl", Reason: fmt.Sprintf("must be positive, at most %v, and not with token.expires_at", MaxTokenTTL)})
		}
		t.ExpiresAt = time.Now().Add(d.AsDuration()).UTC()
	}
	made, secret, err := a.s.acl.CreateToken(ctx, t)
	if err != nil {
		return nil, aclError(err)
	}
	return connect.NewResponse(&beaconv1.CreateTokenResponse{Token: tokenToProto(made, secret)}), nil
}

func (a aclAPI) UpdateToken(ctx context.Context, req *connect.Request[beaconv1.UpdateTokenRequest]) (*connect.Response[beaconv1.UpdateTokenResponse], error) {
	if err := a.need(ctx, acl.Write); err != nil {
		return nil, err
	}
	t, err := a.s.acl.UpdateToken(ctx, tokenFromProto(req.Msg.GetToken()))
	if err != nil {
		return nil, aclError(err)
	}
	return connect.NewResponse(&beaconv1.UpdateTokenResponse{Token: tokenToProto(t, "")}), nil
}

func (a aclAPI) ReadToken(ctx context.Context, req *connect.Request[beaconv1.ReadTokenRequest]) (*connect.Response[beaconv1.ReadTokenResponse], error) {
	if err := a.need(ctx, acl.Read); err != nil {
		return nil, err
	}
	t := a.s.acl.Token(req.Msg.GetAccessorId())
	if t == nil && req.Msg.GetAccessorId() == acl.AnonymousAccessor {
		t = &acl.Token{Accessor: acl.AnonymousAccessor, Description: "calls without a token"}
	}
	if t == nil {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("acl: token %q: not found", req.Msg.GetAccessorId()))
	}
	return connect.NewResponse(&beaconv1.ReadTokenResponse{Token: tokenToProto(t, "")}), nil
}

func (a aclAPI) ListTokens(ctx context.Context, _ *connect.Request[beaconv1.ListTokensRequest]) (*connect.Response[beaconv1.ListTokensResponse], error) {
	if err := a.need(ctx, acl.Read); err != nil {
		return nil, err
	}
	resp := &beaconv1.ListTokensResponse{}
	for _, t := range a.s.acl.Tokens() {
		resp.Tokens = append(resp.Tokens, tokenToProto(t, ""))
	}
	slices.SortFunc(resp.Tokens, func(x, y *beaconv1.AclToken) int { return strings.Compare(x.AccessorId, y.AccessorId) })
	return connect.NewResponse(resp), nil
}

func (a aclAPI) DeleteToken(ctx context.Context, req *connect.Request[beaconv1.DeleteTokenRequest]) (*connect.Response[beaconv1.DeleteTokenResponse], error) {
	if err := a.need(ctx, acl.Write); err != nil {
		return nil, err
	}
	if err := a.s.acl.DeleteToken(ctx, req.Msg.GetAccessorId()); err != nil {
		return nil, aclError(fmt.Errorf("token %q: %w", req.Msg.GetAccessorId(), err))
	}
	return connect.NewResponse(&beaconv1.DeleteTokenResponse{}), nil
}

func (a aclAPI) PutPolicy(ctx context.Context, req *connect.Request[beaconv1.PutPolicyRequest]) (*connect.Response[beaconv1.PutPolicyResponse], error) {
	if err := a.need(ctx, acl.Write); err != nil {
		return nil, err
	}
	p := req.Msg.GetPolicy()
	if err := a.s.acl.PutPolicy(ctx, acl.Policy{Name: p.GetName(), Description: p.GetDescription(), Rules: p.GetRules()}); err != nil {
		return nil, aclError(err)
	}
	return connect.NewResponse(&beaconv1.PutPolicyResponse{}), nil
}

func policyToProto(p *acl.Policy) *beaconv1.AclPolicy {
	return &beaconv1.AclPolicy{Name: p.Name, Description: p.Description, Rules: p.Rules}
}

// managementPolicy is the builtin policy as Read and List show it.
var managementPolicy = &acl.Policy{Name: acl.ManagementPolicy, Description: "builtin: everything", Rules: acl.FormatRules(acl.ManagementRules)}

func (a aclAPI) ReadPolicy(ctx context.Context, req *connect.Request[beaconv1.ReadPolicyRequest]) (*connect.Response[beaconv1.ReadPolicyResponse], error) {
	if err := a.need(ctx, acl.Read); err != nil {
		return nil, err
	}
	p := a.s.acl.Policy(req.Msg.GetName())
	if req.Msg.GetName() == acl.ManagementPolicy {
		p = managementPolicy
	}
	if p == nil {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("acl: policy %q: not found", req.Msg.GetName()))
	}
	return connect.NewResponse(&beaconv1.ReadPolicyResponse{Policy: policyToProto(p)}), nil
}

func (a aclAPI) ListPolicies(ctx context.Context, _ *connect.Request[beaconv1.ListPoliciesRequest]) (*connect.Response[beaconv1.ListPoliciesResponse], error) {
	if err := a.need(ctx, acl.Read); err != nil {
		return nil, err
	}
	resp := &beaconv1.ListPoliciesResponse{Policies: []*beaconv1.AclPolicy{policyToProto(managementPolicy)}}
	for _, p := range a.s.acl.Policies() {
		resp.Policies = append(resp.Policies, policyToProto(p))
	}
	slices.SortFunc(resp.Policies, func(x, y *beaconv1.AclPolicy) int { return strings.Compare(x.Name, y.Name) })
	return connect.NewResponse(resp), nil
}

func (a aclAPI) DeletePolicy(ctx context.Context, req *connect.Request[beaconv1.DeletePolicyRequest]) (*connect.Response[beaconv1.DeletePolicyResponse], error) {
	if err := a.need(ctx, acl.Write); err != nil {
		return nil, err
	}
	if err := a.s.acl.DeletePolicy(ctx, req.Msg.GetName()); err != nil {
		return nil, aclError(fmt.Errorf("policy %q: %w", req.Msg.GetName(), err))
	}
	return connect.NewResponse(&beaconv1.DeletePolicyResponse{}), nil
}

func roleToProto(r *acl.Role) *beaconv1.AclRole {
	return &beaconv1.AclRole{Name: r.Name, Description: r.Description, Policies: r.Policies, ServiceIdentities: identitiesToProto(r.ServiceIdentities)}
}

func (a aclAPI) PutRole(ctx context.Context, req *connect.Request[beaconv1.PutRoleRequest]) (*connect.Response[beaconv1.PutRoleResponse], error) {
	if err := a.need(ctx, acl.Write); err != nil {
		return nil, err
	}
	r := req.Msg.GetRole()
	role := acl.Role{Name: r.GetName(), Description: r.GetDescription(), Policies: r.GetPolicies(), ServiceIdentities: identitiesFromProto(r.GetServiceIdentities())}
	if err := a.s.acl.PutRole(ctx, role); err != nil {
		return nil, aclError(err)
	}
	return connect.NewResponse(&beaconv1.PutRoleResponse{}), nil
}

func (a aclAPI) ReadRole(ctx context.Context, req *connect.Request[beaconv1.ReadRoleRequest]) (*connect.Response[beaconv1.ReadRoleResponse], error) {
	if err := a.need(ctx, acl.Read); err != nil {
		return nil, err
	}
	r := a.s.acl.Role(req.Msg.GetName())
	if r == nil {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("acl: role %q: not found", req.Msg.GetName()))
	}
	return connect.NewResponse(&beaconv1.ReadRoleResponse{Role: roleToProto(r)}), nil
}

func (a aclAPI) ListRoles(ctx context.Context, _ *connect.Request[beaconv1.ListRolesRequest]) (*connect.Response[beaconv1.ListRolesResponse], error) {
	if err := a.need(ctx, acl.Read); err != nil {
		return nil, err
	}
	resp := &beaconv1.ListRolesResponse{}
	for _, r := range a.s.acl.Roles() {
		resp.Roles = append(resp.Roles, roleToProto(r))
	}
	slices.SortFunc(resp.Roles, func(x, y *beaconv1.AclRole) int { return strings.Compare(x.Name, y.Name) })
	return connect.NewResponse(resp), nil
}

func (a aclAPI) DeleteRole(ctx context.Context, req *connect.Request[beaconv1.DeleteRoleRequest]) (*connect.Response[beaconv1.DeleteRoleResponse], error) {
	if err := a.need(ctx, acl.Write); err != nil {
		return nil, err
	}
	if err := a.s.acl.DeleteRole(ctx, req.Msg.GetName()); err != nil {
		return nil, aclError(fmt.Errorf("role %q: %w", req.Msg.GetName(), err))
	}
	return connect.NewResponse(&beaconv1.DeleteRoleResponse{}), nil
}

// WhoAmI needs no permission: it tells a caller what its own token may do.
func (a aclAPI) WhoAmI(ctx context.Context, _ *connect.Request[beaconv1.WhoAmIRequest]) (*connect.Response[beaconv1.WhoAmIResponse], error) {
	id := identityOf(ctx)
	resp := &beaconv1.WhoAmIResponse{AclEnabled: a.s.acl != nil, SessionId: id.Session, EffectiveRules: acl.FormatRules(id.Authz.Rules())}
	if a.s.acl != nil {
		t := a.s.acl.Token(id.Accessor)
		if t == nil {
			t = &acl.Token{Accessor: id.Accessor}
		}
		resp.Token = tokenToProto(t, "")
	}
	return connect.NewResponse(resp), nil
}

// maxAuthorizeChecks and maxAuthorizeName bound one Authorize call.
const (
	maxAuthorizeChecks = 64
	maxAuthorizeName   = 1024
)

func (a aclAPI) Authorize(ctx context.Context, req *connect.Request[beaconv1.AuthorizeRequest]) (*connect.Response[beaconv1.AuthorizeResponse], error) {
	checks := req.Msg.GetChecks()
	if len(checks) > maxAuthorizeChecks {
		return nil, toConnectError(&registry.FieldError{Field: "checks", Value: fmt.Sprint(len(checks)), Reason: fmt.Sprintf("at most %d", maxAuthorizeChecks)})
	}
	id := identityOf(ctx)
	authz := id.Authz
	resp := &beaconv1.AuthorizeResponse{AclEnabled: a.s.acl != nil, Allowed: make([]bool, len(checks))}
	for i, c := range checks {
		field := fmt.Sprintf("checks[%d]", i)
		var need acl.Access
		switch c.GetAccess() {
		case "read":
			need = acl.Read
		case "write":
			need = acl.Write
		default:
			return nil, toConnectError(&registry.FieldError{Field: field + ".access", Value: c.GetAccess(), Reason: "must be read or write"})
		}
		var has acl.Access
		switch c.GetResource() {
		case "service", "key":
			ns, err := namespaceOf(c.GetNamespace())
			if err != nil {
				return nil, toConnectError(&registry.FieldError{Field: field + ".namespace", Value: c.GetNamespace(), Reason: err.Error()})
			}
			if len(c.GetName()) > maxAuthorizeName {
				return nil, toConnectError(&registry.FieldError{Field: field + ".name", Reason: fmt.Sprintf("%d bytes, at most %d", len(c.GetName()), maxAuthorizeName)})
			}
			if c.GetResource() == "service" {
				has = authz.Service(ns, c.GetName())
			} else {
				has = authz.Key(ns, c.GetName())
			}
		case "session", "operator", "acl":
			if id.Session == 0 { // a session credential has no global rights (needGlobal)
				has = authz.Global(map[string]acl.Resource{"session": acl.Session, "operator": acl.Operator, "acl": acl.ACL}[c.GetResource()])
			}
		default:
			return nil, toConnectError(&registry.FieldError{Field: field + ".resource", Value: c.GetResource(), Reason: "must be service, key, session, operator or acl"})
		}
		resp.Allowed[i] = has >= need
	}
	return connect.NewResponse(resp), nil
}

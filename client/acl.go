package client

import (
	"context"
	"errors"
	"slices"
	"strings"

	"connectrpc.com/connect"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/registry"
)

// ACL returns a client of the ACL API — tokens, policies, roles, WhoAmI
// (docs/security.md) — over the client's connections, TLS and token. It
// moves to the next server as the client's own calls do, except that the
// calls that must not happen twice (Bootstrap, CreateToken and the
// deletes) move on only when a server could not be reached at all, and
// are never cut short by the attempt timeout: a server that took such a
// call may have acted on it.
//
// Its errors carry both the API's *connect.Error (connect.CodeOf) and the
// package's sentinel for the code, for errors.Is: ErrPermissionDenied,
// ErrUnauthenticated, ErrNotFound (no such token, policy or role),
// ErrUnavailable and registry.ErrInvalid. It is safe for concurrent use,
// and valid until the client is closed.
func (c *Client) ACL() beaconv1connect.AclServiceClient { return aclService{c} }

type aclService struct{ c *Client }

var _ beaconv1connect.AclServiceClient = aclService{}

// Whether an ACL call may reach two servers (failover).
const (
	repeatable = true
	once       = false
)

// aclCall runs one ACL call with failover, giving each attempt its own
// copy of the request: an attempt's protocol headers are not the next's.
func aclCall[Req, Resp any](ctx context.Context, c *Client, mayRepeat bool, req *connect.Request[Req],
	method func(beaconv1connect.AclServiceClient, context.Context, *connect.Request[Req]) (*connect.Response[Resp], error)) (*connect.Response[Resp], error) {
	resp, err := failover(ctx, c, c.acls, mayRepeat, func(ctx context.Context, a beaconv1connect.AclServiceClient) (*connect.Response[Resp], error) {
		return method(a, ctx, copyRequest(req))
	})
	return resp, aclError(err)
}

func copyRequest[T any](req *connect.Request[T]) *connect.Request[T] {
	if req == nil {
		return connect.NewRequest(new(T))
	}
	out := connect.NewRequest(req.Msg)
	for k, v := range req.Header() {
		out.Header()[k] = slices.Clone(v)
	}
	return out
}

// apiError is an ACL call's error: the server's answer, and the sentinel
// its code maps to.
type apiError struct {
	sentinel error // nil when no sentinel goes with the code
	ce       *connect.Error
}

func (e *apiError) Error() string {
	msg := e.ce.Message()
	switch e.sentinel {
	case ErrPermissionDenied, ErrUnauthenticated:
		// "beacon: permission denied: needs acl:write …", not the
		// server's own "permission denied: " a second time.
		kind := strings.TrimPrefix(e.sentinel.Error(), "beacon: ")
		return e.sentinel.Error() + ": " + strings.TrimPrefix(msg, kind+": ")
	}
	return "beacon: " + msg
}

func (e *apiError) Unwrap() []error {
	if e.sentinel == nil {
		return []error{e.ce}
	}
	return []error{e.sentinel, e.ce}
}

// aclError maps an ACL call's error; errors that are not the API's (the
// client closed, every server unavailable) are returned as they are.
func aclError(err error) error {
	var ce *connect.Error
	if !errors.As(err, &ce) {
		return err
	}
	e := &apiError{ce: ce}
	switch ce.Code() {
	case connect.CodePermissionDenied:
		e.sentinel = ErrPermissionDenied
	case connect.CodeUnauthenticated:
		e.sentinel = ErrUnauthenticated
	case connect.CodeNotFound:
		e.sentinel = ErrNotFound
	case connect.CodeUnavailable:
		e.sentinel = ErrUnavailable
	case connect.CodeInvalidArgument:
		e.sentinel = registry.ErrInvalid
	case connect.CodeCanceled:
		e.sentinel = context.Canceled
	case connect.CodeDeadlineExceeded:
		e.sentinel = context.DeadlineExceeded
	}
	return e
}

func (a aclService) Bootstrap(ctx context.Context, req *connect.Request[beaconv1.BootstrapRequest]) (*connect.Response[beaconv1.BootstrapResponse], error) {
	return aclCall(ctx, a.c, once, req, beaconv1connect.AclServiceClient.Bootstrap)
}

func (a aclService) CreateToken(ctx context.Context, req *connect.Request[beaconv1.CreateTokenRequest]) (*connect.Response[beaconv1.CreateTokenResponse], error) {
	return aclCall(ctx, a.c, once, req, beaconv1connect.AclServiceClient.CreateToken)
}

func (a aclService) UpdateToken(ctx context.Context, req *connect.Request[beaconv1.UpdateTokenRequest]) (*connect.Response[beaconv1.UpdateTokenResponse], error) {
	return aclCall(ctx, a.c, repeatable, req, beaconv1connect.AclServiceClient.UpdateToken)
}

func (a aclService) ReadToken(ctx context.Context, req *connect.Request[beaconv1.ReadTokenRequest]) (*connect.Response[beaconv1.ReadTokenResponse], error) {
	return aclCall(ctx, a.c, repeatable, req, beaconv1connect.AclServiceClient.ReadToken)
}

func (a aclService) ListTokens(ctx context.Context, req *connect.Request[beaconv1.ListTokensRequest]) (*connect.Response[beaconv1.ListTokensResponse], error) {
	return aclCall(ctx, a.c, repeatable, req, beaconv1connect.AclServiceClient.ListTokens)
}

func (a aclService) DeleteToken(ctx context.Context, req *connect.Request[beaconv1.DeleteTokenRequest]) (*connect.Response[beaconv1.DeleteTokenResponse], error) {
	return aclCall(ctx, a.c, once, req, beaconv1connect.AclServiceClient.DeleteToken)
}

func (a aclService) PutPolicy(ctx context.Context, req *connect.Request[beaconv1.PutPolicyRequest]) (*connect.Response[beaconv1.PutPolicyResponse], error) {
	return aclCall(ctx, a.c, repeatable, req, beaconv1connect.AclServiceClient.PutPolicy)
}

func (a aclService) ReadPolicy(ctx context.Context, req *connect.Request[beaconv1.ReadPolicyRequest]) (*connect.Response[beaconv1.ReadPolicyResponse], error) {
	return aclCall(ctx, a.c, repeatable, req, beaconv1connect.AclServiceClient.ReadPolicy)
}

func (a aclService) ListPolicies(ctx context.Context, req *connect.Request[beaconv1.ListPoliciesRequest]) (*connect.Response[beaconv1.ListPoliciesResponse], error) {
	return aclCall(ctx, a.c, repeatable, req, beaconv1connect.AclServiceClient.ListPolicies)
}

func (a aclService) DeletePolicy(ctx context.Context, req *connect.Request[beaconv1.DeletePolicyRequest]) (*connect.Response[beaconv1.DeletePolicyResponse], error) {
	return aclCall(ctx, a.c, once, req, beaconv1connect.AclServiceClient.DeletePolicy)
}

func (a aclService) PutRole(ctx context.Context, req *connect.Request[beaconv1.PutRoleRequest]) (*connect.Response[beaconv1.PutRoleResponse], error) {
	return aclCall(ctx, a.c, repeatable, req, beaconv1connect.AclServiceClient.PutRole)
}

func (a aclService) ReadRole(ctx context.Context, req *connect.Request[beaconv1.ReadRoleRequest]) (*connect.Response[beaconv1.ReadRoleResponse], error) {
	return aclCall(ctx, a.c, repeatable, req, beaconv1connect.AclServiceClient.ReadRole)
}

func (a aclService) ListRoles(ctx context.Context, req *connect.Request[beaconv1.ListRolesRequest]) (*connect.Response[beaconv1.ListRolesResponse], error) {
	return aclCall(ctx, a.c, repeatable, req, beaconv1connect.AclServiceClient.ListRoles)
}

func (a aclService) DeleteRole(ctx context.Context, req *connect.Request[beaconv1.DeleteRoleRequest]) (*connect.Response[beaconv1.DeleteRoleResponse], error) {
	return aclCall(ctx, a.c, once, req, beaconv1connect.AclServiceClient.DeleteRole)
}

func (a aclService) WhoAmI(ctx context.Context, req *connect.Request[beaconv1.WhoAmIRequest]) (*connect.Response[beaconv1.WhoAmIResponse], error) {
	return aclCall(ctx, a.c, repeatable, req, beaconv1connect.AclServiceClient.WhoAmI)
}

func (a aclService) Authorize(ctx context.Context, req *connect.Request[beaconv1.AuthorizeRequest]) (*connect.Response[beaconv1.AuthorizeResponse], error) {
	return aclCall(ctx, a.c, repeatable, req, beaconv1connect.AclServiceClient.Authorize)
}

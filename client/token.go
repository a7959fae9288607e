package client

import (
	"context"

	"connectrpc.com/connect"
	"go.opentelemetry.io/otel/propagation"

	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/session"
)

// tokenInterceptor puts the call's credential in its headers: the
// session-bound one for a session's own calls (withSessionCredential),
// else the client's token. It also passes on the caller's trace, as W3C
// trace context, when the call's context carries a span (an application
// traced with OpenTelemetry): a server with --otlp-endpoint joins its
// span to the caller's trace. Without a span it adds nothing.
type tokenInterceptor struct{ c *Client }

var traceContext propagation.TraceContext

type sessionCredentialKey struct{}

// withSessionCredential makes the calls under ctx use session id's
// credential, if the server gave it one.
func (c *Client) withSessionCredential(ctx context.Context, id int64) context.Context {
	c.mu.Lock()
	cred := c.creds[id]
	c.mu.Unlock()
	if cred == "" {
		return ctx
	}
	return context.WithValue(ctx, sessionCredentialKey{}, cred)
}

func (t tokenInterceptor) secret(ctx context.Context) string {
	if cred, ok := ctx.Value(sessionCredentialKey{}).(string); ok {
		return cred
	}
	return t.c.token
}

func (t tokenInterceptor) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc {
	return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
		if s := t.secret(ctx); s != "" {
			req.Header().Set("Authorization", "Bearer "+s)
		}
		traceContext.Inject(ctx, propagation.HeaderCarrier(req.Header()))
		return next(ctx, req)
	}
}

func (t tokenInterceptor) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return func(ctx context.Context, spec connect.Spec) connect.StreamingClientConn {
		conn := next(ctx, spec)
		if s := t.secret(ctx); s != "" {
			conn.RequestHeader().Set("Authorization", "Bearer "+s)
		}
		traceContext.Inject(ctx, propagation.HeaderCarrier(conn.RequestHeader()))
		return conn
	}
}

func (tokenInterceptor) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return next
}

// forgetCredential drops an ended session's credential.
func (c *Client) forgetCredential(id int64) {
	c.mu.Lock()
	delete(c.creds, id)
	c.mu.Unlock()
}

// ownerCredential makes the calls under ctx use the credential of this
// client's session that holds instance k, if one does: with ACLs, a
// session's instance is changed (status, checks) with its session's
// credential, not with the client's token.
func (c *Client) ownerCredential(ctx context.Context, k registry.InstanceKey) context.Context {
	c.mu.Lock()
	sessions := make([]*session.Session, 0, len(c.sessions))
	for s := range c.sessions {
		sessions = append(sessions, s)
	}
	c.mu.Unlock()
	// Asked outside c.mu: a session calls into the client with its own
	// lock held.
	for _, s := range sessions {
		for _, in := range s.Instances() {
			if in.Namespace == "" {
				in.Namespace = c.namespace
			}
			if in.Key() == k {
				return c.withSessionCredential(ctx, s.ID())
			}
		}
	}
	return ctx
}

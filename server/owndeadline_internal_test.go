package server

import (
	"context"
	"errors"
	"testing"

	"connectrpc.com/connect"
)

// A deadline the server set for itself (etcd did not commit in time) is
// Unavailable to the caller; the caller's own deadline stays
// DeadlineExceeded; other errors pass unchanged.
func TestOwnDeadlineIsUnavailable(t *testing.T) {
	fail := func(code connect.Code) connect.UnaryFunc {
		return func(context.Context, connect.AnyRequest) (connect.AnyResponse, error) {
			return nil, connect.NewError(code, errors.New("etcd: context deadline exceeded"))
		}
	}
	wrap := ownDeadlineInterceptor{}.WrapUnary
	live := context.Background()
	if _, err := wrap(fail(connect.CodeDeadlineExceeded))(live, nil); connect.CodeOf(err) != connect.CodeUnavailable {
		t.Errorf("the server's own deadline with the caller's live: %v, want Unavailable", err)
	}
	over, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := wrap(fail(connect.CodeDeadlineExceeded))(over, nil); connect.CodeOf(err) != connect.CodeDeadlineExceeded {
		t.Errorf("the caller's context over: %v, want DeadlineExceeded kept", err)
	}
	if _, err := wrap(fail(connect.CodeInvalidArgument))(live, nil); connect.CodeOf(err) != connect.CodeInvalidArgument {
		t.Errorf("another code: %v, want it unchanged", err)
	}
}

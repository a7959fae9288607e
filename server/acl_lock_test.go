package server_test

import (
	"context"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/durationpb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
)

// TestACLLockPermissionMatrix: locking a name needs key:write on it (a
// token that may only read the prefix cannot lock it) and acting for the
// session; reading a lock's state needs key:read; a list filters.
func TestACLLockPermissionMatrix(t *testing.T) {
	srv, _, mgmtSecret := aclServer(t)
	mustPolicy(t, srv, mgmtSecret, "app-read", "read key default/app/*\nwrite session")
	mustPolicy(t, srv, mgmtSecret, "app-write", "write key default/app/*\nwrite session")
	mustPolicy(t, srv, mgmtSecret, "app-write-no-session", "write key default/app/*\nwrite service *")
	mustPolicy(t, srv, mgmtSecret, "services", "write service *\nwrite session")
	secrets := map[string]string{
		"management":           mgmtSecret,
		"app-read":             mustToken(t, srv, mgmtSecret, &beaconv1.AclToken{Policies: []string{"app-read"}}),
		"app-write":            mustToken(t, srv, mgmtSecret, &beaconv1.AclToken{Policies: []string{"app-write"}}),
		"app-write-no-session": mustToken(t, srv, mgmtSecret, &beaconv1.AclToken{Policies: []string{"app-write-no-session"}}),
		"services":             mustToken(t, srv, mgmtSecret, &beaconv1.AclToken{Policies: []string{"services"}}),
		"no-token":             "",
		"bad-token":            "bct_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
	}
	rows := []string{"no-token", "bad-token", "services", "app-read", "app-write", "app-write-no-session", "management"}
	ctx := context.Background()
	// The session every cell locks for: made by management, so only
	// session:write (or management) acts for it.
	sresp, err := regClient(srv, mgmtSecret, connect.WithGRPC()).CreateSession(ctx, connect.NewRequest(&beaconv1.CreateSessionRequest{Ttl: durationpb.New(time.Minute)}))
	if err != nil {
		t.Fatal(err)
	}
	session := sresp.Msg.GetSessionId()
	mgmt := beaconv1connect.NewLockServiceClient(h2c(), "http://"+srv.Addr(), connect.WithGRPC(), connect.WithInterceptors(bearer(mgmtSecret)))
	allow := func(rows ...string) map[string]outcome {
		m := map[string]outcome{}
		for _, r := range rows {
			m[r] = allowed
		}
		return m
	}
	ops := []struct {
		name string
		want map[string]outcome
		call func(ctx context.Context, c beaconv1connect.LockServiceClient) (outcome, error)
	}{
		{"Acquire app/lock", allow("app-write", "management"), func(ctx context.Context, c beaconv1connect.LockServiceClient) (outcome, error) {
			_, err := c.Acquire(ctx, connect.NewRequest(&beaconv1.AcquireLockRequest{Name: "app/lock", SessionId: session}))
			return "", err
		}},
		{"Acquire other", allow("management"), func(ctx context.Context, c beaconv1connect.LockServiceClient) (outcome, error) {
			_, err := c.Acquire(ctx, connect.NewRequest(&beaconv1.AcquireLockRequest{Name: "other", SessionId: session}))
			return "", err
		}},
		{"Release app/lock", allow("app-write", "management"), func(ctx context.Context, c beaconv1connect.LockServiceClient) (outcome, error) {
			_, err := c.Release(ctx, connect.NewRequest(&beaconv1.ReleaseLockRequest{Name: "app/lock", SessionId: session}))
			return "", err
		}},
		{"Describe app/lock", allow("app-read", "app-write", "app-write-no-session", "management"), func(ctx context.Context, c beaconv1connect.LockServiceClient) (outcome, error) {
			_, err := c.Describe(ctx, connect.NewRequest(&beaconv1.DescribeLockRequest{Name: "app/lock"}))
			return "", err
		}},
		{"List shows app/held", map[string]outcome{"no-token": filtered, "services": filtered, "app-read": allowed, "app-write": allowed, "app-write-no-session": allowed, "management": allowed}, func(ctx context.Context, c beaconv1connect.LockServiceClient) (outcome, error) {
			resp, err := c.List(ctx, connect.NewRequest(&beaconv1.ListLocksRequest{}))
			if err != nil {
				return "", err
			}
			for _, l := range resp.Msg.GetLocks() {
				if l.GetName() == "app/held" {
					return allowed, nil
				}
			}
			if !resp.Msg.GetResultsFiltered() {
				return "", connect.NewError(connect.CodeInternal, nil)
			}
			return filtered, nil
		}},
	}
	if _, err := mgmt.Acquire(ctx, connect.NewRequest(&beaconv1.AcquireLockRequest{Name: "app/held", SessionId: session})); err != nil {
		t.Fatal(err)
	}
	// Apply reports: reporting needs key:read and acting for the session;
	// reading them key:read.
	kvOps := []struct {
		name string
		want map[string]outcome
		call func(ctx context.Context, c beaconv1connect.KVServiceClient) error
	}{
		{"KV ReportApplied app/x", allow("app-read", "app-write", "management"), func(ctx context.Context, c beaconv1connect.KVServiceClient) error {
			_, err := c.ReportApplied(ctx, connect.NewRequest(&beaconv1.KVReportAppliedRequest{Key: "app/x", SessionId: session, Revision: 1}))
			return err
		}},
		{"KV Applied app/x", allow("app-read", "app-write", "app-write-no-session", "management"), func(ctx context.Context, c beaconv1connect.KVServiceClient) error {
			_, err := c.Applied(ctx, connect.NewRequest(&beaconv1.KVAppliedRequest{Key: "app/x"}))
			return err
		}},
	}
	for _, o := range kvOps {
		for _, row := range rows {
			want := o.want[row]
			if want == "" {
				want = denied
			}
			if row == "bad-token" {
				want = unauth
			}
			cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			err := o.call(cctx, beaconv1connect.NewKVServiceClient(h2c(), "http://"+srv.Addr(), connect.WithGRPC(), connect.WithInterceptors(bearer(secrets[row]))))
			cancel()
			if got := outcomeOf(t, err); got != want {
				t.Errorf("%s as %s = %s (%v), want %s", o.name, row, got, err, want)
			}
		}
	}
	for tname, topts := range map[string][]connect.ClientOption{"grpc": {connect.WithGRPC()}, "connect-json": {connect.WithProtoJSON()}} {
		for _, o := range ops {
			for _, row := range rows {
				want := o.want[row]
				if want == "" {
					want = denied
				}
				if row == "bad-token" {
					want = unauth
				}
				cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				got, err := o.call(cctx, beaconv1connect.NewLockServiceClient(h2c(), "http://"+srv.Addr(), append(topts, connect.WithInterceptors(bearer(secrets[row])))...))
				cancel()
				if got == "" {
					got = outcomeOf(t, err)
				}
				if got != want {
					t.Errorf("%s: %s as %s = %s (%v), want %s", tname, o.name, row, got, err, want)
				}
				// Each cell starts with app/lock and other free.
				for _, name := range []string{"app/lock", "other"} {
					mgmt.Release(ctx, connect.NewRequest(&beaconv1.ReleaseLockRequest{Name: name, SessionId: session}))
				}
			}
		}
	}
}

package server_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
)

// TestACLKVPermissionMatrix runs every KV operation as every kind of
// caller, over gRPC and the Connect protocol's JSON: key rules govern
// each key (read, write, deny on a sub-prefix), a prefix read filters
// what the token may not see, and service rights give no key rights.
func TestACLKVPermissionMatrix(t *testing.T) {
	srv, _, mgmtSecret := aclServer(t)
	mustPolicy(t, srv, mgmtSecret, "app-read", "read key default/app/*")
	mustPolicy(t, srv, mgmtSecret, "app-write", "write key default/app/*\ndeny key default/app/secret*")
	mustPolicy(t, srv, mgmtSecret, "services", "write service *")
	secrets := map[string]string{
		"management": mgmtSecret,
		"app-read":   mustToken(t, srv, mgmtSecret, &beaconv1.AclToken{Policies: []string{"app-read"}}),
		"app-write":  mustToken(t, srv, mgmtSecret, &beaconv1.AclToken{Policies: []string{"app-write"}}),
		"services":   mustToken(t, srv, mgmtSecret, &beaconv1.AclToken{Policies: []string{"services"}}),
		"no-token":   "",
		"bad-token":  "bct_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
	}
	rows := []string{"no-token", "bad-token", "services", "app-read", "app-write", "management"}
	mgmt := kvClient(srv, connect.WithInterceptors(bearer(mgmtSecret)))
	ctx := context.Background()
	type op struct {
		name string
		want map[string]outcome // rows not named: denied
		call func(ctx context.Context, c beaconv1connect.KVServiceClient, rev int64) (outcome, error)
	}
	allow := func(rows ...string) map[string]outcome {
		m := map[string]outcome{}
		for _, r := range rows {
			m[r] = allowed
		}
		return m
	}
	plain := func(err error) (outcome, error) { return "", err }
	// watchPrefix is allowed when the whole state shows key, filtered
	// when it does not.
	watchPrefix := func(ctx context.Context, c beaconv1connect.KVServiceClient, prefix, key string) (outcome, error) {
		st, err := c.Watch(ctx, connect.NewRequest(&beaconv1.KVWatchRequest{Key: prefix, Prefix: true, Heartbeat: durationpb.New(100 * time.Millisecond)}))
		if err != nil {
			return plain(err)
		}
		defer st.Close()
		if !st.Receive() {
			return plain(st.Err())
		}
		for _, ev := range st.Msg().GetEvents() {
			if ev.GetKv().GetKey() == key {
				return allowed, nil
			}
		}
		return filtered, nil
	}
	prefixRead := map[string]outcome{"no-token": filtered, "services": filtered, "app-read": allowed, "app-write": allowed, "management": allowed}
	secretRead := map[string]outcome{"no-token": filtered, "services": filtered, "app-read": allowed, "app-write": filtered, "management": allowed}
	ops := []op{
		{"Get app/x", allow("app-read", "app-write", "management"), func(ctx context.Context, c beaconv1connect.KVServiceClient, _ int64) (outcome, error) {
			_, err := c.Get(ctx, connect.NewRequest(&beaconv1.KVGetRequest{Key: "app/x"}))
			return plain(err)
		}},
		{"Get app/secret", allow("app-read", "management"), func(ctx context.Context, c beaconv1connect.KVServiceClient, _ int64) (outcome, error) {
			_, err := c.Get(ctx, connect.NewRequest(&beaconv1.KVGetRequest{Key: "app/secret"}))
			return plain(err)
		}},
		{"List app/ shows app/x", prefixRead, func(ctx context.Context, c beaconv1connect.KVServiceClient, _ int64) (outcome, error) {
			return listShows(ctx, c, "app/x")
		}},
		{"List app/ shows app/secret", secretRead, func(ctx context.Context, c beaconv1connect.KVServiceClient, _ int64) (outcome, error) {
			return listShows(ctx, c, "app/secret")
		}},
		{"History app/x", allow("app-read", "app-write", "management"), func(ctx context.Context, c beaconv1connect.KVServiceClient, _ int64) (outcome, error) {
			_, err := c.History(ctx, connect.NewRequest(&beaconv1.KVHistoryRequest{Key: "app/x"}))
			return plain(err)
		}},
		{"Watch app/x", allow("app-read", "app-write", "management"), func(ctx context.Context, c beaconv1connect.KVServiceClient, _ int64) (outcome, error) {
			st, err := c.Watch(ctx, connect.NewRequest(&beaconv1.KVWatchRequest{Key: "app/x"}))
			if err != nil {
				return plain(err)
			}
			defer st.Close()
			st.Receive()
			return plain(st.Err())
		}},
		{"Watch prefix app/ shows app/x", prefixRead, func(ctx context.Context, c beaconv1connect.KVServiceClient, _ int64) (outcome, error) {
			return watchPrefix(ctx, c, "app/", "app/x")
		}},
		{"Watch prefix app/ shows app/secret", secretRead, func(ctx context.Context, c beaconv1connect.KVServiceClient, _ int64) (outcome, error) {
			return watchPrefix(ctx, c, "app/", "app/secret")
		}},
		{"Put app/x", allow("app-write", "management"), func(ctx context.Context, c beaconv1connect.KVServiceClient, _ int64) (outcome, error) {
			_, err := c.Put(ctx, connect.NewRequest(&beaconv1.KVPutRequest{Key: "app/x", Value: []byte("2")}))
			return plain(err)
		}},
		{"Put app/secret", allow("management"), func(ctx context.Context, c beaconv1connect.KVServiceClient, _ int64) (outcome, error) {
			_, err := c.Put(ctx, connect.NewRequest(&beaconv1.KVPutRequest{Key: "app/secret", Value: []byte("2")}))
			return plain(err)
		}},
		{"Put other", allow("management"), func(ctx context.Context, c beaconv1connect.KVServiceClient, _ int64) (outcome, error) {
			_, err := c.Put(ctx, connect.NewRequest(&beaconv1.KVPutRequest{Key: "other", Value: []byte("2")}))
			return plain(err)
		}},
		{"Delete app/x", allow("app-write", "management"), func(ctx context.Context, c beaconv1connect.KVServiceClient, _ int64) (outcome, error) {
			_, err := c.Delete(ctx, connect.NewRequest(&beaconv1.KVDeleteRequest{Key: "app/x"}))
			return plain(err)
		}},
		{"Rollback app/x", allow("app-write", "management"), func(ctx context.Context, c beaconv1connect.KVServiceClient, rev int64) (outcome, error) {
			_, err := c.Rollback(ctx, connect.NewRequest(&beaconv1.KVRollbackRequest{Key: "app/x", ToRevision: rev}))
			return plain(err)
		}},
		{"StartRollout app/x", allow("app-write", "management"), func(ctx context.Context, c beaconv1connect.KVServiceClient, _ int64) (outcome, error) {
			_, err := c.StartRollout(ctx, connect.NewRequest(&beaconv1.KVStartRolloutRequest{Key: "app/x", Value: []byte("5")}))
			if err == nil {
				mgmt.EndRollout(ctx, connect.NewRequest(&beaconv1.KVEndRolloutRequest{Key: "app/x"}))
			}
			return plain(err)
		}},
		{"EndRollout app/x", allow("app-write", "management"), func(ctx context.Context, c beaconv1connect.KVServiceClient, _ int64) (outcome, error) {
			if _, err := mgmt.StartRollout(ctx, connect.NewRequest(&beaconv1.KVStartRolloutRequest{Key: "app/x", Value: []byte("5")})); err != nil {
				return "", err
			}
			_, err := c.EndRollout(ctx, connect.NewRequest(&beaconv1.KVEndRolloutRequest{Key: "app/x"}))
			if err != nil {
				mgmt.EndRollout(ctx, connect.NewRequest(&beaconv1.KVEndRolloutRequest{Key: "app/x"}))
			}
			return plain(err)
		}},
		{"RolloutStatus app/x", allow("app-read", "app-write", "management"), func(ctx context.Context, c beaconv1connect.KVServiceClient, _ int64) (outcome, error) {
			_, err := c.RolloutStatus(ctx, connect.NewRequest(&beaconv1.KVRolloutStatusRequest{Key: "app/x"}))
			return plain(err)
		}},
		{"Watch app/x with rollouts shows app/secret's rollout", secretRead, func(ctx context.Context, c beaconv1connect.KVServiceClient, _ int64) (outcome, error) {
			if _, err := mgmt.StartRollout(ctx, connect.NewRequest(&beaconv1.KVStartRolloutRequest{Key: "app/secret", Value: []byte("5")})); err != nil {
				return "", err
			}
			defer mgmt.EndRollout(ctx, connect.NewRequest(&beaconv1.KVEndRolloutRequest{Key: "app/secret"}))
			st, err := c.Watch(ctx, connect.NewRequest(&beaconv1.KVWatchRequest{Key: "app/", Prefix: true, IncludeRollouts: true}))
			if err != nil {
				return plain(err)
			}
			defer st.Close()
			if !st.Receive() {
				return plain(st.Err())
			}
			for _, ev := range st.Msg().GetEvents() {
				if ev.GetIsRollout() && ev.GetKv().GetKey() == "app/secret" {
					return allowed, nil
				}
			}
			return filtered, nil
		}},
		// A compare reveals a key's revision: it needs read, and the
		// deny on app/secret* holds.
		{"Txn check app/x", allow("app-read", "app-write", "management"), func(ctx context.Context, c beaconv1connect.KVServiceClient, rev int64) (outcome, error) {
			_, err := c.Txn(ctx, connect.NewRequest(&beaconv1.KVTxnRequest{Ops: []*beaconv1.KVOp{
				{Type: beaconv1.KVOp_TYPE_CHECK, Key: "app/x", ExpectedRevision: proto.Int64(rev)},
			}}))
			return plain(err)
		}},
		{"Txn put app/x, check app/secret", allow("management"), func(ctx context.Context, c beaconv1connect.KVServiceClient, _ int64) (outcome, error) {
			_, err := c.Txn(ctx, connect.NewRequest(&beaconv1.KVTxnRequest{Ops: []*beaconv1.KVOp{
				{Type: beaconv1.KVOp_TYPE_PUT, Key: "app/x", Value: []byte("3")},
				{Type: beaconv1.KVOp_TYPE_CHECK, Key: "app/secret", ExpectedRevision: proto.Int64(0)},
			}}))
			if connect.CodeOf(err) == connect.CodeFailedPrecondition {
				return allowed, nil // authorized; the compare itself failed
			}
			return plain(err)
		}},
		{"Txn put app/x, delete app/secret", allow("management"), func(ctx context.Context, c beaconv1connect.KVServiceClient, _ int64) (outcome, error) {
			_, err := c.Txn(ctx, connect.NewRequest(&beaconv1.KVTxnRequest{Ops: []*beaconv1.KVOp{
				{Type: beaconv1.KVOp_TYPE_PUT, Key: "app/x", Value: []byte("3")},
				{Type: beaconv1.KVOp_TYPE_DELETE, Key: "app/secret"},
			}}))
			return plain(err)
		}},
	}
	transports := map[string][]connect.ClientOption{"grpc": {connect.WithGRPC()}, "connect-json": {connect.WithProtoJSON()}}
	for tname, topts := range transports {
		for _, o := range ops {
			for _, row := range rows {
				// The fixture: app/x, app/secret and other, as each cell finds them.
				var rev int64
				for _, key := range []string{"app/x", "app/secret", "other"} {
					resp, err := mgmt.Put(ctx, connect.NewRequest(&beaconv1.KVPutRequest{Key: key, Value: []byte("1")}))
					if err != nil {
						t.Fatal(err)
					}
					if key == "app/x" {
						rev = resp.Msg.GetRevision()
					}
				}
				want := o.want[row]
				if want == "" {
					want = denied
				}
				if row == "bad-token" {
					want = unauth
				}
				cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				got, err := o.call(cctx, beaconv1connect.NewKVServiceClient(h2c(), "http://"+srv.Addr(), append(topts, connect.WithInterceptors(bearer(secrets[row])))...), rev)
				cancel()
				if got == "" {
					got = outcomeOf(t, err)
				} else if err != nil {
					t.Fatalf("%s %s as %s: %v", tname, o.name, row, err)
				}
				if got != want {
					t.Errorf("%s: %s as %s = %s (%v), want %s", tname, o.name, row, got, err, want)
				}
			}
		}
	}
}

// listShows lists app/: allowed when key is listed, filtered when it is
// not (and results_filtered says so).
func listShows(ctx context.Context, c beaconv1connect.KVServiceClient, key string) (outcome, error) {
	resp, err := c.List(ctx, connect.NewRequest(&beaconv1.KVListRequest{Prefix: "app/"}))
	if err != nil {
		return "", err
	}
	for _, kv := range resp.Msg.GetKvs() {
		if kv.GetKey() == key {
			return allowed, nil
		}
	}
	if !resp.Msg.GetResultsFiltered() {
		return "", errors.New(key + " not listed and results_filtered unset")
	}
	return filtered, nil
}

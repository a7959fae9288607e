package server_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/saga"
)

// errFiltered: a list came back without what the token may not read.
var errFiltered = errors.New("filtered")

// TestACLSagaPermissionMatrix: saga operations are KV and lock
// operations under the sagas' prefix (docs/sagas.md): listing and showing
// need key:read on it; starting, retrying and leading a shard key:write
// (leading also a session); a token for another prefix gets nothing.
func TestACLSagaPermissionMatrix(t *testing.T) {
	srv, _, mgmtSecret := aclServer(t)
	mustPolicy(t, srv, mgmtSecret, "sagas-read", "read key default/sagas/*\nwrite session") // refused writes then come from key:write
	mustPolicy(t, srv, mgmtSecret, "sagas-write", "write key default/sagas/*\nwrite session")
	mustPolicy(t, srv, mgmtSecret, "app-write", "write key default/app/*\nwrite session")
	secrets := map[string]string{
		"management":  mgmtSecret,
		"sagas-read":  mustToken(t, srv, mgmtSecret, &beaconv1.AclToken{Policies: []string{"sagas-read"}}),
		"sagas-write": mustToken(t, srv, mgmtSecret, &beaconv1.AclToken{Policies: []string{"sagas-write"}}),
		"app-write":   mustToken(t, srv, mgmtSecret, &beaconv1.AclToken{Policies: []string{"app-write"}}),
		"no-token":    "",
		"bad-token":   "bct_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
	}
	rows := []string{"no-token", "bad-token", "app-write", "sagas-read", "sagas-write", "management"}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	clients := map[string]*client.Client{}
	for _, row := range rows {
		var opts []client.Option
		if secrets[row] != "" {
			opts = append(opts, client.WithToken(secrets[row]))
		}
		c, err := client.New([]string{srv.Addr()}, opts...)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		clients[row] = c
	}
	def := saga.Definition{Name: "order", Steps: []saga.Step{
		{Name: "charge", Action: func(context.Context, saga.Run) ([]byte, error) { return nil, nil },
			Compensate: func(context.Context, saga.Run) error { return errors.New("refunds are down") }},
		{Name: "ship", Action: func(context.Context, saga.Run) ([]byte, error) { return nil, saga.Permanent(errors.New("no courier")) }},
	}}
	// A stuck saga, made by management's orchestrator, which then stops:
	// each retry cell starts from its stuck state.
	mgmt := clients["management"]
	msess, err := mgmt.NewSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer msess.Close(context.Background())
	mo, err := saga.New(saga.Config{Client: mgmt, Session: msess, CompensationAttempts: 1, Shards: 1}, def)
	if err != nil {
		t.Fatal(err)
	}
	rctx, stopRun := context.WithCancel(ctx)
	ran := make(chan error, 1)
	go func() { ran <- mo.Run(rctx) }()
	if _, err := mo.Start(ctx, "order", "stuck-1", nil); err != nil {
		t.Fatal(err)
	}
	if st, err := mo.Wait(ctx, "order", "stuck-1"); err != nil || st.Status != saga.Stuck {
		t.Fatalf("fixture saga = %s, %v; want stuck", st.Status, err)
	}
	stopRun()
	if err := <-ran; err != nil {
		t.Fatal(err)
	}
	stuck, err := mgmt.KV().Get(ctx, "sagas/runs/order/stuck-1")
	if err != nil {
		t.Fatal(err)
	}
	store := func(c *client.Client) *saga.Store {
		s, err := saga.NewStore(c.KV(), "")
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	read := map[string]bool{"sagas-read": true, "sagas-write": true, "management": true}
	write := map[string]bool{"sagas-write": true, "management": true}
	ops := []struct {
		name    string
		allowed map[string]bool
		call    func(ctx context.Context, row string, c *client.Client) error
	}{
		{"saga list", read, func(ctx context.Context, _ string, c *client.Client) error {
			list, err := store(c).List(ctx, "")
			if err == nil && len(list) == 0 {
				return errFiltered // a list shows what the token may read
			}
			return err
		}},
		{"saga show", read, func(ctx context.Context, _ string, c *client.Client) error {
			_, err := store(c).Get(ctx, "order", "stuck-1")
			return err
		}},
		{"saga retry", write, func(ctx context.Context, _ string, c *client.Client) error {
			if _, err := mgmt.KV().Put(ctx, stuck.Key, stuck.Value); err != nil {
				t.Fatal(err)
			}
			_, err := store(c).Retry(ctx, "order", "stuck-1")
			return err
		}},
		{"saga start", write, func(ctx context.Context, row string, c *client.Client) error {
			s, err := c.NewSession(ctx)
			if err != nil {
				return err
			}
			defer s.Close(context.Background())
			o, err := saga.New(saga.Config{Client: c, Session: s}, def)
			if err != nil {
				t.Fatal(err)
			}
			_, err = o.Start(ctx, "order", "start-"+row, nil)
			return err
		}},
		{"lead a saga shard", write, func(ctx context.Context, _ string, c *client.Client) error {
			s, err := c.NewSession(ctx)
			if err != nil {
				return err
			}
			defer s.Close(context.Background())
			h, err := c.Election(s, "sagas/shards/0").Campaign(ctx, nil)
			if err != nil {
				return err
			}
			return h.Unlock(ctx)
		}},
	}
	for _, o := range ops {
		for _, row := range rows {
			cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			err := o.call(cctx, row, clients[row])
			cancel()
			var got string
			switch {
			case err == nil:
				got = "allow"
			case errors.Is(err, errFiltered):
				got = "deny"
			case errors.Is(err, client.ErrUnauthenticated):
				got = "unauth"
			case errors.Is(err, client.ErrPermissionDenied):
				if !strings.Contains(err.Error(), "needs ") {
					t.Errorf("%s as %s: permission denied without naming the permission: %v", o.name, row, err)
				}
				got = "deny"
			default:
				t.Errorf("%s as %s: unexpected error %v", o.name, row, err)
				continue
			}
			want := map[bool]string{true: "allow", false: "deny"}[o.allowed[row]]
			if row == "bad-token" {
				want = "unauth"
			}
			if got != want {
				t.Errorf("%s as %s = %s (%v), want %s", o.name, row, got, err, want)
			}
		}
	}
}

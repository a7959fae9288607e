package cli_test

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/saga"
	"beacon.dev/beacon/server/servertest"
)

// beacon saga list, show and retry: a saga stuck on a failing refund is
// listed and shown with its error; an unknown one is a clear error; a
// retry (once refunds work) brings it to compensated.
func TestSagaCommands(t *testing.T) {
	srv := servertest.Start(t, servertest.Config(t, ""))
	at := "--server=" + srv.Addr()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sess, err := c.NewSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close(context.Background())
	var refunds atomic.Bool
	o, err := saga.New(saga.Config{Client: c, Session: sess, CompensationAttempts: 1}, saga.Definition{Name: "order", Steps: []saga.Step{
		{Name: "charge", Action: func(context.Context, saga.Run) ([]byte, error) { return []byte("ch-1"), nil },
			Compensate: func(context.Context, saga.Run) error {
				if !refunds.Load() {
					return errors.New("refunds are down")
				}
				return nil
			}},
		{Name: "ship", Action: func(context.Context, saga.Run) ([]byte, error) { return nil, saga.Permanent(errors.New("no courier")) }},
	}})
	if err != nil {
		t.Fatal(err)
	}
	rctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- o.Run(rctx) }()
	defer func() { stop(); <-done }()
	if _, err := o.Start(ctx, "order", "o-7", []byte(`{"item":"widget"}`)); err != nil {
		t.Fatal(err)
	}
	if st, err := o.Wait(ctx, "order", "o-7"); err != nil || st.Status != saga.Stuck {
		t.Fatalf("saga = %s, %v; want stuck", st.Status, err)
	}
	code, out, errs := run("saga", "list", at, "--status", "stuck")
	if code != 0 || !strings.Contains(out, "order") || !strings.Contains(out, "o-7") || !strings.Contains(out, "stuck") || !strings.Contains(out, "refunds are down") {
		t.Fatalf("saga list = %d, %q, %q", code, out, errs)
	}
	if code, out, _ := run("saga", "list", at, "--status", "done"); code != 0 || strings.Contains(out, "o-7") {
		t.Fatalf("saga list --status done = %d, %q; want no o-7", code, out)
	}
	code, out, _ = run("saga", "show", at, "order", "o-7")
	for _, want := range []string{"status:   stuck", "[charge] → ship", "no courier", "refunds are down", `output charge: "ch-1"`} {
		if code != 0 || !strings.Contains(out, want) {
			t.Fatalf("saga show = %d, %q; want %q in it", code, out, want)
		}
	}
	code, out, _ = run("saga", "show", at, "-o", "json", "order", "o-7")
	var st saga.State
	if code != 0 || json.Unmarshal([]byte(out), &st) != nil || st.Status != saga.Stuck || st.ID != "o-7" {
		t.Fatalf("saga show -o json = %d, %q", code, out)
	}
	if code, _, errs := run("saga", "show", at, "order", "o-404"); code != 1 || !strings.Contains(errs, "no saga order/o-404") {
		t.Fatalf("saga show of an unknown saga = %d, %q", code, errs)
	}
	if code, _, errs := run("saga", "retry", at, "order", "../x"); code != 1 || !strings.Contains(errs, "id") {
		t.Fatalf("saga retry with a bad id = %d, %q", code, errs)
	}
	if code, _, errs := run("saga", "list", at, "--status", "lost"); code != 1 || !strings.Contains(errs, "--status") {
		t.Fatalf("saga list --status lost = %d, %q", code, errs)
	}
	refunds.Store(true)
	code, out, errs = run("saga", "retry", at, "order", "o-7")
	if code != 0 || !strings.Contains(out, "compensating again from step charge") {
		t.Fatalf("saga retry = %d, %q, %q", code, out, errs)
	}
	testutil.Eventually(t, time.Minute, "the retried saga to be compensated", func() bool {
		_, out, _ := run("saga", "show", at, "order", "o-7")
		return strings.Contains(out, "status:   compensated")
	})
	if code, _, errs := run("saga", "retry", at, "order", "o-7"); code != 1 || !strings.Contains(errs, "only a stuck saga") {
		t.Fatalf("saga retry of a compensated saga = %d, %q", code, errs)
	}
}

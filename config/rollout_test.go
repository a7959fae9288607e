package config_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/config"
	"beacon.dev/beacon/internal/testutil"
)

// A staged rollout reaches only the readers its labels select; they
// report applying it (or refusing an invalid one) and rollout status
// shows who runs what; an abort takes them back, a promotion gives the
// value to everyone.
func TestBindStagedRollout(t *testing.T) {
	srv := testutil.StartBeacon(t)
	c := newClient(t, srv.Addr())
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	main1, err := c.KV().Put(ctx, "shop/pricing", []byte(`{"discount":0.1,"region":"eu"}`))
	if err != nil {
		t.Fatal(err)
	}
	type reader struct {
		zone string
		b    *config.Binding[pricing]
	}
	var readers []reader
	for i, zone := range []string{"a", "a", "b", "b"} {
		s, err := c.NewSession(ctx)
		if err != nil {
			t.Fatal(err)
		}
		b, err := config.Bind(ctx, c, "shop/pricing", config.Validate(validPricing),
			config.Labels[pricing](map[string]string{"zone": zone}), config.ReportTo[pricing](s, fmt.Sprintf("shop-%d", i)))
		if err != nil {
			t.Fatal(err)
		}
		defer b.Close()
		readers = append(readers, reader{zone, b})
	}
	// discount of what each reader applied, zone a first.
	applied := func() string {
		var out []string
		for _, r := range readers {
			out = append(out, fmt.Sprint(r.b.Load().Discount))
		}
		return strings.Join(out, " ")
	}
	status := func() map[string]client.AppliedReport {
		st, err := c.KV().RolloutStatus(ctx, "shop/pricing")
		if err != nil {
			t.Fatal(err)
		}
		m := map[string]client.AppliedReport{}
		for _, r := range st.Reports {
			m[r.Label] = r
		}
		return m
	}
	wait := func(what, want string, reportsAt ...int64) {
		t.Helper()
		testutil.Eventually(t, 30*time.Second, what, func() bool {
			if applied() != want {
				return false
			}
			st := status()
			for i, rev := range reportsAt {
				if st[fmt.Sprintf("shop-%d", i)].Revision != rev {
					return false
				}
			}
			return true
		})
	}
	wait("everyone on the key's value", "0.1 0.1 0.1 0.1", main1, main1, main1, main1)

	r1, err := c.KV().StartRollout(ctx, "shop/pricing", []byte(`{"discount":0.2,"region":"eu"}`), map[string]string{"zone": "a"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.KV().StartRollout(ctx, "shop/pricing", []byte(`{}`), nil, 0); err == nil {
		t.Fatal("a second rollout started over a running one")
	}
	wait("zone a on the rollout", "0.2 0.2 0.1 0.1", r1, r1, main1, main1)

	if _, err := c.KV().EndRollout(ctx, "shop/pricing", false); err != nil { // abort
		t.Fatal(err)
	}
	wait("zone a back on the key's value", "0.1 0.1 0.1 0.1", main1, main1, main1, main1)

	// An invalid rollout is refused by the readers it selects, and they say so.
	bad, err := c.KV().StartRollout(ctx, "shop/pricing", []byte(`{"discount":0.9,"region":"eu"}`), map[string]string{"zone": "b"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "zone b to refuse the rollout", func() bool {
		st := status()
		return st["shop-2"].Revision == bad && strings.Contains(st["shop-2"].Error, "not applied") && st["shop-0"].Revision == main1
	})
	if got := applied(); got != "0.1 0.1 0.1 0.1" {
		t.Fatalf("an invalid rollout was applied: %s", got)
	}
	c.KV().EndRollout(ctx, "shop/pricing", false)

	if _, err := c.KV().StartRollout(ctx, "shop/pricing", []byte(`{"discount":0.3,"region":"eu"}`), map[string]string{"zone": "a"}, 0); err != nil {
		t.Fatal(err)
	}
	wait("zone a on the second rollout", "0.3 0.3 0.1 0.1")
	promoted, err := c.KV().EndRollout(ctx, "shop/pricing", true)
	if err != nil {
		t.Fatal(err)
	}
	wait("everyone on the promoted value", "0.3 0.3 0.3 0.3", promoted, promoted, promoted, promoted)
	st, err := c.KV().RolloutStatus(ctx, "shop/pricing")
	if err != nil || st.Rollout != nil || st.Current.ModRevision != promoted {
		t.Fatalf("after the promotion: %+v, %v", st, err)
	}
	hist, _ := c.KV().History(ctx, "shop/pricing")
	if last := hist[len(hist)-1]; last.Revision != promoted || !strings.Contains(string(last.Value), "0.3") {
		t.Fatalf("the promotion is not in the history: %+v", last)
	}
}

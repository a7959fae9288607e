package members_test

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/server/internal/members"
	"beacon.dev/beacon/server/servertest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m, testutil.LeakOptions()...) }

func waitLive(t *testing.T, m *members.Members, want ...string) {
	t.Helper()
	waitLiveFor(t, 30*time.Second, m, want...)
}

func waitLiveFor(t *testing.T, timeout time.Duration, m *members.Members, want ...string) {
	t.Helper()
	testutil.Eventually(t, timeout, fmt.Sprintf("%s sees %v", m.Self(), want), func() bool {
		return slices.Equal(m.Live(), want)
	})
}

// Three members share keys by rendezvous hashing; every key has exactly one
// owner, the shares are even, and when one leaves only its keys move.
func TestOwnershipIsSharedAndMovesOnlyTheLeaversShare(t *testing.T) {
	srv := servertest.Start(t, servertest.Config(t, ""))
	cli := srv.EtcdClient()
	// A TTL no busy machine lapses: a member that missed its renewal would
	// leave and come back, moving keys. Departure below is Close, which
	// revokes at once, whatever the TTL.
	const ttl = 30 * time.Second
	a := members.Join(cli, "/test/members/", "a", ttl, nil)
	b := members.Join(cli, "/test/members/", "b", ttl, nil)
	c := members.Join(cli, "/test/members/", "c", ttl, nil)
	defer a.Close()
	defer b.Close()
	for _, m := range []*members.Members{a, b, c} {
		waitLive(t, m, "a", "b", "c")
	}
	const n = 3000
	before := map[string]string{}
	shares := map[string]int{}
	for i := range n {
		k := fmt.Sprint("key-", i)
		owners := 0
		for _, m := range []*members.Members{a, b, c} {
			if m.Owns(k) {
				owners++
				before[k] = m.Self()
			}
		}
		if owners != 1 {
			t.Fatalf("%s has %d owners", k, owners)
		}
		shares[before[k]]++
	}
	for id, s := range shares {
		if s < n/3*8/10 || s > n/3*12/10 {
			t.Errorf("%s owns %d of %d keys, want about a third", id, s, n)
		}
	}
	// Close revokes: the others see it at once. Should its revoke (bounded
	// by a second) fail on a busy machine, the lease's expiry does the same
	// a TTL later: wait longer than that.
	c.Close()
	waitLiveFor(t, 2*ttl, a, "a", "b")
	waitLiveFor(t, 2*ttl, b, "a", "b")
	moved := 0
	for k, was := range before {
		now := a.Owner(k)
		if was != "c" && now != was {
			moved++
		}
		if now == "c" || now == "" {
			t.Fatalf("%s is owned by %q after c left", k, now)
		}
	}
	if moved != 0 {
		t.Errorf("%d keys not owned by c changed owner", moved)
	}
}

// records keeps the log records a component writes.
type records struct {
	mu   sync.Mutex
	recs []slog.Record
}

func (r *records) Enabled(context.Context, slog.Level) bool { return true }
func (r *records) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.recs = append(r.recs, rec)
	return nil
}
func (r *records) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r *records) WithGroup(string) slog.Handler      { return r }

func (r *records) find(level slog.Level, text string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.ContainsFunc(r.recs, func(rec slog.Record) bool {
		return rec.Level == level && strings.Contains(rec.Message, text)
	})
}

// A restarted server's previous run withdrawing its announcement is
// expected: it is logged at info, not as a lost membership.
func TestPreviousRunWithdrawingIsNotAWarning(t *testing.T) {
	srv := servertest.Start(t, servertest.Config(t, ""))
	cli := srv.EtcdClient()
	logs := &records{}
	m := members.Join(cli, "/test/restart/", "a", 10*time.Second, slog.New(logs))
	defer m.Close()
	waitLive(t, m, "a")
	// What the previous run's shutdown does when it lands after the new
	// run announced itself: the key goes.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := cli.Delete(ctx, "/test/restart/a"); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "the new run announcing again", func() bool {
		return logs.find(slog.LevelInfo, "previous run")
	})
	waitLive(t, m, "a")
	if logs.find(slog.LevelWarn, "membership lost") {
		t.Error("the previous run's withdrawal was logged as a lost membership")
	}
}

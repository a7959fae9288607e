package cli_test

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/server/servertest"
)

// The kv commands end to end: put, get, list, history, diff, rollback,
// compare-and-set refusals, and a watch that prints changes.
func TestKVCommands(t *testing.T) {
	srv := servertest.Start(t, servertest.Config(t, ""))
	at := "--server=" + srv.Addr()
	must := func(want string, args ...string) string {
		t.Helper()
		code, out, errs := run(append(args, at)...)
		if code != 0 || !strings.Contains(out, want) {
			t.Fatalf("beacon %s = %d, stdout %q, stderr %q; want %q", strings.Join(args, " "), code, out, errs, want)
		}
		return out
	}
	watch, stop := start("kv", "watch", "shop/", "--prefix", at)
	defer stop()
	must("put default/shop/pricing at revision", "kv", "put", "shop/pricing", "discount: 0.1\nregion: eu\n")
	must("discount: 0.1", "kv", "get", "shop/pricing")
	out := must(`"modRevision"`, "kv", "get", "shop/pricing", "-o", "json")
	var got struct {
		Kv struct{ ModRevision string }
	}
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatal(err)
	}
	first := got.Kv.ModRevision
	code, _, errs := run("kv", "put", "shop/pricing", "x", "--cas", "1", at)
	if code == 0 || !strings.Contains(errs, "the write expected revision 1") {
		t.Fatalf("stale --cas = %d, stderr %q", code, errs)
	}
	must("put default/shop/pricing", "kv", "put", "shop/pricing", "discount: 0.2\nregion: eu\n", "--cas", first)
	must("shop/pricing", "kv", "list", "shop/")
	must("deleted default/shop/pricing", "kv", "delete", "shop/pricing")
	hist := strings.Split(strings.TrimSpace(must("(deleted)", "kv", "history", "shop/pricing")), "\n")
	if len(hist) != 4 {
		t.Fatalf("history = %q, want a header and 3 versions", hist)
	}
	second := strings.Fields(hist[2])[0]
	must("- discount: 0.1\n+ discount: 0.2\n  region: eu\n", "kv", "diff", "shop/pricing", first, second)
	rolled := must("now at revision", "kv", "rollback", "shop/pricing", "--to", first)
	rollRev := strings.TrimSpace(rolled[strings.LastIndex(rolled, " ")+1:])
	must("discount: 0.1", "kv", "get", "shop/pricing")
	defer func() {
		if t.Failed() {
			t.Logf("watch printed:\n%s", watch.String())
		}
	}()
	testutil.Eventually(t, 30*time.Second, "the watch to print the rollback", func() bool {
		s := watch.String()
		// Changes a watcher has not read yet coalesce to each key's
		// latest version: the rollback's is the one it must show.
		return strings.Contains(s, "revision "+rollRev+`: shop/pricing = "discount: 0.1`)
	})
}

// beacon kv rollout: start, status, a second start refused, promote.
func TestKVRolloutCommands(t *testing.T) {
	srv := servertest.Start(t, servertest.Config(t, ""))
	at := "--server=" + srv.Addr()
	must := func(want string, args ...string) string {
		t.Helper()
		code, out, errs := run(append(args, at)...)
		if code != 0 || !strings.Contains(out, want) {
			t.Fatalf("beacon %s = %d, stdout %q, stderr %q; want %q", strings.Join(args, " "), code, out, errs, want)
		}
		return out
	}
	must("put default/flags", "kv", "put", "flags", `{"new_checkout":false}`)
	must("rollout of default/flags started", "kv", "rollout", "start", "flags", `{"new_checkout":true}`, "--labels", "zone=eu-1", "--percent", "10")
	must("rollout: revision", "kv", "rollout", "status", "flags")
	if code, _, errs := run("kv", "rollout", "start", "flags", "{}", at); code == 0 || !strings.Contains(errs, "rollout is running") {
		t.Fatalf("second start = %d, %q", code, errs)
	}
	if code, _, errs := run("kv", "rollout", "start", "flags", "{}", "--percent", "101", at); code == 0 || !strings.Contains(errs, "percent") {
		t.Fatalf("percent 101 = %d, %q", code, errs)
	}
	must("promoted at revision", "kv", "rollout", "promote", "flags")
	must(`{"new_checkout":true}`, "kv", "get", "flags")
	must("rollout: none", "kv", "rollout", "status", "flags")
	if code, _, errs := run("kv", "rollout", "abort", "flags", at); code == 0 || !strings.Contains(errs, "no rollout") {
		t.Fatalf("abort with none = %d, %q", code, errs)
	}
}

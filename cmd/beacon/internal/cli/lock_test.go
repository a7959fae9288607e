package cli_test

import (
	"strings"
	"testing"
	"time"

	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/server/servertest"
)

// beacon lock runs a command holding the lock, hands it the fencing
// token, returns its exit code; --try fails while another holds it; lock
// list shows the holder.
func TestLockCommand(t *testing.T) {
	srv := servertest.Start(t, servertest.Config(t, ""))
	at := "--server=" + srv.Addr()
	code, out, errs := run("lock", at, "jobs/report", "--", "sh", "-c", "echo token=$BEACON_LOCK_TOKEN lock=$BEACON_LOCK; exit 3")
	if code != 3 || !strings.Contains(out, "lock=jobs/report") || strings.Contains(out, "token= ") || !strings.Contains(errs, "holding lock default/jobs/report") {
		t.Fatalf("lock = %d, stdout %q, stderr %q; want exit 3 with the token in the environment", code, out, errs)
	}
	holder, stop := start("lock", at, "jobs/report", "--", "sleep", "60")
	defer stop()
	testutil.Eventually(t, 30*time.Second, "the first holder to hold the lock", func() bool {
		return strings.Contains(holder.String(), "holding lock")
	})
	code, _, errs = run("lock", at, "--try", "jobs/report", "--", "true")
	if code != 1 || !strings.Contains(errs, "lock held by another session") {
		t.Fatalf("lock --try while held = %d, stderr %q", code, errs)
	}
	code, out, _ = run("lock", "list", at)
	if code != 0 || !strings.Contains(out, "jobs/report") {
		t.Fatalf("lock list = %d, %q", code, out)
	}
	if code := stop(); code != 0 {
		t.Logf("interrupted holder exited %d: %s", code, holder.String())
	}
	code, _, errs = run("lock", at, "--try", "jobs/report", "--", "true")
	if code != 0 {
		t.Fatalf("lock --try after the holder stopped = %d, stderr %q", code, errs)
	}
	if code, _, errs := run("lock", at, "jobs/report", "true"); code != 1 || !strings.Contains(errs, "--") {
		t.Fatalf("lock without -- = %d, %q", code, errs)
	}
}

// beacon elect leads and runs the command; beacon leader shows the leader
// and its value, and "no leader" once it resigned.
func TestElectAndLeaderCommands(t *testing.T) {
	srv := servertest.Start(t, servertest.Config(t, ""))
	at := "--server=" + srv.Addr()
	leading, stop := start("elect", at, "scheduler", "--value", "10.0.0.5:9000", "--", "sleep", "60")
	defer stop()
	testutil.Eventually(t, 30*time.Second, "the candidate to lead", func() bool {
		return strings.Contains(leading.String(), "leading election default/scheduler")
	})
	if code, out, errs := run("leader", at, "scheduler"); code != 0 || !strings.HasPrefix(out, "10.0.0.5:9000 (session ") {
		t.Fatalf("leader = %d, %q, %q", code, out, errs)
	}
	stop()
	testutil.Eventually(t, 30*time.Second, "the leader to resign", func() bool {
		_, out, _ := run("leader", at, "scheduler")
		return strings.TrimSpace(out) == "no leader"
	})
}

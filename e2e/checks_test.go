package e2e

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/servertest"
)

// healthLog records every health an instance is seen with by a watcher,
// to tell a clean transition from flapping.
type healthLog struct {
	mu   sync.Mutex
	seen []registry.Health // guarded by mu; consecutive duplicates folded
	at   []time.Time       // guarded by mu
}

func followHealth(ctx context.Context, t *testing.T, c *client.Client, service, id string) *healthLog {
	t.Helper()
	w, err := c.Watch(ctx, []string{service})
	if err != nil {
		t.Fatal(err)
	}
	h := &healthLog{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			snaps, err := w.Next(ctx)
			if err != nil {
				return
			}
			for _, s := range snaps {
				for _, in := range s.Instances {
					if in.ID != id {
						continue
					}
					h.mu.Lock()
					if n := len(h.seen); n == 0 || h.seen[n-1] != in.Health {
						h.seen = append(h.seen, in.Health)
						h.at = append(h.at, time.Now())
					}
					h.mu.Unlock()
				}
			}
		}
	}()
	t.Cleanup(func() { w.Close(); <-done })
	return h
}

// waitHealth waits until the last health seen is want and returns when.
func (h *healthLog) waitHealth(t *testing.T, want registry.Health, timeout time.Duration) time.Time {
	t.Helper()
	var at time.Time
	testutil.Eventually(t, timeout, "health "+want.String(), func() bool {
		h.mu.Lock()
		defer h.mu.Unlock()
		if n := len(h.seen); n > 0 && h.seen[n-1] == want {
			at = h.at[n-1]
			return true
		}
		return false
	})
	return at
}

func (h *healthLog) history() []registry.Health {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]registry.Health(nil), h.seen...)
}

func routable(ctx context.Context, t *testing.T, c *client.Client, service, id string) bool {
	t.Helper()
	snap, err := c.Instances(ctx, service)
	if err != nil {
		t.Fatal(err)
	}
	for _, in := range snap.Instances {
		if in.ID == id {
			return true
		}
	}
	return false
}

// Behaviours 1 and 2: a checked persistent instance whose process hangs
// goes CRITICAL after the configured failures and leaves discovery; when
// it resumes it comes back after the configured successes; a watcher sees
// exactly PASSING → CRITICAL → PASSING. HTTP and gRPC checks see a hang
// (SIGSTOP); a TCP connect does not — the kernel still accepts on a
// stopped process's socket — so the TCP check is exercised with SIGKILL
// and a restart on the same port. Hysteresis is asserted by counting the
// server's probes (beacon_check_probes_total), not by timing them.
func TestChecksFollowAHungOrKilledProcess(t *testing.T) {
	for _, kind := range []string{"http", "grpc", "tcp"} {
		t.Run(kind, func(t *testing.T) { testCheck(t, kind) })
	}
}

// probes reads the server's count of probes of kind with result (pass or
// fail).
func probes(t *testing.T, addr string, kind registry.CheckKind, result string) int {
	t.Helper()
	v, _ := testutil.Metric(t, addr, fmt.Sprintf(`beacon_check_probes_total{kind=%q,result=%q}`, kind.String(), result))
	return int(v)
}

func testCheck(t *testing.T, kind string) {
	srv := servertest.Start(t, servertest.Config(t, ""))
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	grpcAddr := testutil.FreeAddr(t)
	args := []string{"--service", "echo", "--grpc", grpcAddr, "--http", "127.0.0.1:0"}
	e := startEcho(t, srv.Addr(), args...)
	c := newClient(t, srv.Addr())

	// A probe a second with a timeout of a second: a loaded machine does
	// not make a live process look dead.
	const interval, timeout, failures, successes = time.Second, time.Second, 3, 2
	check := registry.Check{Interval: interval, Timeout: timeout, FailuresBeforeCritical: failures, SuccessesBeforePassing: successes}
	host, portStr, _ := net.SplitHostPort(grpcAddr)
	port, _ := strconv.Atoi(portStr)
	switch kind {
	case "http":
		check.Kind, check.Target = registry.CheckHTTP, "http://"+e.httpAddr+"/readyz"
	case "grpc":
		check.Kind = registry.CheckGRPC
	case "tcp":
		check.Kind = registry.CheckTCP
	}
	in := registry.Instance{Service: "web", ID: "web-1", Address: host, Port: port, Checks: []registry.Check{check}}
	if _, err := c.Register(ctx, in); err != nil {
		t.Fatal(err)
	}
	count := func(result string) int { return probes(t, srv.Addr(), check.Kind, result) }
	// waitProbes waits until n more probes with result have run.
	waitProbes := func(result string, n int, what string) {
		t.Helper()
		target := count(result) + n
		testutil.Eventually(t, 60*time.Second, what, func() bool { return count(result) >= target })
	}
	h := followHealth(ctx, t, c, "web", "web-1")
	h.waitHealth(t, registry.HealthPassing, 30*time.Second)
	waitProbes("pass", 3, "three passing probes") // passing probes write nothing

	var failedAt time.Time
	failsBefore := count("fail")
	if kind == "tcp" {
		failedAt = time.Now()
		e.signal(syscall.SIGKILL)
		e.wait(30 * time.Second)
	} else {
		e.signal(syscall.SIGSTOP)
		failedAt = time.Now()
	}
	criticalAt := h.waitHealth(t, registry.HealthCritical, 60*time.Second)
	// Hysteresis: CRITICAL only once the configured failures were seen.
	// (Read as soon as CRITICAL shows; the next probe is an interval away.)
	failedProbes := count("fail") - failsBefore
	detect := criticalAt.Sub(failedAt)
	if failedProbes < failures {
		t.Errorf("CRITICAL after %d failed probes, want at least %d (FailuresBeforeCritical)", failedProbes, failures)
	}
	if routable(ctx, t, c, "web", "web-1") {
		t.Error("a CRITICAL instance is still in discovery")
	}
	waitProbes("fail", 3, "three more failing probes") // failing probes write nothing more

	resumedAt := time.Now()
	passesBefore := count("pass")
	if kind == "tcp" {
		startEcho(t, srv.Addr(), args...) // the same port again
	} else {
		e.signal(syscall.SIGCONT)
	}
	passingAt := h.waitHealth(t, registry.HealthPassing, 60*time.Second)
	passedProbes := count("pass") - passesBefore
	recover := passingAt.Sub(resumedAt)
	if passedProbes < successes {
		t.Errorf("PASSING again after %d passing probes, want at least %d (SuccessesBeforePassing)", passedProbes, successes)
	}
	if !routable(ctx, t, c, "web", "web-1") {
		t.Error("a PASSING instance is not in discovery")
	}
	waitProbes("pass", 3, "three more passing probes")
	t.Logf("%s check every %v, %d failures / %d successes: CRITICAL %v after the fault (%d failed probes), PASSING %v after the recovery (%d passing probes); history %v",
		kind, interval, failures, successes, detect.Round(time.Millisecond), failedProbes, recover.Round(time.Millisecond), passedProbes, h.history())
	if got := h.history(); len(got) != 3 || got[0] != registry.HealthPassing || got[1] != registry.HealthCritical || got[2] != registry.HealthPassing {
		t.Errorf("health history %v, want exactly PASSING, CRITICAL, PASSING (no flapping)", got)
	}
	// Only the two transitions were written: the record's revision moved
	// twice since registration (a probe per interval wrote nothing).
	snap, err := c.Instances(ctx, "web", client.All())
	if err != nil || len(snap.Instances) != 1 {
		t.Fatal(snap, err)
	}
	got := snap.Instances[0]
	if got.Checks[0].Status != registry.HealthPassing || got.Checks[0].Output == "" || got.Checks[0].Since.IsZero() {
		t.Errorf("stored check %+v: want PASSING with output and time of change", got.Checks[0])
	}
	resp, err := srv.EtcdClient().Get(ctx, "/beacon/v1/ns/default/svc/web/inst/web-1")
	if err != nil {
		t.Fatal(err)
	}
	if v := resp.Kvs[0].Version; v != 3 {
		t.Errorf("the instance's key was written %d times, want 3 (registration + 2 transitions)", v)
	}
}

// Behaviour 4: with two servers on one etcd each check runs on exactly one
// of them; when one is killed its checks move to the other once its
// membership has expired. Asserted by state: the two servers' owned checks
// always add up to the number of checks (none run twice, none dropped),
// and every check keeps running; the takeover time is logged.
func TestChecksAreSharedAndTakenOver(t *testing.T) {
	const memberTTL = 5 * time.Second
	cfgA := servertest.Config(t, "")
	cfgA.EtcdClientAddr = testutil.FreeAddr(t) // for b
	a := servertest.Start(t, cfgA)
	bAddr := testutil.FreeAddr(t)
	b := start(t, "server", "--addr", bAddr, "--name", "b", "--etcd-endpoints", "http://"+cfgA.EtcdClientAddr,
		"--member-ttl", memberTTL.String(), "--log-level", "warn", "--console-addr", "off")
	b.waitLine(60*time.Second, "beacon server ready")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	// One HTTP target; each instance's check has its own path, so hits
	// per path count how often its check runs.
	var hits sync.Map // path -> *atomic.Int64
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		v, _ := hits.LoadOrStore(r.URL.Path, new(atomic.Int64))
		v.(*atomic.Int64).Add(1)
	})}
	go hs.Serve(ln)
	defer hs.Close()
	port := ln.Addr().(*net.TCPAddr).Port

	const n, interval = 40, 200 * time.Millisecond
	c := newClient(t, a.Addr())
	for i := range n {
		in := registry.Instance{Service: "shared", ID: fmt.Sprint("i-", i), Address: "127.0.0.1", Port: port,
			Checks: []registry.Check{{Kind: registry.CheckHTTP, Target: fmt.Sprintf("http://127.0.0.1:%d/i-%d", port, i), Interval: interval}}}
		if _, err := c.Register(ctx, in); err != nil {
			t.Fatal(err)
		}
	}
	owned := func(addr string) int {
		v, _ := testutil.Metric(t, addr, "beacon_checks_owned")
		return int(v)
	}
	testutil.Eventually(t, 60*time.Second, "both servers share the checks", func() bool {
		oa, ob := owned(a.Addr()), owned(bAddr)
		return oa+ob == n && oa > 0 && ob > 0
	})
	t.Logf("shared: server a runs %d checks, server b %d", owned(a.Addr()), owned(bAddr))

	count := func() map[string]int64 {
		out := map[string]int64{}
		hits.Range(func(k, v any) bool { out[k.(string)] = v.(*atomic.Int64).Load(); return true })
		return out
	}
	// everyCheckRan waits until every check has run at least k more times
	// than in since; meanwhile, at every sample, the servers' owned
	// checks must add up to n (a check owned by both runs twice).
	everyCheckRan := func(since map[string]int64, k int64, what string, sharedBy ...string) {
		t.Helper()
		bad := 0
		testutil.Eventually(t, 60*time.Second, what, func() bool {
			total := 0
			for _, addr := range sharedBy {
				total += owned(addr)
			}
			if total != n {
				if bad++; bad <= 5 {
					t.Errorf("%s: the servers own %d checks in all, want %d (each check on exactly one server)", what, total, n)
				}
			}
			now := count()
			for i := range n {
				p := fmt.Sprintf("/i-%d", i)
				if now[p]-since[p] < k {
					return false
				}
			}
			return true
		})
	}
	// Steady state: every check runs, on one server.
	everyCheckRan(count(), 5, "every check runs while shared", a.Addr(), bAddr)

	killed := time.Now()
	b.signal(syscall.SIGKILL)
	b.wait(30 * time.Second)
	testutil.Eventually(t, memberTTL+60*time.Second, "server a runs every check", func() bool { return owned(a.Addr()) == n })
	takeover := time.Since(killed)
	// And every check runs again, all on server a.
	everyCheckRan(count(), 3, "every check runs after the takeover", a.Addr())
	t.Logf("server b killed: server a owned all %d checks %v later (member TTL %v)", n, takeover.Round(time.Millisecond), memberTTL)
}

// Protection threshold: when most of a service's instances go CRITICAL,
// discovery (the server's list and the SDK's cache) returns them too,
// flagged, instead of piling the load on the one survivor.
func TestProtectionThresholdKeepsUnhealthyInstancesInUse(t *testing.T) {
	srv := servertest.Start(t, servertest.Config(t, ""))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c := newClient(t, srv.Addr())
	var lns []net.Listener
	for i := range 4 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		go func() { // accept and close: the TCP check passes
			for {
				conn, err := ln.Accept()
				if err != nil {
					return
				}
				conn.Close()
			}
		}()
		lns = append(lns, ln)
		in := registry.Instance{Service: "pool", ID: fmt.Sprint("p-", i), Address: "127.0.0.1", Port: ln.Addr().(*net.TCPAddr).Port,
			Checks: []registry.Check{{Kind: registry.CheckTCP, Interval: time.Second, Timeout: time.Second, FailuresBeforeCritical: 2, SuccessesBeforePassing: 1}}}
		if _, err := c.Register(ctx, in); err != nil {
			t.Fatal(err)
		}
	}
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	if _, err := c.SetProtectionThreshold(ctx, "pool", 0.5); err != nil {
		t.Fatal(err)
	}
	w, err := c.Watch(ctx, []string{"pool"})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	for _, ln := range lns[1:] { // three of four refuse connections from now on
		ln.Close()
	}
	critical := func() int {
		snap, err := c.Instances(ctx, "pool", client.All())
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, in := range snap.Instances {
			if in.Health == registry.HealthCritical {
				n++
			}
		}
		return n
	}
	testutil.Eventually(t, 30*time.Second, "three instances CRITICAL", func() bool { return critical() == 3 })

	list := func() int {
		snap, err := c.Instances(ctx, "pool")
		if err != nil {
			t.Fatal(err)
		}
		return len(snap.Instances)
	}
	if n := list(); n != 4 {
		t.Errorf("with 1 of 4 routable and threshold 0.5, discovery lists %d instances, want all 4", n)
	}
	testutil.Eventually(t, 30*time.Second, "the watcher's snapshot carries the threshold", func() bool {
		s, ok := w.Snapshot("pool")
		if !ok {
			w.Next(ctx)
			return false
		}
		avail, protected := s.Available()
		return protected && len(avail) == 4 && s.ProtectionThreshold == 0.5
	})
	// Protection off for the service: only the survivor.
	if _, err := c.SetProtectionThreshold(ctx, "pool", 0); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 30*time.Second, "only the routable instance once protection is off", func() bool { return list() == 1 })
	// Back to the server's default (0 here).
	if _, err := c.ResetProtectionThreshold(ctx, "pool"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.SetProtectionThreshold(ctx, "pool", 1.5); err == nil || !strings.Contains(err.Error(), "protection_threshold") {
		t.Errorf("threshold 1.5: %v, want an error naming protection_threshold", err)
	}
}

// Behaviour 2, TTL: the instance pushes its status; silence longer than
// the TTL makes the check CRITICAL, the next push brings it back; a pushed
// WARNING stays routable. The TTL (10 s) is ten times the push period, so
// a loaded machine does not turn a renewal into an expiry.
func TestTTLCheckExpiresAndRecovers(t *testing.T) {
	srv := servertest.Start(t, servertest.Config(t, ""))
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	c := newClient(t, srv.Addr())
	const ttl, every = 10 * time.Second, time.Second
	in := registry.Instance{Service: "batch", ID: "b-1", Address: "127.0.0.1", Port: 9000,
		Checks: []registry.Check{{Kind: registry.CheckTTL, Interval: ttl}}}
	if _, err := c.Register(ctx, in); err != nil {
		t.Fatal(err)
	}
	h := followHealth(ctx, t, c, "batch", "b-1")
	h.waitHealth(t, registry.HealthCritical, 30*time.Second) // no update yet
	if routable(ctx, t, c, "batch", "b-1") {
		t.Error("a TTL-checked instance is routable before its first update")
	}
	// The CLI reports, then a loop keeps reporting.
	out, err := run(t, nil, "--server", srv.Addr(), "check-update", "batch", "b-1", "PASSING", "--note", "all good")
	if err != nil || !strings.Contains(out, "now PASSING") {
		t.Fatalf("beacon check-update: %v\n%s", err, out)
	}
	h.waitHealth(t, registry.HealthPassing, 30*time.Second)
	// push reports st n times, one every `every`, and returns when its last
	// report was sent.
	push := func(st registry.Health, n int) (last time.Time) {
		for i := range n {
			if i > 0 {
				time.Sleep(every)
			}
			last = time.Now()
			if _, err := c.UpdateCheck(ctx, "batch", "b-1", "", st, ""); err != nil {
				t.Fatal(err)
			}
		}
		return last
	}
	// Longer than the TTL: renewals keep it PASSING. Then the instance
	// stops reporting (hung); the TTL runs from its last report.
	silent := push(registry.HealthPassing, int(ttl/every)+5)
	if got := h.history(); got[len(got)-1] != registry.HealthPassing {
		t.Fatalf("renewed check: history %v", got)
	}
	h.waitHealth(t, registry.HealthCritical, 3*ttl+30*time.Second)
	// A lower bound only, and a causal one: the TTL cannot have run out
	// before it was last renewed plus the TTL, however loaded the machine.
	t.Logf("TTL %v: CRITICAL %v after the last update", ttl, time.Since(silent).Round(100*time.Millisecond))
	if d := time.Since(silent); d < ttl-200*time.Millisecond {
		t.Errorf("CRITICAL %v after the last update, before the TTL", d)
	}
	push(registry.HealthWarning, 2)
	h.waitHealth(t, registry.HealthWarning, 30*time.Second)
	if !routable(ctx, t, c, "batch", "b-1") {
		t.Error("a WARNING instance left discovery")
	}
	if got, want := h.history(), []registry.Health{registry.HealthCritical, registry.HealthPassing, registry.HealthCritical, registry.HealthWarning}; !slices.Equal(got, want) {
		t.Errorf("history %v, want %v", got, want)
	}
	if _, err := c.UpdateCheck(ctx, "batch", "b-1", "nope", registry.HealthPassing, ""); err == nil || !strings.Contains(err.Error(), "check") {
		t.Errorf("update of a missing check: %v, want an error naming the check", err)
	}
}

// The operator's commands: a checked registration, maintenance on and off,
// a protection threshold, and the checks table.
func TestCLIHealthCommands(t *testing.T) {
	srv := servertest.Start(t, servertest.Config(t, ""))
	s := []string{"--server", srv.Addr()}
	steps := []struct {
		args []string
		want string
	}{
		{[]string{"register", "--service", "web", "--id", "w-1", "--address", "127.0.0.1", "--port", "9", "--persistent",
			"--check-tcp", "--check-interval", "200ms", "--check-failures", "1"}, "registered default/web/w-1"},
		{[]string{"status", "web", "w-1", "OUT_OF_SERVICE"}, "is OUT_OF_SERVICE"},
		{[]string{"instances", "web", "--all"}, "OUT_OF_SERVICE"},
		{[]string{"status", "web", "w-1", "UP"}, "is UP"},
		{[]string{"protect", "web", "0.5"}, "protection threshold 0.5"},
		{[]string{"protect", "web", "--default"}, "default protection threshold"},
	}
	for _, st := range steps {
		out, err := run(t, nil, append(s, st.args...)...)
		if err != nil || !strings.Contains(out, st.want) {
			t.Fatalf("beacon %v: %v\n%s\nwant %q", st.args, err, out, st.want)
		}
	}
	// Nothing listens on port 9: the TCP check goes CRITICAL, shown with its output.
	testutil.Eventually(t, 30*time.Second, "the checks table shows CRITICAL", func() bool {
		out, _ := run(t, nil, append(s, "instances", "web", "--all")...)
		return strings.Contains(out, "CHECK") && strings.Contains(out, "CRITICAL") && strings.Contains(out, "refused")
	})
	for _, bad := range [][]string{
		{"status", "web", "w-1", "SLEEPING"},
		{"protect", "web", "2"},
		{"register", "--service", "web", "--id", "w-2", "--address", "127.0.0.1", "--port", "9", "--persistent", "--check-tcp", "--check-interval", "1ms"},
	} {
		if out, err := run(t, nil, append(s, bad...)...); err == nil {
			t.Errorf("beacon %v succeeded:\n%s", bad, out)
		}
	}
}

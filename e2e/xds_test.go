package e2e

import (
	"bufio"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"beacon.dev/beacon/internal/chisq"
	"beacon.dev/beacon/internal/testutil"
)

// beacon's xDS control plane (docs/xds.md) with real processes on every
// side: `beacon server --xds-addr`, echo services registered with it
// (lifecycle.Run, sessions of TTL ttl), bootstrap files written by `beacon
// xds bootstrap`, and grpc-go's own xDS client in a process of its own —
// e2e/internal/xdsclient, a plain program without beacon code that dials
// xds:///orders and prints a line per call.

// xdsCallsPerWindow is how many calls a chi-squared check counts.
const xdsCallsPerWindow = 2000

// The steps share one setup and build on each other, in this order. The
// setup: four instances of orders, a1 and a2 in zone a, b1 and b2 in zone
// b, all of weight 100; a client whose bootstrap names no zone and one in
// zone a. The steps: the zoneless client's calls spread evenly over the
// four (chi-squared); the zone-a client's stay on a1 and a2; a2 SIGKILLed:
// the calls go on with the others (those in flight on a2 fail and are
// counted), a2 leaves the registry when its session expires, and from
// then on no call fails; a1 set DRAINING: no call fails, a1 gets none,
// and the zone-a client fails over to zone b; b2's weight changed from
// 100 to 300: its share goes from one half to three quarters
// (chi-squared).
func TestXDSRealGRPCClient(t *testing.T) {
	xdsAddr := testutil.FreeAddr(t)
	srv := newServerProc(t, "--xds-addr", xdsAddr)
	echoes := map[string]*echoProc{}
	for _, in := range []struct{ id, zone string }{{"a1", "a"}, {"a2", "a"}, {"b1", "b"}, {"b2", "b"}} {
		echoes[in.id] = startEcho(t, srv.addr, "--service", "orders", "--id", in.id, "--zone", in.zone,
			"--weight", "100", "--ttl", ttl.String())
	}
	reg := start(t, "watch", "--server", srv.addr, "orders") // a line per change of orders
	reg.waitLine(30*time.Second, "default/orders routable=4 total=4")
	anyZone := startXDSClient(t, "no zone", xdsBootstrap(t, xdsAddr, ""))
	zoneA := startXDSClient(t, "zone a", xdsBootstrap(t, xdsAddr, "a"))

	step := func(name string, f func(t *testing.T)) {
		if !t.Run(name, f) {
			t.FailNow() // the next steps start from this one's state
		}
	}

	step("calls spread over every instance", func(t *testing.T) {
		eventually(t, anyZone, 200, "calls on all four instances", func(c xdsTally) bool {
			return c.failed == 0 && c.by["a1"] > 0 && c.by["a2"] > 0 && c.by["b1"] > 0 && c.by["b2"] > 0
		})
		fit(t, anyZone.next(t, xdsCallsPerWindow), []string{"a1", "a2", "b1", "b2"}, []float64{1, 1, 1, 1})
	})

	step("a client in zone a calls zone a only", func(t *testing.T) {
		eventually(t, zoneA, 200, "every call on a1 and a2", func(c xdsTally) bool {
			return c.failed == 0 && c.by["a1"] > 0 && c.by["a2"] > 0 && c.by["a1"]+c.by["a2"] == c.n
		})
	})

	step("a SIGKILLed instance's calls fail over and it leaves within its TTL", func(t *testing.T) {
		fromAny, fromA := anyZone.mark(), zoneA.mark()
		killed := time.Now()
		echoes["a2"].signal(syscall.SIGKILL)
		waitExit(t, echoes["a2"].proc)
		line := waitRegistry(t, reg, ttl+30*time.Second, "a2 to leave the registry", func(ids []string) bool {
			return !slices.Contains(ids, "a2")
		})
		leftAny, leftA := anyZone.mark(), zoneA.mark()
		t.Logf("a2 left the registry %s after its SIGKILL (session TTL %s): %s", time.Since(killed).Round(time.Millisecond), ttl, line)

		// Until then the clients went on with the others; a call in
		// flight on a2 when it died fails (gRPC retries only what never
		// reached the wire).
		for _, c := range []struct {
			c          *xdsClientProc
			from, left int
		}{{anyZone, fromAny, leftAny}, {zoneA, fromA, leftA}} {
			meanwhile := tally(c.c.between(c.from, c.left))
			t.Logf("client %s, from the SIGKILL until a2 left the registry: %d calls, %d failed %v, per instance %v",
				c.c.name, meanwhile.n, meanwhile.failed, meanwhile.errs, meanwhile.by)
			if meanwhile.n-meanwhile.failed == 0 {
				t.Errorf("client %s: no call succeeded between the SIGKILL and a2's expiry: the calls did not fail over", c.c.name)
			}
		}
		// Once it left, not a call fails; zone a still has a1.
		after := tally(anyZone.wait(t, leftAny, 300))
		if after.failed > 0 || after.by["a2"] > 0 || after.by["a1"] == 0 || after.by["b1"] == 0 || after.by["b2"] == 0 {
			t.Errorf("client %s, the 300 calls after a2 left: %d failed %v, per instance %v; want none failed, a1, b1 and b2 each some",
				anyZone.name, after.failed, after.errs, after.by)
		}
		after = tally(zoneA.wait(t, leftA, 300))
		if after.failed > 0 || after.by["a1"] != after.n {
			t.Errorf("client %s, the 300 calls after a2 left: %d failed %v, per instance %v; want every one on a1",
				zoneA.name, after.failed, after.errs, after.by)
		}
	})

	step("a DRAINING instance gets no new calls and zone a fails over", func(t *testing.T) {
		fromAny, fromA := anyZone.mark(), zoneA.mark()
		if out, err := run(t, nil, "status", "--server", srv.addr, "orders", "a1", "DRAINING"); err != nil {
			t.Fatalf("beacon status orders a1 DRAINING: %v\n%s", err, out)
		}
		eventually(t, anyZone, 200, "no call on a1", func(c xdsTally) bool {
			return c.failed == 0 && c.by["a1"] == 0 && c.by["b1"] > 0 && c.by["b2"] > 0
		})
		eventually(t, zoneA, 200, "zone a's client on b1 and b2", func(c xdsTally) bool {
			return c.failed == 0 && c.by["a1"] == 0 && c.by["b1"] > 0 && c.by["b2"] > 0
		})
		// A DRAINING instance finishes what it has: no call failed.
		for _, c := range []struct {
			c    *xdsClientProc
			from int
		}{{anyZone, fromAny}, {zoneA, fromA}} {
			if all := tally(c.c.since(c.from)); all.failed > 0 {
				t.Errorf("client %s: %d of %d calls failed while a1 drained: %v", c.c.name, all.failed, all.n, all.errs)
			}
		}
		// The baseline of the next step: b1 and b2 share evenly.
		fit(t, anyZone.next(t, xdsCallsPerWindow), []string{"a1", "b1", "b2"}, []float64{0, 1, 1})
	})

	step("a weight change shifts the traffic", func(t *testing.T) {
		// An operator's change: b2 registered again, at weight 300.
		host, port, _ := net.SplitHostPort(echoes["b2"].grpcAddr)
		if out, err := run(t, nil, "register", "--server", srv.addr, "--persistent", "--service", "orders", "--id", "b2",
			"--address", host, "--port", port, "--zone", "b", "--weight", "300"); err != nil {
			t.Fatalf("beacon register --weight 300: %v\n%s", err, out)
		}
		// The change has arrived once a window of calls no longer fits
		// the even split (chi-squared); a fresh window must then fit 1:3.
		shifted := eventually(t, anyZone, 400, "the traffic to leave the even split of b1 and b2", func(c xdsTally) bool {
			return c.failed == 0 && c.by["b1"]+c.by["b2"] == c.n && chisq.Fit([]int{c.by["b1"], c.by["b2"]}, []float64{1, 1}) != nil
		})
		t.Logf("the traffic shifted: %d calls, per instance %v, reject the even split", shifted.n, shifted.by)
		fit(t, anyZone.next(t, xdsCallsPerWindow), []string{"a1", "b1", "b2"}, []float64{0, 1, 3})
	})
}

// xdsClientBuild is the xdsclient binary, built once per test run by the
// first test that needs it.
var xdsClientBuild struct {
	once sync.Once
	path string
	err  error
}

func xdsClientBin(t *testing.T) string {
	t.Helper()
	xdsClientBuild.once.Do(func() {
		path := filepath.Join(filepath.Dir(beaconBin), "xdsclient") // TestMain removes the directory
		out, err := exec.Command("go", "build", "-o", path, "beacon.dev/beacon/e2e/internal/xdsclient").CombinedOutput()
		if err != nil {
			xdsClientBuild.err = fmt.Errorf("go build ./internal/xdsclient: %v\n%s", err, out)
			return
		}
		xdsClientBuild.path = path
	})
	if xdsClientBuild.err != nil {
		t.Fatal(xdsClientBuild.err)
	}
	return xdsClientBuild.path
}

// xdsBootstrap writes the bootstrap file `beacon xds bootstrap` prints for
// a client of service checkout in zone (none when empty).
func xdsBootstrap(t *testing.T, xdsAddr, zone string) string {
	t.Helper()
	args := []string{"xds", "bootstrap", "--service", "checkout", "--xds-server", xdsAddr}
	if zone != "" {
		args = append(args, "--zone", zone)
	}
	cmd := exec.Command(beaconBin, args...)
	dieWithTest(cmd)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("beacon %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	file := filepath.Join(t.TempDir(), "xds-bootstrap.json")
	if err := os.WriteFile(file, out, 0o600); err != nil {
		t.Fatal(err)
	}
	return file
}

// xdsCall is one call of an xdsclient: the instance that answered, or
// the failure ("CODE message").
type xdsCall struct{ server, err string }

func (c xdsCall) String() string {
	if c.err != "" {
		return "err " + c.err
	}
	return "ok " + c.server
}

// xdsClientProc is a running xdsclient process; its calls are collected
// in the order it printed them.
type xdsClientProc struct {
	name  string
	cmd   *exec.Cmd
	mu    sync.Mutex
	calls []xdsCall // guarded by mu
	other []string  // guarded by mu: lines that are no call (grpc-go's logs)
	done  chan struct{}
}

// startXDSClient runs an xdsclient on the bootstrap file: four calls in
// flight, at most 500 a second, each given 10 s; flags, after these,
// override them. It is stopped when the test ends.
func startXDSClient(t *testing.T, name, bootstrap string, flags ...string) *xdsClientProc {
	t.Helper()
	args := append([]string{"-target", "orders", "-workers", "4", "-every", "2ms", "-timeout", "10s"}, flags...)
	c := &xdsClientProc{name: name, done: make(chan struct{}), cmd: exec.Command(xdsClientBin(t), args...)}
	c.cmd.Env = append(os.Environ(), "GRPC_XDS_BOOTSTRAP="+bootstrap)
	dieWithTest(c.cmd)
	stdin, err := c.cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	pr, pw := io.Pipe()
	c.cmd.Stdout, c.cmd.Stderr = pw, pw
	if err := c.cmd.Start(); err != nil {
		t.Fatalf("starting xdsclient: %v", err)
	}
	go func() { // ends when the process's output does
		defer close(c.done)
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			line := sc.Text()
			c.mu.Lock()
			switch kind, rest, _ := strings.Cut(line, " "); kind {
			case "ok":
				c.calls = append(c.calls, xdsCall{server: rest})
			case "err":
				c.calls = append(c.calls, xdsCall{err: rest})
			default:
				c.other = append(c.other, line)
			}
			c.mu.Unlock()
		}
		io.Copy(io.Discard, pr)
	}()
	go func() {
		c.cmd.Wait()
		pw.Close() // after Wait: everything the process wrote is in the pipe
	}()
	t.Cleanup(func() {
		stdin.Close() // the client's own way out
		select {
		case <-c.done:
		case <-time.After(10 * time.Second):
		}
		c.cmd.Process.Signal(syscall.SIGKILL)
		<-c.done
		if t.Failed() {
			c.mu.Lock()
			defer c.mu.Unlock()
			var last []string
			for _, call := range c.calls[max(0, len(c.calls)-20):] {
				last = append(last, call.String())
			}
			t.Logf("xdsclient %s: %d calls, the last ones: %s; other output:\n%s",
				c.name, len(c.calls), strings.Join(last, ", "), strings.Join(c.other, "\n"))
		}
	})
	return c
}

// mark is the number of calls printed so far: the calls from mark on are
// those printed after now.
func (c *xdsClientProc) mark() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.calls)
}

func (c *xdsClientProc) between(from, to int) []xdsCall {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.calls[from:to])
}

func (c *xdsClientProc) since(from int) []xdsCall {
	return c.between(from, c.mark())
}

// wait waits for n calls from mark from on and returns them.
func (c *xdsClientProc) wait(t *testing.T, from, n int) []xdsCall {
	t.Helper()
	testutil.Eventually(t, 60*time.Second, fmt.Sprintf("%d calls of client %s", n, c.name), func() bool {
		select {
		case <-c.done:
			t.Fatalf("xdsclient %s exited", c.name)
		default:
		}
		return c.mark() >= from+n
	})
	return c.between(from, from+n)
}

// next waits for the next n calls and returns them.
func (c *xdsClientProc) next(t *testing.T, n int) []xdsCall {
	t.Helper()
	return c.wait(t, c.mark(), n)
}

// xdsTally counts calls: n in all, by answering instance, and the failed
// ones with their distinct errors.
type xdsTally struct {
	n, failed int
	by        map[string]int
	errs      []string
}

func tally(calls []xdsCall) xdsTally {
	c := xdsTally{n: len(calls), by: map[string]int{}}
	for _, call := range calls {
		if call.err != "" {
			c.failed++
			if !slices.Contains(c.errs, call.err) {
				c.errs = append(c.errs, call.err)
			}
			continue
		}
		c.by[call.server]++
	}
	return c
}

// eventually waits until a window of the client's next n calls satisfies
// cond, and returns that window's tally.
func eventually(t *testing.T, c *xdsClientProc, n int, what string, cond func(xdsTally) bool) xdsTally {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		last := tally(c.next(t, n)) // blocks until the calls are made
		if cond(last) {
			return last
		}
		if time.Now().After(deadline) {
			t.Fatalf("client %s: timed out after 60s waiting for %s; the last %d calls: %d failed %v, per instance %v",
				c.name, what, n, last.failed, last.errs, last.by)
		}
	}
}

// fit checks that the calls were all answered, in the proportions of
// weights over the instances ids (chi-squared at the 0.1% level; an
// instance of weight 0 must have none).
func fit(t *testing.T, calls []xdsCall, ids []string, weights []float64) {
	t.Helper()
	c := tally(calls)
	var observed []int
	var ws []float64
	sum := 0
	for i, id := range ids {
		sum += c.by[id]
		if weights[i] > 0 {
			observed, ws = append(observed, c.by[id]), append(ws, weights[i])
		} else if c.by[id] > 0 {
			t.Errorf("%d calls on %s, want none", c.by[id], id)
		}
	}
	if c.failed > 0 || sum != c.n {
		t.Fatalf("%d calls: %d failed %v, per instance %v; want all answered by %v", c.n, c.failed, c.errs, c.by, ids)
	}
	t.Logf("%d calls, per instance %v, for weights %v over %v: chi-squared %.2f (df %d, critical %.2f at p = 0.001)",
		c.n, c.by, weights, ids, pearson(observed, ws), len(ws)-1, chisq.Critical(len(ws)-1))
	if err := chisq.Fit(observed, ws); err != nil {
		t.Errorf("calls per instance %v, want the proportions %v of %v: %v", c.by, weights, ids, err)
	}
}

// pearson is the statistic chisq.Fit tests, for the log.
func pearson(observed []int, weights []float64) float64 {
	n, sum := 0, 0.0
	for i := range observed {
		n += observed[i]
		sum += weights[i]
	}
	stat := 0.0
	for i, o := range observed {
		exp := float64(n) * weights[i] / sum
		stat += math.Pow(float64(o)-exp, 2) / exp
	}
	return stat
}

// waitRegistry waits for a line of `beacon watch` whose instances (their
// ids) satisfy cond, and returns it.
func waitRegistry(t *testing.T, watch *proc, timeout time.Duration, what string, cond func(ids []string) bool) string {
	t.Helper()
	var found string
	testutil.Eventually(t, timeout, what, func() bool {
		watch.mu.Lock()
		defer watch.mu.Unlock()
		for _, l := range watch.out {
			from, to := strings.Index(l, "["), strings.LastIndex(l, "]")
			if !strings.HasPrefix(l, "rev=") || from < 0 || to < from {
				continue
			}
			var ids []string
			for _, f := range strings.Fields(l[from+1 : to]) {
				id, _, _ := strings.Cut(f, "@")
				ids = append(ids, id)
			}
			if cond(ids) {
				found = l
				return true
			}
		}
		return false
	})
	return found
}

// waitExit waits for a signalled process to end.
func waitExit(t *testing.T, p *proc) {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("process still running 30s after the signal; output:\n%s", p.output())
	}
}

package cli_test

import (
	"bytes"
	"context"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/cmd/beacon/internal/cli"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/server/servertest"
)

// syncBuffer is an output a running command writes while the test reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// start runs a long-running command until the test stops it; stop
// returns its exit code.
func start(args ...string) (out *syncBuffer, stop func() int) {
	out = &syncBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	code := make(chan int, 1)
	go func() { code <- cli.MainContext(ctx, args, out, out) }()
	return out, sync.OnceValue(func() int { cancel(); return <-code })
}

// An error has one "beacon:" prefix, and a refused connection says what
// to do about it.
func TestErrorsHaveOnePrefixAndAHint(t *testing.T) {
	addr := testutil.FreeAddr(t) // nobody listens there
	code, _, errs := run("--server", addr, "instances", "orders")
	if code != 1 || !strings.HasPrefix(errs, "beacon: ") || strings.Contains(errs, "beacon: beacon:") {
		t.Errorf("exit %d, stderr %q: want 1 and one beacon: prefix", code, errs)
	}
	if !strings.Contains(errs, "start one with `beacon server`") || !strings.Contains(errs, addr) || !strings.Contains(errs, "BEACON_ADDR") {
		t.Errorf("stderr %q lacks the hint naming %s, beacon server and BEACON_ADDR", errs, addr)
	}
}

// --server HOST without a port means the server's default port, not 80.
func TestServerWithoutAPortTakesTheDefaultPort(t *testing.T) {
	code, _, errs := run("--server", "127.0.0.2", "services")
	if code != 1 || !strings.Contains(errs, "127.0.0.2:8970") || strings.Contains(errs, ":80 ") {
		t.Errorf("exit %d, stderr %q: want a refused 127.0.0.2:8970", code, errs)
	}
	srv := servertest.Start(t, servertest.Config(t, ""))
	host, port, _ := strings.Cut(srv.Addr(), ":")
	t.Setenv("BEACON_ADDR", host+":"+port)
	if code, out, errs := run("services"); code != 0 {
		t.Errorf("services with BEACON_ADDR = %d %q %q", code, out, errs)
	}
	// A list, as --server takes: the first is down, the second answers.
	t.Setenv("BEACON_ADDR", testutil.FreeAddr(t)+","+host+":"+port)
	if code, out, errs := run("services"); code != 0 {
		t.Errorf("services with BEACON_ADDR listing two servers = %d %q %q", code, out, errs)
	}
}

// check-update's text is --note: the global -o/--output works there too.
func TestCheckUpdateNoteLeavesTheGlobalOutputFlag(t *testing.T) {
	srv := servertest.Start(t, servertest.Config(t, ""))
	s := "--server=" + srv.Addr()
	if code, out, errs := run(s, "register", "--persistent", "--service", "batch", "--id", "b-1", "--address", "127.0.0.1", "--port", "7000", "--check-ttl", "30s"); code != 0 {
		t.Fatalf("register = %d %q %q", code, out, errs)
	}
	if code, out, errs := run(s, "check-update", "batch", "b-1", "PASSING", "--note", "queue depth 3", "-o", "json"); code != 0 {
		t.Fatalf("check-update --note … -o json = %d %q %q", code, out, errs)
	}
	code, out, errs := run(s, "instances", "batch", "-o", "json")
	var resp beaconv1.ListInstancesResponse
	if code != 0 || protojson.Unmarshal([]byte(out), &resp) != nil || len(resp.Instances) != 1 {
		t.Fatalf("instances -o json = %d %q %q", code, out, errs)
	}
	if c := resp.Instances[0].Checks; len(c) != 1 || c[0].Output != "queue depth 3" || c[0].Status != beaconv1.Health_HEALTH_PASSING {
		t.Errorf("checks = %v, want the TTL check PASSING with the note as output", c)
	}
}

// The session id the CLI prints is the API's (decimal), so it can be
// pasted into a call.
func TestSessionIDsAreTheAPIs(t *testing.T) {
	srv := servertest.Start(t, servertest.Config(t, ""))
	out, stop := start("--server", srv.Addr(), "register", "--service", "web", "--id", "w-1", "--address", "127.0.0.1", "--port", "8080")
	var printed string
	testutil.Eventually(t, 30*time.Second, "the registration line", func() bool {
		_, rest, ok := strings.Cut(out.String(), "(session ")
		printed, _, _ = strings.Cut(rest, ",")
		return ok
	})
	code, list, errs := run("--server", srv.Addr(), "instances", "web", "-o", "json")
	var resp beaconv1.ListInstancesResponse
	if code != 0 || protojson.Unmarshal([]byte(list), &resp) != nil || len(resp.Instances) != 1 {
		t.Fatalf("instances -o json = %d %q %q", code, list, errs)
	}
	if want := strconv.FormatInt(resp.Instances[0].SessionId, 10); printed != want {
		t.Errorf("register printed session %q; the API says %s", printed, want)
	}
	if code := stop(); code != 0 {
		t.Errorf("register stopped with %d, want 0; output %q", code, out.String())
	}
}

// instances: a missing SERVICE is named; a service with no instances says
// so and is not an error.
func TestInstancesNamesWhatIsMissing(t *testing.T) {
	if code, _, errs := run("instances"); code != 1 || !strings.Contains(errs, "missing SERVICE") {
		t.Errorf("instances = %d %q, want the missing SERVICE named", code, errs)
	}
	srv := servertest.Start(t, servertest.Config(t, ""))
	code, out, errs := run("--server", srv.Addr(), "instances", "nosuchservice")
	if code != 0 || !strings.Contains(out, "default/nosuchservice has no routable instances") {
		t.Errorf("instances nosuchservice = %d %q %q", code, out, errs)
	}
	code, out, _ = run("--server", srv.Addr(), "instances", "nosuchservice", "--all")
	if code != 0 || !strings.Contains(out, "default/nosuchservice has no instances") {
		t.Errorf("instances nosuchservice --all = %d %q", code, out)
	}
}

// beacon server --help shows the server's flags, not the client commands'.
func TestServerHelpLeavesOutClientFlags(t *testing.T) {
	code, out, _ := run("server", "--help")
	if code != 0 || !strings.Contains(out, "--addr") || !strings.Contains(out, "--etcd-client-addr") {
		t.Fatalf("server --help = %d %q", code, out)
	}
	for _, flag := range []string{"--server ", "--namespace", "--output", "--token"} {
		if strings.Contains(out, flag) {
			t.Errorf("server --help lists the client flag %s", flag)
		}
	}
	// A backquoted word in a flag's usage is taken as its value's name.
	if strings.Contains(out, "--acl beacon") {
		t.Errorf("server --help shows --acl taking an argument: %q", out)
	}
	if _, out, _ := run("instances", "--help"); !strings.Contains(out, "--server") {
		t.Errorf("instances --help lost --server: %q", out)
	}
}

// version and --version name the build.
func TestVersion(t *testing.T) {
	for _, args := range [][]string{{"version"}, {"--version"}} {
		code, out, _ := run(args...)
		if code != 0 || !strings.HasPrefix(out, "beacon ") || !strings.Contains(out, "go1.") {
			t.Errorf("%v = %d %q", args, code, out)
		}
	}
}

// watch says when the registry is unreachable and when it is back, and
// prints nothing twice.
func TestWatchReportsAnUnreachableRegistry(t *testing.T) {
	srv := servertest.Start(t, servertest.Config(t, ""))
	proxy := testutil.NewProxy(t, srv.Addr())
	if code, out, errs := run("--server", srv.Addr(), "register", "--persistent", "--service", "web", "--id", "w-1", "--address", "127.0.0.1", "--port", "8080"); code != 0 {
		t.Fatalf("register = %d %q %q", code, out, errs)
	}
	out, stop := start("--server", proxy.Addr(), "watch", "web")
	defer stop()
	testutil.Eventually(t, 30*time.Second, "the first snapshot", func() bool { return strings.Contains(out.String(), "default/web routable=1") })
	proxy.SetDown(true)
	testutil.Eventually(t, 30*time.Second, "the watch reporting the registry unreachable", func() bool {
		return strings.Contains(out.String(), "watch: registry unreachable")
	})
	proxy.SetDown(false)
	testutil.Eventually(t, 30*time.Second, "the watch reporting it is back", func() bool {
		return strings.Contains(out.String(), "watch: reconnected")
	})
	if code, o, errs := run("--server", srv.Addr(), "register", "--persistent", "--service", "web", "--id", "w-2", "--address", "127.0.0.1", "--port", "8081"); code != 0 {
		t.Fatalf("register = %d %q %q", code, o, errs)
	}
	testutil.Eventually(t, 30*time.Second, "the change after the resume", func() bool { return strings.Contains(out.String(), "routable=2") })
	if n := strings.Count(out.String(), "default/web routable=1 "); n != 1 {
		t.Errorf("the unchanged snapshot was printed %d times:\n%s", n, out.String())
	}
	if code := stop(); code != 0 {
		t.Errorf("watch stopped with %d", code)
	}
}

// The CLI over TLS: --ca-cert (or BEACON_CACERT) and a client
// certificate for a server that requires one.
func TestCLIOverMutualTLS(t *testing.T) {
	dir := t.TempDir()
	ca, clientCA := testutil.NewCA(t, "server CA"), testutil.NewCA(t, "client CA")
	cfg := servertest.Config(t, "")
	cfg.TLSCertFile, cfg.TLSKeyFile = ca.Issue(t, dir, "server", testutil.CertSpec{Names: []string{"127.0.0.1"}})
	cfg.TLSClientCAFile = clientCA.WriteCert(t, filepath.Join(dir, "client-ca.pem"))
	srv := servertest.Start(t, cfg)
	caFile := ca.WriteCert(t, filepath.Join(dir, "ca.pem"))
	cert, key := clientCA.Issue(t, dir, "operator", testutil.CertSpec{Names: []string{"operator"}, Client: true})
	if code, out, errs := run("--server", srv.Addr(), "--ca-cert", caFile, "--client-cert", cert, "--client-key", key, "services"); code != 0 {
		t.Errorf("services over mTLS = %d %q %q", code, out, errs)
	}
	t.Setenv("BEACON_CACERT", caFile)
	t.Setenv("BEACON_CLIENT_CERT", cert)
	t.Setenv("BEACON_CLIENT_KEY", key)
	if code, out, errs := run("--server", srv.Addr(), "services"); code != 0 {
		t.Errorf("services with the BEACON_* variables = %d %q %q", code, out, errs)
	}
	if code, _, _ := run("--server", srv.Addr(), "--client-cert", "", "--client-key", "", "services"); code == 0 {
		t.Error("services without a client certificate: got through")
	}
}

package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/servertest"
)

// Binaries built for this test run: beacon, the echo service and the
// pinned grpc-health-probe.
var beaconBin, echoBin, probeBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "beacon-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	beaconBin = filepath.Join(dir, "beacon")
	echoBin = filepath.Join(dir, "echo")
	probeBin = filepath.Join(dir, "grpc-health-probe")
	for _, b := range []struct{ dir, out, pkg string }{
		{"", beaconBin, "beacon.dev/beacon/cmd/beacon"},
		{"", echoBin, "beacon.dev/beacon/internal/cmd/echo"},
		// Its own module (tools/healthprobe) pins the version.
		{"../tools/healthprobe", probeBin, "github.com/grpc-ecosystem/grpc-health-probe"},
	} {
		build := exec.Command("go", "build", "-o", b.out, b.pkg)
		build.Dir = b.dir
		if b.dir != "" {
			// A module of its own, outside the workspace (go.work).
			build.Env = append(os.Environ(), "GOWORK=off")
		}
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "building", b.pkg+":", err)
			os.Exit(1)
		}
	}
	code := m.Run()
	if code == 0 {
		// goleak.VerifyTestMain would exit before the binary is removed.
		if err := goleak.Find(testutil.LeakOptions()...); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.RemoveAll(dir)
	os.Exit(code)
}

// proc is a child process whose output is collected line by line.
type proc struct {
	t    *testing.T
	cmd  *exec.Cmd
	mu   sync.Mutex
	out  []string // guarded by mu
	line chan struct{}
	done chan struct{}
}

func start(t *testing.T, args ...string) *proc {
	t.Helper()
	return startBin(t, beaconBin, args...)
}

// startBin starts a built binary; it is killed when the test ends.
func startBin(t *testing.T, bin string, args ...string) *proc {
	t.Helper()
	p := &proc{t: t, cmd: exec.Command(bin, args...), line: make(chan struct{}, 1), done: make(chan struct{})}
	dieWithTest(p.cmd)
	pr, pw := io.Pipe()
	p.cmd.Stdout, p.cmd.Stderr = pw, pw
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("starting %s %v: %v", bin, args, err)
	}
	// done closes once the process has exited and every line it printed
	// is in out: only then may waitLine conclude a line will never come.
	// (Closed when Wait returns, the scanner could still hold the last
	// lines.)
	go func() {
		sc := bufio.NewScanner(pr)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			p.mu.Lock()
			p.out = append(p.out, sc.Text())
			p.mu.Unlock()
			select {
			case p.line <- struct{}{}:
			default:
			}
		}
		io.Copy(io.Discard, pr) // a line too long: keep the writer unblocked
		close(p.done)
	}()
	go func() {
		p.cmd.Wait()
		pw.Close() // after Wait: the process's output has all been written
	}()
	t.Cleanup(func() {
		p.signal(syscall.SIGCONT)
		p.signal(syscall.SIGKILL)
		<-p.done
		if t.Failed() {
			t.Logf("output of %s %v:\n%s", filepath.Base(bin), args, p.output())
		}
	})
	return p
}

func (p *proc) signal(sig syscall.Signal) {
	select {
	case <-p.done:
	default:
		_ = p.cmd.Process.Signal(sig)
	}
}

func (p *proc) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.out, "\n")
}

// waitLine waits for an output line containing s.
func (p *proc) waitLine(timeout time.Duration, s string) string {
	p.t.Helper()
	deadline := time.After(timeout)
	for {
		p.mu.Lock()
		for _, l := range p.out {
			if strings.Contains(l, s) {
				p.mu.Unlock()
				return l
			}
		}
		p.mu.Unlock()
		select {
		case <-p.line:
		case <-p.done:
			p.t.Fatalf("process exited without printing %q; output:\n%s", s, p.output())
		case <-deadline:
			p.t.Fatalf("no line with %q after %s; output:\n%s", s, timeout, p.output())
		}
	}
}

func (p *proc) wait(timeout time.Duration) int {
	p.t.Helper()
	select {
	case <-p.done:
		return p.cmd.ProcessState.ExitCode()
	case <-time.After(timeout):
		p.t.Fatalf("process still running after %s; output:\n%s", timeout, p.output())
		return -1
	}
}

// serverProc runs `beacon server` with its own data dir and ports.
type serverProc struct {
	t       *testing.T
	addr    string
	args    []string
	current *proc
}

func newServerProc(t *testing.T, extra ...string) *serverProc {
	cfg := servertest.Config(t, "")
	s := &serverProc{t: t, addr: cfg.Addr}
	s.args = append([]string{"server", "--addr", cfg.Addr, "--data-dir", cfg.DataDir,
		"--etcd-peer-addr", cfg.EtcdPeerAddr, "--log-level", "warn", "--console-addr", "off"}, extra...)
	s.start()
	return s
}

func (s *serverProc) start() {
	s.t.Helper()
	s.current = start(s.t, s.args...)
	s.current.waitLine(60*time.Second, "beacon server ready")
}

func (s *serverProc) stop(sig syscall.Signal) {
	s.t.Helper()
	s.current.signal(sig)
	s.current.wait(30 * time.Second)
}

func newClient(t *testing.T, addrs ...string) *client.Client {
	t.Helper()
	c, err := client.New(addrs, client.WithOrderedServers()) // tests say which server comes first
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func watch(ctx context.Context, t *testing.T, c *client.Client, services ...string) *client.Watcher {
	t.Helper()
	w, err := c.Watch(ctx, services)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Close)
	select {
	case <-w.Synced():
	case <-ctx.Done():
		t.Fatalf("watch never synced: %v", w.Status())
	}
	return w
}

// waitInstances waits until the watcher holds exactly ids for service and
// returns when that happened.
func waitInstances(ctx context.Context, t *testing.T, w *client.Watcher, service string, ids ...string) (time.Time, *registry.Snapshot) {
	t.Helper()
	for {
		if s, ok := w.Snapshot(service); ok && sameIDs(s, ids) || !ok && len(ids) == 0 {
			return time.Now(), s
		}
		if _, err := w.Next(ctx); err != nil {
			s, _ := w.Snapshot(service)
			t.Fatalf("waiting for %s = %v: %v; last snapshot %+v", service, ids, err, s)
		}
	}
}

func sameIDs(s *registry.Snapshot, ids []string) bool {
	if len(s.Instances) != len(ids) {
		return false
	}
	for i, in := range s.Instances {
		if in.ID != ids[i] {
			return false
		}
	}
	return true
}

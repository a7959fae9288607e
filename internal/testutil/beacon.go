package testutil

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"
)

var built struct {
	once sync.Once
	path string
	err  error
}

// BeaconBinary returns the path of the `beacon` binary the tests run:
// $BEACON_BIN when set (the test command builds it once), otherwise one
// built from this checkout into the user's cache directory. The build is
// incremental and locked, so test processes running side by side share it.
func BeaconBinary(t testing.TB) string {
	t.Helper()
	built.once.Do(func() { built.path, built.err = beaconBinary() })
	if built.err != nil {
		t.Fatalf("the beacon binary: %v", built.err)
	}
	return built.path
}

func beaconBinary() (string, error) {
	if bin := os.Getenv("BEACON_BIN"); bin != "" {
		return bin, nil
	}
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", fmt.Errorf("no source path to build from; set BEACON_BIN")
	}
	root := filepath.Join(filepath.Dir(file), "..", "..")
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = os.TempDir()
	}
	dir := filepath.Join(cache, "beacon-test")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	lock, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "beacon")
	build := exec.Command("go", "build", "-o", bin, ".")
	build.Dir = filepath.Join(root, "cmd", "beacon")
	if out, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/beacon: %v\n%s", err, out)
	}
	return bin, nil
}

// DataDir returns a fresh data directory for a beacon server, removed when
// the test ends: t.TempDir(), or a shorter one under /tmp when that path
// leaves no room for the embedded etcd's socket in it (etcd.sock: a unix
// socket's path holds 107 bytes on Linux, 103 on macOS, and a long test
// name or $TMPDIR can take them).
func DataDir(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	if len(dir)+len("/etcd.sock") < len(syscall.RawSockaddrUnix{}.Path) {
		return dir
	}
	dir, err := os.MkdirTemp("/tmp", "beacon-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// StartBeacon runs one `beacon server` process (embedded etcd, free
// loopback ports, extra flags appended) and waits until it serves. It is
// killed when the test ends.
func StartBeacon(t testing.TB, extra ...string) *Node {
	t.Helper()
	nd := NewCluster(t, BeaconBinary(t), 1, append([]string{"--etcd-unsafe-no-fsync", "--shutdown-timeout", "2s"}, extra...)...)[0]
	StartAll(t, []*Node{nd})
	return nd
}

// Addr is the node's API address (host:port).
func (nd *Node) Addr() string { return nd.API }

// Close stops the node as an operator would (SIGTERM) and waits for it to
// exit, killing it if it has not within 30 s.
func (nd *Node) Close() {
	exited := nd.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(30 * time.Second):
		nd.Kill()
	}
}

// ExampleServer runs a `beacon server` process for a runnable example
// (which has no testing.T) and returns its API address and a stop function.
// It panics if the server does not start: an example cannot go on without.
func ExampleServer() (addr string, stop func()) {
	t := &exampleT{}
	defer func() {
		if r := recover(); r != nil {
			t.cleanup()
			panic(r)
		}
	}()
	nd := StartBeacon(t)
	return nd.Addr(), t.cleanup
}

// exampleT is the part of testing.TB that StartBeacon uses, for examples.
type exampleT struct {
	testing.TB
	mu       sync.Mutex
	cleanups []func()
	dirs     []string
}

func (e *exampleT) Helper() {}

func (e *exampleT) Fatal(args ...any) { panic(fmt.Sprint(args...)) }

func (e *exampleT) Fatalf(format string, args ...any) { panic(fmt.Sprintf(format, args...)) }

func (e *exampleT) TempDir() string {
	dir, err := os.MkdirTemp("", "beacon-example-")
	if err != nil {
		panic(err)
	}
	e.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func (e *exampleT) Cleanup(f func()) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.cleanups = append(e.cleanups, f)
}

func (e *exampleT) cleanup() {
	e.mu.Lock()
	fs := e.cleanups
	e.cleanups = nil
	e.mu.Unlock()
	for i := len(fs) - 1; i >= 0; i-- {
		fs[i]()
	}
}

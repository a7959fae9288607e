// Package testutil starts real beacon servers, etcd and processes for tests,
// all on 127.0.0.1, and cleans them up when the test ends.
package testutil

import (
	"context"
	"fmt"
	"net"
	"testing"
	"time"

	"go.uber.org/goleak"

	"beacon.dev/beacon/server"
)

// LeakOptions are the goleak options every test package uses: the one
// place to name a goroutine a dependency leaves running by design. None
// needs ignoring today.
func LeakOptions() []goleak.Option { return nil }

// FreeAddr returns a loopback address with a port nobody listens on now.
func FreeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("FreeAddr: %v", err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// ServerConfig returns a config for a test server: embedded etcd in dir (a
// fresh temp dir when empty), free loopback ports, no fsync.
func ServerConfig(t testing.TB, dir string) *server.Config {
	t.Helper()
	cfg := server.NewConfig()
	if dir == "" {
		dir = t.TempDir()
	}
	cfg.DataDir = dir
	cfg.Addr = FreeAddr(t)
	cfg.EtcdClientAddr = FreeAddr(t)
	cfg.EtcdPeerAddr = FreeAddr(t)
	cfg.EtcdUnsafeNoFsync = true
	cfg.ShutdownTimeout = 2 * time.Second
	return cfg
}

// StartServer starts a server from cfg, waits until it is ready and closes
// it when the test ends.
func StartServer(t testing.TB, cfg *server.Config) *server.Server {
	t.Helper()
	s, err := StartServerErr(cfg)
	if err != nil {
		t.Fatalf("StartServer: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// StartServerErr starts a server and waits for it to be ready; the caller
// closes it.
func StartServerErr(cfg *server.Config) (*server.Server, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	s, err := server.Start(ctx, cfg)
	if err != nil {
		return nil, err
	}
	select {
	case <-s.Ready():
		return s, nil
	case err := <-s.Err():
		s.Close()
		return nil, err
	case <-ctx.Done():
		s.Close()
		return nil, fmt.Errorf("server not ready: %w", ctx.Err())
	}
}

// Eventually polls cond every 10ms until it holds or timeout passes.
func Eventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		<-tick.C
	}
}

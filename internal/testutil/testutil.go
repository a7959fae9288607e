// Package testutil starts real beacon servers, etcd and processes for tests,
// all on 127.0.0.1, and cleans them up when the test ends.
package testutil

import (
	"context"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"beacon.dev/beacon/server"
)

// LeakOptions are the goleak options every test package uses: the one
// place to name a goroutine a dependency leaves running by design. None
// needs ignoring today.
func LeakOptions() []goleak.Option { return nil }

// handedOut remembers the ports FreeAddr gave this process: the kernel
// may offer a port again as soon as its probe listener closes, and two
// servers of one test must not be given the same one.
var handedOut struct {
	sync.Mutex
	ports map[string]bool
}

// FreeAddr returns a loopback address with a port nobody listens on now,
// never the same twice in one test process.
func FreeAddr(t testing.TB) string {
	t.Helper()
	handedOut.Lock()
	defer handedOut.Unlock()
	if handedOut.ports == nil {
		handedOut.ports = map[string]bool{}
	}
	for range 100 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("FreeAddr: %v", err)
		}
		addr := ln.Addr().String()
		ln.Close()
		if !handedOut.ports[addr] {
			handedOut.ports[addr] = true
			return addr
		}
	}
	t.Fatal("FreeAddr: no fresh port in 100 tries")
	return ""
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

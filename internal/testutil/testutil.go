// Package testutil starts real beacon server processes, etcd and proxies
// for tests, all on 127.0.0.1, and cleans them up when the test ends. It
// imports no server code: the SDK's tests run the `beacon` binary as a
// child process (in-process servers are package server/servertest's).
package testutil

import (
	"net"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
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

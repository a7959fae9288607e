// Package blackhole gives tests a TCP address that drops SYNs, as a host
// behind a firewall that drops packets does, and counts a process's open
// descriptors. It imports nothing of beacon, so any package's tests can use
// it (internal/testutil imports the server).
package blackhole

import (
	"errors"
	"net"
	"os"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// Listener returns the address of a listener on 127.0.0.1 that
// never accepts and whose accept queue is full, so that the kernel drops
// the SYNs of new connections: a dial hangs until its own timeout (the
// kernel's SYN retries last about two minutes). It skips the test where
// the kernel does not behave so.
func Listener(t testing.TB) string {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(sa.(*syscall.SockaddrInet4).Port))
	for range 16 { // fill the accept queue
		conn, err := net.DialTimeout("tcp", addr, 300*time.Millisecond)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return addr // a SYN was dropped
		}
		if err != nil {
			t.Fatalf("filling the accept queue of %s: %v", addr, err)
		}
		t.Cleanup(func() { conn.Close() })
	}
	t.Skipf("dials to %s with a full accept queue still connect: SYNs are not dropped here", addr)
	return ""
}

// OpenFDs counts the process's open file descriptors.
func OpenFDs(t testing.TB) int {
	t.Helper()
	return ProcessFDs(t, "self")
}

// ProcessFDs counts the open file descriptors of the process pid ("self"
// or a number).
func ProcessFDs(t testing.TB, pid string) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/" + pid + "/fd")
	if err != nil {
		t.Skipf("counting file descriptors: %v", err)
	}
	return len(ents)
}

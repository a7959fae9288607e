package server

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// lockFile is the file in the data directory a running server holds an
// exclusive lock on.
const lockFile = "beacon.lock"

// lockDataDir takes the data directory for this process, creating it if
// needed, or says at once which process holds it. The lock is an flock:
// the kernel releases it when the process dies, so a crashed server never
// leaves a stale lock behind.
//
// The directory is made 0700 (only this user may enter it), as it holds
// the embedded etcd's client socket: a process that connects to it
// writes the registry past the server.
func lockDataDir(dir string) (unlock func(), err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("server: creating --data-dir %s: %w", dir, err)
	}
	if fi, err := os.Stat(dir); err != nil {
		return nil, fmt.Errorf("server: --data-dir %s: %w", dir, err)
	} else if fi.Mode().Perm()&0o077 != 0 {
		if err := os.Chmod(dir, fi.Mode().Perm()&^0o077); err != nil {
			return nil, fmt.Errorf("server: --data-dir %s is open to other users (%v) and could not be restricted to its owner: %w", dir, fi.Mode().Perm(), err)
		}
	}
	path := filepath.Join(dir, lockFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("server: opening the lock of --data-dir %s: %w", dir, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		holder, _ := os.ReadFile(path)
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			who := "another process"
			if pid, err := strconv.Atoi(strings.TrimSpace(string(holder))); err == nil {
				who = fmt.Sprintf("another process (pid %d)", pid)
			}
			return nil, fmt.Errorf("server: --data-dir %s is in use by %s; each server needs its own data directory", dir, who)
		}
		return nil, fmt.Errorf("server: locking --data-dir %s: %w", dir, err)
	}
	_ = f.Truncate(0)
	_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return func() {
		_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
	}, nil
}

//go:build linux || darwin || freebsd || netbsd || openbsd

package proxy

import "syscall"

// peekFunc returns a RawConn.Read callback that peeks at a socket without
// blocking or consuming, setting *quiet when there is nothing to read
// (EAGAIN): no data, no end of stream, no error.
func peekFunc(quiet *bool) func(fd uintptr) bool {
	var b [1]byte
	return func(fd uintptr) bool {
		_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		*quiet = err == syscall.EAGAIN
		return true
	}
}

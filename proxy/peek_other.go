//go:build !(linux || darwin || freebsd || netbsd || openbsd)

package proxy

// peekFunc: no non-blocking peek here; pooled connections are reused
// unchecked, and a closed one is found when the request is sent.
func peekFunc(*bool) func(fd uintptr) bool { return nil }

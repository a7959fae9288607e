package server

import (
	"fmt"
	"math"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"beacon.dev/beacon/registry"
)

// Limits bound what clients can make a server hold or do: connections,
// request sizes, watch streams, waits, sessions, services and the rate of
// writes. Every limit has a default (DefaultLimits) and a flag; a client
// that reaches one gets an error naming the flag (gRPC resource_exhausted,
// HTTP 429 with Retry-After, or 413 for a body), and nobody else notices.
// docs/operations.md lists them with what the server does at each.
type Limits struct {
	// MaxConns bounds the open client connections (0: half of the
	// process's file descriptor limit, at most 16384), so that clients can
	// never take the descriptors etcd and the health checks need.
	MaxConns int
	// MaxConnsPerIP bounds the open connections from one client address.
	MaxConnsPerIP int
	// MaxStreamsPerConn bounds the concurrent HTTP/2 streams (calls) of
	// one connection.
	MaxStreamsPerConn int
	// ReadHeaderTimeout bounds how long a client may take to send a
	// request's headers; IdleTimeout closes a connection with no call in
	// flight; WriteTimeout bounds every single write of a response or a
	// watch message: a client that does not read for that long loses the
	// call (a watcher reconnects and resumes).
	ReadHeaderTimeout, IdleTimeout, WriteTimeout time.Duration
	// MaxRequestBytes bounds one request message, compressed or not.
	MaxRequestBytes int
	// MaxWatchers bounds the open watch streams of the server, and
	// MaxWatchersPerConn those of one connection.
	MaxWatchers, MaxWatchersPerConn int
	// MaxWatchServices bounds the services one watch names (and the
	// revisions it says it knows).
	MaxWatchServices int
	// MaxAwaits bounds the AwaitWatchers calls waiting at once on the
	// server, and MaxAwaitsPerConn those of one connection.
	MaxAwaits, MaxAwaitsPerConn int
	// MaxSessions bounds the live sessions (counted from the server's view).
	MaxSessions int
	// MaxServices bounds the services of one namespace, and
	// MaxInstancesPerService the instances of one service; both are
	// counted from the server's view, so a burst may pass them by the
	// writes in flight.
	MaxServices, MaxInstancesPerService int
	// MaxRegisterBatch bounds the instances of one RegisterBatch call. A
	// batch spends a write token per instance, so the bound in force is
	// also at most each write burst (registerBatchMax).
	MaxRegisterBatch int
	// MaxKVValueBytes bounds one KV value (and the values of one KV
	// transaction together), MaxKVKeys the keys of one namespace (counted
	// from the server's replica) and MaxKVTxnOps the operations of one KV
	// transaction.
	MaxKVValueBytes, MaxKVKeys, MaxKVTxnOps int
	// MaxLockWaits bounds the lock Acquire calls waiting at once on the
	// server, and MaxLockWait how long one call may wait (a client that
	// waits longer calls again, keeping its place in the queue).
	MaxLockWaits int
	MaxLockWait  time.Duration
	// MaxSDTargets bounds the targets of one Prometheus service discovery
	// answer (GET /v1/sd/prometheus); a query that matches more is
	// refused, not cut, and is split with service= or tag=.
	MaxSDTargets int
	// WriteRate and WriteBurst bound the writes (registrations, sessions,
	// status, checks, deregistrations) of one connection: a token bucket
	// of WriteBurst tokens refilled at WriteRate per second.
	WriteRate  float64
	WriteBurst int
	// WriteRatePerIP and WriteBurstPerIP bound the writes of all the
	// connections of one client address together, so that more
	// connections do not buy more writes.
	WriteRatePerIP  float64
	WriteBurstPerIP int
	// ReadBodyTimeout bounds reading a unary request's body, so that a
	// client trickling bodies cannot hold the server's memory.
	ReadBodyTimeout time.Duration
	// With ACLs, per token (all calls without a token share the anonymous
	// token's): its live sessions, its open watch streams on this server,
	// and its writes per second on this server (a token bucket of
	// WriteBurstPerToken). They keep one leaked or abused credential from
	// spending the server-wide limits of everyone else.
	MaxSessionsPerToken, MaxWatchersPerToken int
	WriteRatePerToken                        float64
	WriteBurstPerToken                       int
}

// DefaultLimits are generous for one team's fleet and tight enough that
// one client cannot exhaust the server.
var DefaultLimits = Limits{
	MaxConnsPerIP:          4096,
	MaxStreamsPerConn:      250,
	ReadHeaderTimeout:      10 * time.Second,
	IdleTimeout:            2 * time.Minute,
	WriteTimeout:           30 * time.Second,
	MaxRequestBytes:        1 << 20,
	MaxWatchers:            10000,
	MaxWatchersPerConn:     128, // under MaxStreamsPerConn, so that it can be reached
	MaxWatchServices:       10000,
	MaxAwaits:              1024,
	MaxAwaitsPerConn:       64,
	MaxSessions:            100000,
	MaxServices:            10000,
	MaxInstancesPerService: 10000,
	MaxRegisterBatch:       1000,
	MaxKVValueBytes:        512 << 10,
	MaxKVKeys:              10000,
	MaxKVTxnOps:            32,
	MaxLockWaits:           1024,
	MaxLockWait:            time.Minute,
	MaxSDTargets:           10000,
	WriteRate:              1000,
	WriteBurst:             2000,
	WriteRatePerIP:         5000,
	WriteBurstPerIP:        10000,
	ReadBodyTimeout:        30 * time.Second,
	MaxSessionsPerToken:    10000,
	MaxWatchersPerToken:    1000,
	WriteRatePerToken:      1000,
	WriteBurstPerToken:     2000,
}

// maxConnsCap bounds the automatic connection limit.
const maxConnsCap = 16384

// registerBatchMax is the most instances one RegisterBatch may carry:
// --max-register-batch, but never more than a write burst, which a full
// batch could otherwise never pass.
func (l *Limits) registerBatchMax() int {
	return min(l.MaxRegisterBatch, l.WriteBurst, l.WriteBurstPerIP, l.WriteBurstPerToken)
}

// effectiveMaxConns resolves MaxConns = 0 from the descriptor limit.
func (l *Limits) effectiveMaxConns() int {
	if l.MaxConns > 0 {
		return l.MaxConns
	}
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil || rl.Cur == math.MaxUint64 {
		return maxConnsCap
	}
	return int(min(max(rl.Cur/2, 16), maxConnsCap))
}

func (l *Limits) validate() error {
	ints := []struct {
		flag     string
		v, lo, h int
	}{
		{"--max-conns", l.MaxConns, 0, 1 << 20},
		{"--max-conns-per-ip", l.MaxConnsPerIP, 1, 1 << 20},
		{"--max-streams-per-conn", l.MaxStreamsPerConn, 1, 1 << 16},
		{"--max-request-bytes", l.MaxRequestBytes, 4 << 10, 64 << 20},
		{"--max-watchers", l.MaxWatchers, 1, 1 << 20},
		{"--max-watchers-per-conn", l.MaxWatchersPerConn, 1, 1 << 20},
		{"--max-watch-services", l.MaxWatchServices, 1, 1 << 20},
		{"--max-awaits", l.MaxAwaits, 1, 1 << 20},
		{"--max-awaits-per-conn", l.MaxAwaitsPerConn, 1, 1 << 20},
		{"--max-sessions", l.MaxSessions, 1, 1 << 24},
		{"--max-services", l.MaxServices, 1, 1 << 24},
		{"--max-instances-per-service", l.MaxInstancesPerService, 1, 1 << 24},
		{"--max-register-batch", l.MaxRegisterBatch, 1, 1 << 16},
		{"--max-kv-value-bytes", l.MaxKVValueBytes, 1, registry.MaxValueBytes},
		{"--max-kv-keys", l.MaxKVKeys, 1, 1 << 22},
		// etcd allows 128 operations in a transaction; each KV operation
		// may take three (value, history record, history trim).
		{"--max-kv-txn-ops", l.MaxKVTxnOps, 1, 40},
		{"--max-lock-waits", l.MaxLockWaits, 1, 1 << 20},
		{"--max-sd-targets", l.MaxSDTargets, 1, 1 << 24},
		{"--write-burst", l.WriteBurst, 1, 1 << 24},
		{"--write-burst-per-ip", l.WriteBurstPerIP, 1, 1 << 24},
		{"--max-sessions-per-token", l.MaxSessionsPerToken, 1, 1 << 24},
		{"--max-watchers-per-token", l.MaxWatchersPerToken, 1, 1 << 20},
		{"--write-burst-per-token", l.WriteBurstPerToken, 1, 1 << 24},
	}
	for _, c := range ints {
		if c.v < c.lo || c.v > c.h {
			return fmt.Errorf("server: invalid %s %d: must be between %d and %d", c.flag, c.v, c.lo, c.h)
		}
	}
	durs := []struct {
		flag string
		v    time.Duration
	}{
		{"--read-header-timeout", l.ReadHeaderTimeout},
		{"--idle-timeout", l.IdleTimeout},
		{"--write-timeout", l.WriteTimeout},
		{"--read-body-timeout", l.ReadBodyTimeout},
		{"--max-lock-wait", l.MaxLockWait},
	}
	for _, c := range durs {
		if c.v < 100*time.Millisecond || c.v > time.Hour {
			return fmt.Errorf("server: invalid %s %s: must be between 100ms and 1h", c.flag, c.v)
		}
	}
	for _, r := range []struct {
		flag string
		v    float64
	}{{"--write-rate", l.WriteRate}, {"--write-rate-per-ip", l.WriteRatePerIP}, {"--write-rate-per-token", l.WriteRatePerToken}} {
		if math.IsNaN(r.v) || r.v < 1 || r.v > 1e7 {
			return fmt.Errorf("server: invalid %s %v: must be between 1 and 10000000 per second", r.flag, r.v)
		}
	}
	return nil
}

func (l *Limits) bindFlags(fs *pflag.FlagSet) {
	fs.IntVar(&l.MaxConns, "max-conns", l.MaxConns, "open client connections at most (0: half the file descriptor limit, at most 16384)")
	fs.IntVar(&l.MaxConnsPerIP, "max-conns-per-ip", l.MaxConnsPerIP, "open connections from one client address at most")
	fs.IntVar(&l.MaxStreamsPerConn, "max-streams-per-conn", l.MaxStreamsPerConn, "concurrent HTTP/2 streams (calls) of one connection at most")
	fs.DurationVar(&l.ReadHeaderTimeout, "read-header-timeout", l.ReadHeaderTimeout, "how long a client may take to send a request's headers")
	fs.DurationVar(&l.IdleTimeout, "idle-timeout", l.IdleTimeout, "close a client connection with no call in flight after this long")
	fs.DurationVar(&l.WriteTimeout, "write-timeout", l.WriteTimeout, "cut a call (or a watch) whose client does not read one response or watch message for this long")
	fs.IntVar(&l.MaxRequestBytes, "max-request-bytes", l.MaxRequestBytes, "one request message at most, in bytes (after decompression)")
	fs.IntVar(&l.MaxWatchers, "max-watchers", l.MaxWatchers, "open watch streams of the server at most")
	fs.IntVar(&l.MaxWatchersPerConn, "max-watchers-per-conn", l.MaxWatchersPerConn, "open watch streams of one connection at most")
	fs.IntVar(&l.MaxWatchServices, "max-watch-services", l.MaxWatchServices, "services one watch may name at most")
	fs.IntVar(&l.MaxAwaits, "max-awaits", l.MaxAwaits, "AwaitWatchers calls waiting at once on the server at most")
	fs.IntVar(&l.MaxAwaitsPerConn, "max-awaits-per-conn", l.MaxAwaitsPerConn, "AwaitWatchers calls waiting at once per connection at most")
	fs.IntVar(&l.MaxSessions, "max-sessions", l.MaxSessions, "live sessions at most")
	fs.IntVar(&l.MaxServices, "max-services", l.MaxServices, "services of one namespace at most")
	fs.IntVar(&l.MaxInstancesPerService, "max-instances-per-service", l.MaxInstancesPerService, "instances of one service at most")
	fs.IntVar(&l.MaxRegisterBatch, "max-register-batch", l.MaxRegisterBatch, "instances of one RegisterBatch call at most (each spends a write token, so never more than the --write-burst* flags)")
	fs.IntVar(&l.MaxKVValueBytes, "max-kv-value-bytes", l.MaxKVValueBytes, "one KV value at most, in bytes (also the values of one KV transaction together; at most 524288)")
	fs.IntVar(&l.MaxKVKeys, "max-kv-keys", l.MaxKVKeys, "KV keys of one namespace at most")
	fs.IntVar(&l.MaxKVTxnOps, "max-kv-txn-ops", l.MaxKVTxnOps, "operations of one KV transaction at most (at most 40)")
	fs.IntVar(&l.MaxLockWaits, "max-lock-waits", l.MaxLockWaits, "lock Acquire calls waiting at once on the server at most")
	fs.DurationVar(&l.MaxLockWait, "max-lock-wait", l.MaxLockWait, "how long one lock Acquire call may wait (the SDK calls again, keeping its place)")
	fs.IntVar(&l.MaxSDTargets, "max-sd-targets", l.MaxSDTargets, "targets of one Prometheus service discovery answer (/v1/sd/prometheus) at most")
	fs.Float64Var(&l.WriteRate, "write-rate", l.WriteRate, "writes per second of one connection (registrations, sessions, status, checks)")
	fs.IntVar(&l.WriteBurst, "write-burst", l.WriteBurst, "writes one connection may make at once above --write-rate")
	fs.Float64Var(&l.WriteRatePerIP, "write-rate-per-ip", l.WriteRatePerIP, "writes per second of all the connections of one client address")
	fs.IntVar(&l.WriteBurstPerIP, "write-burst-per-ip", l.WriteBurstPerIP, "writes one client address may make at once above --write-rate-per-ip")
	fs.IntVar(&l.MaxSessionsPerToken, "max-sessions-per-token", l.MaxSessionsPerToken, "with --acl: live sessions one token may have made at most")
	fs.IntVar(&l.MaxWatchersPerToken, "max-watchers-per-token", l.MaxWatchersPerToken, "with --acl: open watch streams of one token on this server at most")
	fs.Float64Var(&l.WriteRatePerToken, "write-rate-per-token", l.WriteRatePerToken, "with --acl: writes per second of one token on this server (its sessions' credentials included)")
	fs.IntVar(&l.WriteBurstPerToken, "write-burst-per-token", l.WriteBurstPerToken, "with --acl: writes one token may make at once above --write-rate-per-token")
	fs.DurationVar(&l.ReadBodyTimeout, "read-body-timeout", l.ReadBodyTimeout, "how long a client may take to send a unary request's body")
}

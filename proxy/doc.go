// Package proxy is `beacon proxy`: an HTTP (HTTP/1.1, HTTP/2 over TLS,
// h2c) and TCP proxy whose upstreams are beacon services, for programs
// that cannot embed the Go SDK. Every request goes through the SDK's data
// plane (beaconhttp.Transport: P2C, outlier ejection, zone-aware routing,
// budgeted retries of idempotent requests, per-try timeouts, circuit
// breaking; policy.Hedger for hedging), so a Python or Java service gets
// what a Go service gets.
//
// One file configures it (Config, LoadConfig); routes are hot-reloaded
// (Proxy.Reload) without dropping connections or in-flight requests. In
// sidecar mode (Config.Sidecar) it also registers the local service it
// fronts and drains it on SIGTERM through lifecycle.Run.
//
// Proxy is safe for concurrent use. docs/proxy.md is the user's guide.
package proxy

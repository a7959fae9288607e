// Package audit writes and verifies beacon's audit log: one JSON object
// per line, each line carrying a sequence number and the SHA-256 of the
// line before it, so that an edited, removed, reordered or inserted line
// breaks the chain where it happened.
//
// A *Log appends events to a file, rotating it by size (path → path.1 →
// … → path.N) with the chain running on across files; it is safe for
// concurrent use. Verify and VerifyFiles check a log and say where it
// stops verifying; they share nothing and may run concurrently.
//
// The chain is a plain hash, not a keyed one: it proves that nothing was
// changed since a hash known to be good, not who wrote the lines. Someone
// who can write the file can rewrite every line after an edit, or cut the
// end off. Keep the last hash VerifyFiles reports (or ship the lines) off
// the host to catch that; docs/security.md says more.
package audit

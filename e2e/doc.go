// Package e2e holds end-to-end tests: the real beacon binary as server and
// CLI in child processes, stopped, frozen and killed with real signals, and
// SDK clients in the test process, everything on 127.0.0.1.
package e2e

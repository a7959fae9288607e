//go:build !linux

package e2e

import "os/exec"

// dieWithTest: only Linux has a parent-death signal; elsewhere the
// children are killed by the tests' cleanups alone.
func dieWithTest(*exec.Cmd) {}

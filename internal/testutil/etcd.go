package testutil

import (
	"os"
	"os/exec"
	"syscall"
	"testing"
)

// StartDebianEtcd runs the etcd binary from PATH (Debian's etcd-server,
// 3.4) on free loopback ports and returns its client URL. The test
// command installs it; elsewhere the test is skipped unless
// BEACON_REQUIRE_ETCD=1 makes its absence a failure.
func StartDebianEtcd(t testing.TB) string {
	t.Helper()
	bin, err := exec.LookPath("etcd")
	if err != nil {
		if os.Getenv("BEACON_REQUIRE_ETCD") == "1" {
			t.Fatalf("etcd not on PATH and BEACON_REQUIRE_ETCD=1: %v", err)
		}
		t.Skip("etcd not on PATH (install Debian's etcd-server)")
	}
	client, peer := "http://"+FreeAddr(t), "http://"+FreeAddr(t)
	cmd := exec.Command(bin, "--name", "t", "--data-dir", t.TempDir(),
		"--listen-client-urls", client, "--advertise-client-urls", client,
		"--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
		"--initial-cluster", "t="+peer, "--log-level", "error", "--logger", "zap")
	cmd.Env = append(os.Environ(), "ETCD_UNSUPPORTED_ARCH="+os.Getenv("GOARCH"))
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Signal(syscall.SIGKILL); cmd.Wait() })
	return client
}

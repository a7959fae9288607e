package e2e

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
)

// startDebianEtcd runs the etcd binary from PATH (Debian's etcd-server,
// 3.4) on free loopback ports. The test command installs it; elsewhere the
// test is skipped unless BEACON_REQUIRE_ETCD=1 makes its absence a failure.
func startDebianEtcd(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("etcd")
	if err != nil {
		if os.Getenv("BEACON_REQUIRE_ETCD") == "1" {
			t.Fatalf("etcd not on PATH and BEACON_REQUIRE_ETCD=1: %v", err)
		}
		t.Skip("etcd not on PATH (install Debian's etcd-server)")
	}
	client, peer := "http://"+testutil.FreeAddr(t), "http://"+testutil.FreeAddr(t)
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

// `beacon server --etcd-endpoints` against Debian's etcd 3.4: no embedded
// etcd, and the registry behaves the same.
func TestExternalEtcd34(t *testing.T) {
	endpoint := startDebianEtcd(t)
	addr := testutil.FreeAddr(t)
	args := []string{"server", "--addr", addr, "--etcd-endpoints", endpoint, "--log-level", "warn"}
	srv := &serverProc{t: t, addr: addr, args: args}
	srv.start()
	if line := srv.current.waitLine(time.Second, "ready"); !strings.Contains(line, "etcd at") {
		t.Errorf("server says %q, want it to name the external etcd", line)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c := newClient(t, addr)
	w := watch(ctx, t, c, "orders")
	if _, err := c.Register(ctx, registry.Instance{Service: "orders", ID: "persistent", Address: "127.0.0.1", Port: 1}); err != nil {
		t.Fatal(err)
	}
	p := registerProc(t, addr, "ephemeral")
	waitInstances(ctx, t, w, "orders", "ephemeral", "persistent")
	killAndExpectExpiry(ctx, t, p, w, "persistent")
	// Restart the server: everything lives in etcd.
	srv.stop(syscall.SIGTERM)
	srv.start()
	waitInstances(ctx, t, w, "orders", "persistent")
	snap, err := c.Instances(ctx, "orders")
	if err != nil || len(snap.Instances) != 1 {
		t.Fatalf("Instances after restart = %v, %v", snap, err)
	}
}

package server_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/server"
	"beacon.dev/beacon/server/servertest"
)

// freeRun returns a loopback address whose port + 1 and + 2 are free too.
func freeRun(t *testing.T) string {
	for range 50 {
		addr := testutil.FreeAddr(t)
		host, p, _ := net.SplitHostPort(addr)
		port, _ := strconv.Atoi(p)
		ok := port < 65533
		for i := 1; ok && i <= 2; i++ {
			ln, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(port+i)))
			if ok = err == nil; ok {
				ln.Close()
			}
		}
		if ok {
			return addr
		}
	}
	t.Fatal("no three free ports in a row")
	return ""
}

// By default the embedded etcd listens on no TCP port at all: its clients
// (the server first) connect through a socket in the data directory, which
// only the server's user may enter, and a single node has no peer port.
// The peer address still follows --addr (port + 2, clear of a local etcd's
// 2380), for cluster mode and the member's advertised URL.
func TestEmbeddedEtcdListensOnItsSocketOnly(t *testing.T) {
	cfg := servertest.Config(t, "")
	cfg.Addr = freeRun(t)
	cfg.EtcdPeerAddr = ""
	if err := os.Chmod(cfg.DataDir, 0o755); err != nil { // as a user's mkdir leaves it
		t.Fatal(err)
	}
	srv := servertest.Start(t, cfg)
	host, p, _ := net.SplitHostPort(cfg.Addr)
	port, _ := strconv.Atoi(p)
	if want := net.JoinHostPort(host, strconv.Itoa(port+2)); cfg.EtcdPeerAddr != want {
		t.Errorf("EtcdPeerAddr = %q, want %q", cfg.EtcdPeerAddr, want)
	}
	for i := 1; i <= 2; i++ {
		addr := net.JoinHostPort(host, strconv.Itoa(port+i))
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			t.Errorf("dial %s (--addr port + %d) succeeded, want refused: the embedded etcd should listen on no TCP port", addr, i)
		}
	}

	socket := filepath.Join(cfg.DataDir, server.EtcdSocketName)
	if got, err := server.EtcdSocket(cfg.DataDir); err != nil || got != socket {
		t.Errorf("EtcdSocket(%s) = %q, %v, want %q", cfg.DataDir, got, err, socket)
	}
	if got := srv.EtcdClient().Endpoints(); len(got) != 1 || got[0] != "unix://"+socket {
		t.Errorf("the server's etcd endpoints = %q, want [unix://%s]", got, socket)
	}
	for path, want := range map[string]os.FileMode{cfg.DataDir: os.ModeDir | 0o700, socket: os.ModeSocket | 0o600} {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if got := fi.Mode() & (os.ModeType | os.ModePerm); got != want {
			t.Errorf("mode of %s = %v, want %v", path, got, want)
		}
	}
	// etcdctl and `beacon operator`, run as the server's user, use the socket.
	cli := etcdClient(t, "unix://"+socket, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := cli.Put(ctx, "/socket-test", "x"); err != nil {
		t.Errorf("Put through the socket: %v", err)
	}

	if d := server.NewConfig(); d.EtcdClientAddr != "" || d.EtcdPeerAddr != "" || server.DefaultEtcdPeerAddr != "127.0.0.1:8972" {
		t.Errorf("defaults: client %q, peer %q, %s; want none, derived, 127.0.0.1:8972", d.EtcdClientAddr, d.EtcdPeerAddr, server.DefaultEtcdPeerAddr)
	}
	bad := server.NewConfig()
	bad.Addr = "127.0.0.1:65535"
	if err := bad.Validate(); err == nil || !strings.Contains(err.Error(), "--etcd-peer-addr") {
		t.Errorf("--addr port 65535 = %v, want an error naming --etcd-peer-addr", err)
	}
}

// A unix socket's path is short (107 bytes on Linux): a data directory
// too deep for its socket is refused by name before anything starts, and
// the test helpers pick a short one when the test's temp dir is too long.
func TestDataDirTooLongForTheSocket(t *testing.T) {
	cfg := servertest.Config(t, "")
	cfg.DataDir = filepath.Join(cfg.DataDir, strings.Repeat("d", 120))
	err := cfg.Validate()
	if err == nil || !strings.Contains(err.Error(), "--data-dir") || !strings.Contains(err.Error(), "shorter") {
		t.Fatalf("Validate with a %d-byte data dir = %v, want an error asking for a shorter --data-dir", len(cfg.DataDir), err)
	}
	if _, err := os.Stat(cfg.DataDir); err == nil {
		t.Errorf("the refused data dir %s was created", cfg.DataDir)
	}

	deep := &longNamedT{TB: t, dir: cfg.DataDir}
	dir := testutil.DataDir(deep)
	if _, err := server.EtcdSocket(dir); err != nil {
		t.Errorf("testutil.DataDir with a long temp dir = %s: %v, want one short enough", dir, err)
	}
}

// longNamedT stands for a test whose TempDir is too long for a socket.
type longNamedT struct {
	testing.TB
	dir string
}

func (l *longNamedT) TempDir() string { return l.dir }

// A port the embedded etcd cannot take is reported with its flag.
func TestEtcdPortClashNamesTheFlag(t *testing.T) {
	for _, flag := range []string{"--etcd-client-addr", "--etcd-peer-addr"} {
		taken, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		cfg := servertest.Config(t, "")
		if flag == "--etcd-client-addr" {
			cfg.EtcdClientAddr = taken.Addr().String()
		} else {
			// Only a member of a cluster listens for peers: a cluster of one.
			cfg.EtcdPeerAddr = taken.Addr().String()
			cfg.EtcdInitialCluster = cfg.Name + "=http://" + cfg.EtcdPeerAddr
			cfg.Insecure = true
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		s, err := server.Start(ctx, cfg)
		cancel()
		taken.Close()
		if err == nil {
			s.Close()
			t.Fatalf("%s on a taken port: started", flag)
		}
		if !strings.Contains(err.Error(), flag) || !strings.Contains(err.Error(), taken.Addr().String()) {
			t.Errorf("%s on a taken port: %v, want the flag and the address named", flag, err)
		}
	}
}

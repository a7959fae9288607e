package server_test

import (
	"context"
	"net"
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

// Unset, the embedded etcd's listeners follow --addr (port + 1, + 2),
// clear of a local etcd's 2379/2380, and Start reports them.
func TestEmbeddedEtcdPortsFollowTheAPIAddress(t *testing.T) {
	cfg := servertest.Config(t, "")
	cfg.Addr = freeRun(t)
	cfg.EtcdClientAddr, cfg.EtcdPeerAddr = "", ""
	servertest.Start(t, cfg)
	host, p, _ := net.SplitHostPort(cfg.Addr)
	port, _ := strconv.Atoi(p)
	if want := net.JoinHostPort(host, strconv.Itoa(port+1)); cfg.EtcdClientAddr != want {
		t.Errorf("EtcdClientAddr = %q, want %q", cfg.EtcdClientAddr, want)
	}
	if want := net.JoinHostPort(host, strconv.Itoa(port+2)); cfg.EtcdPeerAddr != want {
		t.Errorf("EtcdPeerAddr = %q, want %q", cfg.EtcdPeerAddr, want)
	}
	if d := server.NewConfig(); d.EtcdClientAddr != "" || server.DefaultEtcdClientAddr != "127.0.0.1:8971" || server.DefaultEtcdPeerAddr != "127.0.0.1:8972" {
		t.Errorf("defaults: %q, %s, %s", d.EtcdClientAddr, server.DefaultEtcdClientAddr, server.DefaultEtcdPeerAddr)
	}
	bad := server.NewConfig()
	bad.Addr = "127.0.0.1:65535"
	if err := bad.Validate(); err == nil || !strings.Contains(err.Error(), "--etcd-client-addr") {
		t.Errorf("--addr port 65535 = %v, want an error naming --etcd-client-addr", err)
	}
}

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
			cfg.EtcdPeerAddr = taken.Addr().String()
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

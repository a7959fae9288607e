package server_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server"
	"beacon.dev/beacon/server/servertest"
)

// Finding 11: a write-ahead log whose tail was cut is named for what it
// is (etcd itself only times out for as long as entries were lost); a torn
// last record, which etcd repairs, is not reported.
func TestCutWALIsDiagnosed(t *testing.T) {
	for _, tc := range []struct {
		name    string
		cut     int64 // bytes cut off the end of the log's records
		damaged bool
	}{
		{"torn last record", 10, false},
		{"tail cut", 5000, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := servertest.Config(t, "")
			srv := servertest.Start(t, cfg)
			c, err := client.New([]string{srv.Addr()})
			if err != nil {
				t.Fatal(err)
			}
			for i := range 200 {
				if _, err := c.Register(context.Background(), registry.Instance{Service: "orders", ID: fmt.Sprint("o-", i), Address: "127.0.0.1", Port: 1000 + i}); err != nil {
					t.Fatal(err)
				}
			}
			c.Close()
			srv.Close()

			etcdDir := filepath.Join(cfg.DataDir, "etcd")
			if err := server.CheckEtcdLog(etcdDir); err != nil {
				t.Fatalf("an intact data directory: %v", err)
			}
			wals, _ := filepath.Glob(filepath.Join(etcdDir, "member", "wal", "*.wal"))
			if len(wals) == 0 {
				t.Fatal("no WAL file")
			}
			last := wals[len(wals)-1]
			data, err := os.ReadFile(last)
			if err != nil {
				t.Fatal(err)
			}
			end := int64(len(data)) // the file is preallocated: its records end at the last non-zero byte
			for end > 0 && data[end-1] == 0 {
				end--
			}
			if err := os.Truncate(last, end-tc.cut); err != nil {
				t.Fatal(err)
			}
			err = server.CheckEtcdLog(etcdDir)
			switch {
			case !tc.damaged && err != nil:
				t.Errorf("a torn last record (etcd repairs it) was reported: %v", err)
			case tc.damaged && (err == nil || !strings.Contains(err.Error(), "write-ahead log") || !strings.Contains(err.Error(), "cut or lost")):
				t.Errorf("a cut log: %v, want an error naming the write-ahead log as cut or lost", err)
			}
			if !tc.damaged {
				// And etcd does repair it: the server starts.
				servertest.Start(t, servertest.Config(t, cfg.DataDir))
			}
		})
	}
}

package server

import (
	"fmt"
	"os"
	"path/filepath"

	"go.etcd.io/etcd/server/v3/etcdserver/api/snap"
	"go.etcd.io/etcd/server/v3/storage/backend"
	"go.etcd.io/etcd/server/v3/storage/schema"
	"go.etcd.io/etcd/server/v3/storage/wal"
	"go.etcd.io/etcd/server/v3/storage/wal/walpb"
	"go.uber.org/zap"
)

// checkEtcdLog diagnoses an embedded etcd data directory whose
// write-ahead log ends before the last entry its database has applied:
// the log's tail was cut or lost (a disk, a copy or a restore that dropped
// writes). etcd starts on such a directory and does not serve: every new
// entry gets an index its database counts as applied, so it is skipped —
// its own registration in the cluster too, which it retries once per
// request timeout — until as many entries as were lost have passed, and
// all it says is that a request timed out. One entry short is harmless
// (the new leader's empty entry takes it); a torn last record is not this
// either: etcd repairs that itself. Anything this check cannot read is
// left for etcd to report.
func checkEtcdLog(etcdDir string) error {
	walDir := filepath.Join(etcdDir, "member", "wal")
	snapDir := filepath.Join(etcdDir, "member", "snap")
	dbPath := filepath.Join(snapDir, "db")
	if !wal.Exist(walDir) {
		return nil
	}
	if _, err := os.Stat(dbPath); err != nil {
		return nil
	}
	lg := zap.NewNop()
	walSnaps, err := wal.ValidSnapshotEntries(lg, walDir)
	if err != nil {
		return nil
	}
	start := &walpb.Snapshot{}
	if s, err := snap.New(lg, snapDir).LoadNewestAvailable(walSnaps); err == nil {
		md := s.GetMetadata()
		idx, term := md.GetIndex(), md.GetTerm()
		start = &walpb.Snapshot{Index: &idx, Term: &term, ConfState: md.GetConfState()}
	}
	w, err := wal.OpenForRead(lg, walDir, start)
	if err != nil {
		return nil
	}
	_, _, ents, err := w.ReadAll()
	w.Close()
	if err != nil {
		return nil
	}
	last := start.GetIndex()
	if len(ents) > 0 {
		last = ents[len(ents)-1].GetIndex()
	}
	be := backend.NewDefaultBackend(lg, dbPath)
	applied, _ := schema.ReadConsistentIndex(be.ReadTx())
	be.Close()
	if applied > last+1 {
		return fmt.Errorf("etcd's write-ahead log in %s ends at entry %d, but its database has applied entry %d: "+
			"the log's tail was cut or lost, and etcd will not serve until it has retried its start about %d times, a request timeout each. "+
			"Restore %s from a backup or an etcd snapshot (etcdutl snapshot restore), or move it aside to start empty; see docs/operations.md",
			walDir, last, applied, applied-last-1, etcdDir)
	}
	return nil
}

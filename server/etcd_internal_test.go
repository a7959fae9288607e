package server

import (
	"testing"

	"go.etcd.io/etcd/server/v3/etcdserver"
)

func TestProgressNotifyOrderedVersions(t *testing.T) {
	for v, want := range map[string]bool{
		"3.4.23": false, "3.4.25": true, "3.5.7": false, "3.5.8": true, "3.6.0": true, "3.7.3": true, "4.0.0": true, "3.3.9": false, "bogus": false,
	} {
		if got := progressNotifyOrdered(v); got != want {
			t.Errorf("progressNotifyOrdered(%q) = %v, want %v", v, got, want)
		}
	}
}

// A single node keeps only the Raft entries it compacts to; a cluster
// member keeps etcd's default for followers that fall behind.
func TestEmbeddedEtcdKeepsCatchUpEntriesOnlyForFollowers(t *testing.T) {
	dir := t.TempDir()
	single := &Config{Name: "n0", DataDir: dir, EtcdPeerAddr: "127.0.0.1:2380"}
	if got := embeddedEtcdConfig(single, dir+"/etcd.sock").SnapshotCatchUpEntries; got != singleNodeRaftEntries {
		t.Errorf("single node: %d Raft entries kept, want %d", got, singleNodeRaftEntries)
	}
	member := &Config{Name: "n0", DataDir: dir, EtcdPeerAddr: "127.0.0.1:2380", Insecure: true,
		EtcdInitialCluster: "n0=http://127.0.0.1:2380,n1=http://127.0.0.1:2382,n2=http://127.0.0.1:2384"}
	if got := embeddedEtcdConfig(member, dir+"/etcd.sock").SnapshotCatchUpEntries; got != etcdserver.DefaultSnapshotCatchUpEntries {
		t.Errorf("cluster member: %d Raft entries kept, want etcd's default %d", got, etcdserver.DefaultSnapshotCatchUpEntries)
	}
}

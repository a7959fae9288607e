package server

// CheckEtcdLog lets the external tests cut a WAL and ask for the diagnosis.
var CheckEtcdLog = checkEtcdLog

// RaftEntriesKept is how many Raft entries the embedded etcd keeps in
// memory after compacting its log.
func RaftEntriesKept(s *Server) uint64 { return s.etcd.Server.Cfg.SnapshotCatchUpEntries }

// Package store is beacon's storage layer on etcd: the key layout, the
// encoding of instance and session records, and the writes the server makes
// (sessions as leases, instances bound to them). Reads for clients are served
// by package view from memory; store only lists for it.
//
// Key layout (under a prefix, "/beacon/v1/" by default), readable with etcdctl:
//
//	{prefix}ns/{namespace}/svc/{service}/inst/{id}  instance record (JSON)
//	{prefix}sessions/{session id, 16 hex digits}    session record (JSON)
//
// An ephemeral instance's key is attached to its session's lease, so etcd
// removes it when the session ends or expires. A persistent one has no lease.
//
// Store is safe for concurrent use.
package store

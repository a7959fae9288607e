// Package server is the embeddable beacon server: the registry API (gRPC,
// gRPC-Web and Connect/JSON on one port), the watch fan-out, health
// endpoints and Prometheus metrics, on an embedded single-node etcd or an
// external etcd cluster.
//
// It is shaped like etcd's embed package: NewConfig returns defaults,
// Config.Validate checks them, Start returns a *Server whose Ready channel
// closes once it serves, whose Err channel reports fatal errors, and whose
// Close stops everything. Server is safe for concurrent use.
package server

// Package dns answers DNS queries for the registry: A, AAAA and SRV
// records of a service's available instances under a domain (Consul's
// "consul." by default), with correct negative answers (RFC 2308), TC and
// TCP instead of silent truncation, and answers ordered for the querier's
// zone. docs/interop.md, "DNS", is the user's description; this package
// is the protocol, and package server wires it to the server's in-memory
// view, its ACLs and its metrics.
//
// A Handler answers one parsed query from a Source of snapshots and never
// does I/O; a Server binds one address for UDP and TCP, holds the
// listeners' limits and serves a Handler until Close. Both are safe for
// concurrent use.
//
// The package does not depend on package server: the server hands it a
// Source (its view) and an authorizer (its anonymous ACL policy).
package dns

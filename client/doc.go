// Package client is beacon's Go SDK for the registry: sessions with
// automatic keepalives and re-registration, ephemeral and persistent
// instances, listings, and watches that resume where they left off.
//
// A Client talks to one or more beacon servers and moves to the next when
// one is unreachable. Every blocking call takes a context first. Client,
// Session and Watcher are safe for concurrent use.
package client

// Package registry holds beacon's data model: instances, their declared
// status and observed health, per-service snapshots, and the validation
// rules every transport applies before anything is stored.
//
// Values in this package are plain data; an Instance or Snapshot may be read
// concurrently once no goroutine writes it. Snapshots handed out by the
// server and the SDK are never modified after publication.
package registry

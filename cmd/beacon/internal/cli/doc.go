// Package cli implements the beacon command line: the server and the
// registry commands built on the SDK.
package cli

// Package anchors benchmarks beacon's call path beside the libraries a
// user would otherwise pick (sony/gobreaker v2, failsafe-go) in the same
// run. It is a module of its own so that beacon does not depend on them.
package anchors

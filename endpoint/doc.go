// Package endpoint holds the unit the client data plane works on: one
// routable address of a service, with the load and outcome counters that
// balancers and outlier detection share.
//
// Endpoints are immutable once published; their Stats are safe for
// concurrent use and live as long as the endpoint's ID stays in the service,
// so counters survive picker rebuilds.
package endpoint

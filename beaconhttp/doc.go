// Package beaconhttp puts the client data plane under net/http: a
// RoundTripper that sends http://SERVICE/... (and https) to a healthy
// instance chosen by a beacon balancer, with retries, a retry budget, a
// circuit breaker and outlier detection; and, for servers, health handlers
// that follow the service's lifecycle.
package beaconhttp

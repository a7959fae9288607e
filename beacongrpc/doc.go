// Package beacongrpc puts the client data plane under grpc-go: a resolver
// for "beacon:///SERVICE" targets fed by the discovery cache, a client
// interceptor applying the call policies, and server helpers for the
// standard health service and a bounded graceful stop.
//
// Load balancing inside grpc-go uses its own policies (round_robin by
// service config); beacon's balancers as gRPC LB policies are still to
// come (see docs/ARCHITECTURE.md).
package beacongrpc

// Package beacongrpc puts the client data plane under grpc-go: a resolver
// for "beacon:///SERVICE" targets fed by the discovery cache, a client
// interceptor applying the call policies, beacon's balancers as gRPC LB
// policies (beacon_p2c, beacon_round_robin) with outlier detection, and
// server helpers for the standard health service and a bounded graceful
// stop.
package beacongrpc

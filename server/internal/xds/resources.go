// Package xds serves the registry to proxyless gRPC clients (and any
// other xDS v3 client) over ADS: for each service a Listener (an
// api_listener whose HttpConnectionManager takes its routes over RDS), a
// RouteConfiguration sending everything to one Cluster, the Cluster (EDS
// over ADS, round robin over weighted localities, outlier detection) and
// its ClusterLoadAssignment, built from the server's view. The service's
// policy (registry.ServicePolicy, set with SetServicePolicy) is compiled
// into the route (retries, the hash of ring hash) and the cluster
// (balancing, outlier detection). docs/xds.md says what a client sees;
// server/xds.go serves it.
//
// Every resource of a service has the same name: the service's, with
// ".NAMESPACE" after it outside the default namespace (service names hold
// no dot), so that `xds:///orders` and `xds:///orders.prod` name them.
//
// Weights: grpc-go's round robin ignores endpoint weights, but its
// weighted-round-robin over localities (xds_wrr_locality, what a
// ROUND_ROBIN cluster gets) honours locality weights. So each endpoint is
// its own locality — zone = the instance's zone, sub-zone = its id — with
// the instance's weight: the zones stay localities, and beacon's weights
// steer the traffic.
package xds

import (
	"strings"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	leastrequestv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/load_balancing_policies/least_request/v3"
	ringhashv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/load_balancing_policies/ring_hash/v3"
	roundrobinv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/load_balancing_policies/round_robin/v3"
	wrrlocalityv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/load_balancing_policies/wrr_locality/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"beacon.dev/beacon/registry"
)

// Name is the resource name of a service.
func Name(sk registry.ServiceKey) string {
	if sk.Namespace == "" || sk.Namespace == registry.DefaultNamespace {
		return sk.Service
	}
	return sk.Service + "." + sk.Namespace
}

// ParseName is Name's inverse; ok is false for a name no service has.
func ParseName(name string) (registry.ServiceKey, bool) {
	svc, ns, dotted := strings.Cut(name, ".")
	if !dotted {
		ns = registry.DefaultNamespace
	}
	if registry.ValidateName("service", svc) != nil || registry.ValidateNamespace(ns) != nil {
		return registry.ServiceKey{}, false
	}
	return registry.ServiceKey{Namespace: ns, Service: svc}, true
}

func ads() *corev3.ConfigSource {
	return &corev3.ConfigSource{
		ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
		ResourceApiVersion:    corev3.ApiVersion_V3,
	}
}

// Listener is the api_listener a gRPC client resolving xds:///NAME asks
// for.
func Listener(name string) *listenerv3.Listener {
	router, _ := anypb.New(&routerv3.Router{})
	hcm := &hcmv3.HttpConnectionManager{
		RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{ConfigSource: ads(), RouteConfigName: name}},
		HttpFilters: []*hcmv3.HttpFilter{{
			Name:       "envoy.filters.http.router",
			ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: router},
		}},
	}
	api, _ := anypb.New(hcm)
	return &listenerv3.Listener{Name: name, ApiListener: &listenerv3.ApiListener{ApiListener: api}}
}

// Route sends every call to the service's cluster, with the policy's
// retries (every method of the service: gRPC's xDS clients retry the
// status codes of retry_on) and, under ring hash, the hash of the
// policy's header. No hash policy means a random hash to gRPC clients.
func Route(name string, p registry.ServicePolicy) *routev3.RouteConfiguration {
	action := &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: name}}
	if lb := p.LoadBalancing; lb.Policy == registry.LBRingHash {
		action.HashPolicy = []*routev3.RouteAction_HashPolicy{{
			PolicySpecifier: &routev3.RouteAction_HashPolicy_Header_{Header: &routev3.RouteAction_HashPolicy_Header{HeaderName: lb.HashHeader}},
		}}
	}
	if r := p.Retry.Effective(); r.On != 0 {
		action.RetryPolicy = &routev3.RetryPolicy{
			RetryOn:    r.On.String(), // Envoy's names, the ones gRPC reads
			NumRetries: wrapperspb.UInt32(r.NumRetries),
			RetryBackOff: &routev3.RetryPolicy_RetryBackOff{
				BaseInterval: durationpb.New(r.BaseBackoff),
				MaxInterval:  durationpb.New(r.MaxBackoff),
			},
		}
	}
	return &routev3.RouteConfiguration{
		Name: name,
		VirtualHosts: []*routev3.VirtualHost{{
			Name:    name,
			Domains: []string{"*"},
			Routes: []*routev3.Route{{
				Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: ""}},
				Action: &routev3.Route_Route{Route: action},
			}},
		}},
	}
}

// Cluster takes its endpoints over EDS, balanced and with outlier
// detection as the policy says. By default: round robin over the weighted
// localities, and outlier detection as the SDK's defaults have it
// (docs/sdk.md): 5 consecutive failures eject for 30 s, at most half of
// the endpoints at once (gRPC clients ignore consecutive failures: they
// read the fields as success-rate ejection at Envoy's defaults, which
// needs 5 endpoints of 100 calls per interval).
//
// Least request and ring hash are set twice: in lb_policy with its
// config, which every gRPC version with xDS reads, and in
// load_balancing_policy (gRFC A52), which newer clients (and Envoy) read
// instead. Least request's list falls back to round robin for a client
// that knows no least request; ring hash has no fallback (a client
// without it would lose the affinity silently; it NACKs instead). grpc-go
// NACKs a ring hash whose hash function is not xxHash: it is set
// explicitly (the extension's default is not xxHash, lb_policy's is).
func Cluster(name string, p registry.ServicePolicy) *clusterv3.Cluster {
	od := p.OutlierDetection.Effective()
	c := &clusterv3.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
		EdsClusterConfig:     &clusterv3.Cluster_EdsClusterConfig{EdsConfig: ads(), ServiceName: name},
		LbPolicy:             clusterv3.Cluster_ROUND_ROBIN,
		OutlierDetection: &clusterv3.OutlierDetection{
			Consecutive_5Xx:    wrapperspb.UInt32(od.ConsecutiveFailures),
			Interval:           durationpb.New(od.Interval),
			BaseEjectionTime:   durationpb.New(od.BaseEjectionTime),
			MaxEjectionPercent: wrapperspb.UInt32(od.MaxEjectionPercent),
		},
	}
	if od.FailurePercentageThreshold != 0 {
		c.OutlierDetection.FailurePercentageThreshold = wrapperspb.UInt32(od.FailurePercentageThreshold)
		c.OutlierDetection.EnforcingFailurePercentage = wrapperspb.UInt32(100) // its default, 0, turns it off
		c.OutlierDetection.FailurePercentageMinimumHosts = wrapperspb.UInt32(od.FailurePercentageMinimumHosts)
		c.OutlierDetection.FailurePercentageRequestVolume = wrapperspb.UInt32(od.FailurePercentageRequestVolume)
	}
	switch lb := p.LoadBalancing.Effective(); lb.Policy {
	case registry.LBLeastRequest:
		c.LbPolicy = clusterv3.Cluster_LEAST_REQUEST
		c.LbConfig = &clusterv3.Cluster_LeastRequestLbConfig_{LeastRequestLbConfig: &clusterv3.Cluster_LeastRequestLbConfig{
			ChoiceCount: wrapperspb.UInt32(lb.ChoiceCount),
		}}
		c.LoadBalancingPolicy = lbPolicies(
			&leastrequestv3.LeastRequest{ChoiceCount: wrapperspb.UInt32(lb.ChoiceCount)},
			&wrrlocalityv3.WrrLocality{EndpointPickingPolicy: lbPolicies(&roundrobinv3.RoundRobin{})},
		)
	case registry.LBRingHash:
		c.LbPolicy = clusterv3.Cluster_RING_HASH
		c.LbConfig = &clusterv3.Cluster_RingHashLbConfig_{RingHashLbConfig: &clusterv3.Cluster_RingHashLbConfig{
			MinimumRingSize: wrapperspb.UInt64(lb.MinRingSize),
			MaximumRingSize: wrapperspb.UInt64(lb.MaxRingSize),
			HashFunction:    clusterv3.Cluster_RingHashLbConfig_XX_HASH,
		}}
		c.LoadBalancingPolicy = lbPolicies(&ringhashv3.RingHash{
			HashFunction:    ringhashv3.RingHash_XX_HASH,
			MinimumRingSize: wrapperspb.UInt64(lb.MinRingSize),
			MaximumRingSize: wrapperspb.UInt64(lb.MaxRingSize),
		})
	}
	return c
}

// lbPolicies is a load_balancing_policy: the first of policies a client
// supports applies.
func lbPolicies(policies ...proto.Message) *clusterv3.LoadBalancingPolicy {
	lp := &clusterv3.LoadBalancingPolicy{}
	for _, m := range policies {
		a, err := anypb.New(m)
		if err != nil {
			panic("xds: marshalling a load balancing policy cannot fail: " + err.Error())
		}
		// Envoy's name of the extension: envoy.load_balancing_policies.ring_hash
		// for envoy.extensions.load_balancing_policies.ring_hash.v3 (clients
		// go by the type, the name is for people).
		pkg := string(m.ProtoReflect().Descriptor().ParentFile().Package())
		name := strings.TrimSuffix(strings.Replace(pkg, "envoy.extensions.", "envoy.", 1), ".v3")
		lp.Policies = append(lp.Policies, &clusterv3.LoadBalancingPolicy_Policy{TypedExtensionConfig: &corev3.TypedExtensionConfig{
			Name:        name,
			TypedConfig: a,
		}})
	}
	return lp
}

// Endpoints is the service's ClusterLoadAssignment for a client in zone
// (""; unknown): the instances callers should use (Snapshot.Available:
// the routable ones, or under the protection threshold every one declared
// UP) as HEALTHY, and the DRAINING ones as DRAINING, so that clients
// finish their calls on them and send no new ones. Each endpoint is a
// locality of its own (see the package comment), ordered by instance id.
// When some of them are in the client's zone, those are priority 0 and
// the others priority 1: the client stays in its zone while it has a
// usable endpoint there, and fails over to the rest when it has none.
func Endpoints(name string, snap *registry.Snapshot, zone string) *endpointv3.ClusterLoadAssignment {
	cla := &endpointv3.ClusterLoadAssignment{ClusterName: name}
	if snap == nil {
		return cla
	}
	available, _ := snap.Available()
	use := make(map[*registry.Instance]bool, len(available))
	local := false
	for _, in := range available {
		use[in] = true
		local = local || zone != "" && in.Zone == zone
	}
	for _, in := range snap.Instances {
		status := corev3.HealthStatus_HEALTHY
		switch {
		case use[in]:
		case in.Status == registry.StatusDraining:
			status = corev3.HealthStatus_DRAINING
		default:
			continue
		}
		var priority uint32
		if local && in.Zone != zone {
			priority = 1
		}
		weight := uint32(max(in.Weight, 1))
		cla.Endpoints = append(cla.Endpoints, &endpointv3.LocalityLbEndpoints{
			Locality:            &corev3.Locality{Zone: in.Zone, SubZone: in.ID},
			LoadBalancingWeight: wrapperspb.UInt32(weight),
			Priority:            priority,
			LbEndpoints: []*endpointv3.LbEndpoint{{
				HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
					Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
						Address:       in.Address,
						PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: uint32(in.Port)},
					}}},
				}},
				HealthStatus:        status,
				LoadBalancingWeight: wrapperspb.UInt32(weight),
			}},
		})
	}
	return cla
}

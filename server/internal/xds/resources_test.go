package xds_test

import (
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	leastrequestv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/load_balancing_policies/least_request/v3"
	ringhashv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/load_balancing_policies/ring_hash/v3"
	roundrobinv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/load_balancing_policies/round_robin/v3"
	wrrlocalityv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/load_balancing_policies/wrr_locality/v3"
	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/testing/protocmp"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/internal/xds"
)

func ads() *corev3.ConfigSource {
	return &corev3.ConfigSource{ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}}, ResourceApiVersion: corev3.ApiVersion_V3}
}

// baseCluster is the cluster of a service with the default policy, as
// beacon served every cluster before policies: round robin and the SDK's
// outlier defaults.
func baseCluster() *clusterv3.Cluster {
	return &clusterv3.Cluster{
		Name:                 "orders",
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
		EdsClusterConfig:     &clusterv3.Cluster_EdsClusterConfig{EdsConfig: ads(), ServiceName: "orders"},
		LbPolicy:             clusterv3.Cluster_ROUND_ROBIN,
		OutlierDetection: &clusterv3.OutlierDetection{
			Consecutive_5Xx:    wrapperspb.UInt32(5),
			Interval:           durationpb.New(10 * time.Second),
			BaseEjectionTime:   durationpb.New(30 * time.Second),
			MaxEjectionPercent: wrapperspb.UInt32(50),
		},
	}
}

func policy(name string, m proto.Message) *clusterv3.LoadBalancingPolicy_Policy {
	a, _ := anypb.New(m)
	return &clusterv3.LoadBalancingPolicy_Policy{TypedExtensionConfig: &corev3.TypedExtensionConfig{Name: name, TypedConfig: a}}
}

// Each policy compiles into exactly the fields gRPC's xDS clients read
// (grpc-go's xdsresource and xdslbregistry, v1.85): anything else, or a
// value out of their bounds, NACKs the whole response.
func TestClusterCompilesThePolicy(t *testing.T) {
	for _, tc := range []struct {
		name   string
		p      registry.ServicePolicy
		modify func(*clusterv3.Cluster)
	}{
		{"defaults", registry.ServicePolicy{}, func(*clusterv3.Cluster) {}},
		{"least request", registry.ServicePolicy{LoadBalancing: registry.LoadBalancing{Policy: registry.LBLeastRequest}}, func(c *clusterv3.Cluster) {
			c.LbPolicy = clusterv3.Cluster_LEAST_REQUEST
			c.LbConfig = &clusterv3.Cluster_LeastRequestLbConfig_{LeastRequestLbConfig: &clusterv3.Cluster_LeastRequestLbConfig{ChoiceCount: wrapperspb.UInt32(2)}}
			rr := &clusterv3.LoadBalancingPolicy{Policies: []*clusterv3.LoadBalancingPolicy_Policy{policy("envoy.load_balancing_policies.round_robin", &roundrobinv3.RoundRobin{})}}
			c.LoadBalancingPolicy = &clusterv3.LoadBalancingPolicy{Policies: []*clusterv3.LoadBalancingPolicy_Policy{
				policy("envoy.load_balancing_policies.least_request", &leastrequestv3.LeastRequest{ChoiceCount: wrapperspb.UInt32(2)}),
				policy("envoy.load_balancing_policies.wrr_locality", &wrrlocalityv3.WrrLocality{EndpointPickingPolicy: rr}),
			}}
		}},
		{"ring hash", registry.ServicePolicy{LoadBalancing: registry.LoadBalancing{Policy: registry.LBRingHash, HashHeader: "x-user", MaxRingSize: 4096}}, func(c *clusterv3.Cluster) {
			c.LbPolicy = clusterv3.Cluster_RING_HASH
			c.LbConfig = &clusterv3.Cluster_RingHashLbConfig_{RingHashLbConfig: &clusterv3.Cluster_RingHashLbConfig{
				MinimumRingSize: wrapperspb.UInt64(1024), MaximumRingSize: wrapperspb.UInt64(4096), HashFunction: clusterv3.Cluster_RingHashLbConfig_XX_HASH}}
			c.LoadBalancingPolicy = &clusterv3.LoadBalancingPolicy{Policies: []*clusterv3.LoadBalancingPolicy_Policy{
				// XX_HASH spelled out: the extension's default is not
				// xxHash, and grpc-go NACKs any other.
				policy("envoy.load_balancing_policies.ring_hash", &ringhashv3.RingHash{HashFunction: ringhashv3.RingHash_XX_HASH,
					MinimumRingSize: wrapperspb.UInt64(1024), MaximumRingSize: wrapperspb.UInt64(4096)}),
			}}
		}},
		{"outlier detection", registry.ServicePolicy{OutlierDetection: registry.OutlierDetection{Interval: time.Second, MaxEjectionPercent: 20, FailurePercentageThreshold: 40}}, func(c *clusterv3.Cluster) {
			c.OutlierDetection.Interval = durationpb.New(time.Second)
			c.OutlierDetection.MaxEjectionPercent = wrapperspb.UInt32(20)
			c.OutlierDetection.FailurePercentageThreshold = wrapperspb.UInt32(40)
			// 0, its default, turns failure percentage ejection off.
			c.OutlierDetection.EnforcingFailurePercentage = wrapperspb.UInt32(100)
			c.OutlierDetection.FailurePercentageMinimumHosts = wrapperspb.UInt32(5)
			c.OutlierDetection.FailurePercentageRequestVolume = wrapperspb.UInt32(50)
		}},
	} {
		want := baseCluster()
		tc.modify(want)
		if diff := cmp.Diff(want, xds.Cluster("orders", tc.p), protocmp.Transform()); diff != "" {
			t.Errorf("%s: Cluster() differs (-want +got):\n%s", tc.name, diff)
		}
	}
}

func TestRouteCompilesThePolicy(t *testing.T) {
	for _, tc := range []struct {
		name string
		p    registry.ServicePolicy
		want *routev3.RouteAction
	}{
		{"defaults", registry.ServicePolicy{}, &routev3.RouteAction{}},
		{"least request: no hash", registry.ServicePolicy{LoadBalancing: registry.LoadBalancing{Policy: registry.LBLeastRequest}}, &routev3.RouteAction{}},
		{"ring hash: the header's hash", registry.ServicePolicy{LoadBalancing: registry.LoadBalancing{Policy: registry.LBRingHash, HashHeader: "x-user"}}, &routev3.RouteAction{
			HashPolicy: []*routev3.RouteAction_HashPolicy{{PolicySpecifier: &routev3.RouteAction_HashPolicy_Header_{Header: &routev3.RouteAction_HashPolicy_Header{HeaderName: "x-user"}}}},
		}},
		{"retries, defaults filled in", registry.ServicePolicy{Retry: registry.RetryPolicy{On: registry.RetryOnUnavailable | registry.RetryOnDeadlineExceeded}}, &routev3.RouteAction{
			RetryPolicy: &routev3.RetryPolicy{RetryOn: "deadline-exceeded,unavailable", NumRetries: wrapperspb.UInt32(1), RetryBackOff: &routev3.RetryPolicy_RetryBackOff{
				BaseInterval: durationpb.New(25 * time.Millisecond), MaxInterval: durationpb.New(250 * time.Millisecond)}},
		}},
	} {
		tc.want.ClusterSpecifier = &routev3.RouteAction_Cluster{Cluster: "orders"}
		got := xds.Route("orders", tc.p).GetVirtualHosts()[0].GetRoutes()[0].GetRoute()
		if diff := cmp.Diff(tc.want, got, protocmp.Transform()); diff != "" {
			t.Errorf("%s: Route() action differs (-want +got):\n%s", tc.name, diff)
		}
	}
}

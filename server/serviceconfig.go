package server

import (
	"context"

	"connectrpc.com/connect"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/internal/store"
	"beacon.dev/beacon/internal/wire"
	"beacon.dev/beacon/registry"
	"beacon.dev/beacon/server/internal/acl"
)

// A service's settings: its protection threshold (SetServiceConfig, in
// api.go) and the policies its xDS clients follow (SetServicePolicy;
// registry.ServicePolicy, compiled into xDS by server/internal/xds), read
// together by GetServiceConfig. The policies have a call and a record of
// their own so that a server or an SDK that predates them, asked or read
// during an upgrade, refuses them (Unimplemented) or passes them by rather
// than misreading them (protobuf would drop the unknown fields of a
// SetServiceConfig and set its threshold to 0; a strict reader of the
// settings record would drop the whole record, threshold included).

func (a api) SetServicePolicy(ctx context.Context, req *connect.Request[beaconv1.SetServicePolicyRequest]) (*connect.Response[beaconv1.SetServicePolicyResponse], error) {
	if err := a.ready(); err != nil {
		return nil, err
	}
	msg := req.Msg
	sk, err := serviceKeyOf(msg.GetNamespace(), msg.GetService())
	// Every part is checked before anything is written: bad input changes
	// nothing.
	var lb registry.LoadBalancing
	var retry registry.RetryPolicy
	var od registry.OutlierDetection
	if err == nil && msg.LoadBalancing != nil {
		lb, err = wire.LoadBalancingFromProto(msg.GetLoadBalancing())
	}
	if err == nil && msg.RetryPolicy != nil {
		retry, err = wire.RetryPolicyFromProto(msg.GetRetryPolicy())
	}
	if err == nil && msg.OutlierDetection != nil {
		od, err = wire.OutlierDetectionFromProto(msg.GetOutlierDetection())
	}
	if err != nil {
		return nil, toConnectError(err)
	}
	if err := needGlobal(ctx, acl.Operator, acl.Write); err != nil {
		return nil, err
	}
	set, rev, err := a.s.store.UpdateServicePolicy(ctx, sk, func(p *registry.ServicePolicy) {
		if msg.LoadBalancing != nil {
			p.LoadBalancing = lb
		}
		if msg.RetryPolicy != nil {
			p.Retry = retry
		}
		if msg.OutlierDetection != nil {
			p.OutlierDetection = od
		}
	})
	if err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&beaconv1.SetServicePolicyResponse{Revision: rev, Config: a.serviceConfigProto(sk, set)}), nil
}

func (a api) GetServiceConfig(ctx context.Context, req *connect.Request[beaconv1.GetServiceConfigRequest]) (*connect.Response[beaconv1.GetServiceConfigResponse], error) {
	if err := a.ready(); err != nil {
		return nil, err
	}
	sk, err := serviceKeyOf(req.Msg.GetNamespace(), req.Msg.GetService())
	if err != nil {
		return nil, toConnectError(err)
	}
	if err := needService(ctx, sk.Namespace, sk.Service, acl.Read); err != nil {
		return nil, err
	}
	set, rev, err := a.s.store.GetServiceSettings(ctx, sk)
	if err != nil {
		return nil, toConnectError(err)
	}
	return connect.NewResponse(&beaconv1.GetServiceConfigResponse{Config: a.serviceConfigProto(sk, set), Revision: rev}), nil
}

func serviceKeyOf(namespace, service string) (registry.ServiceKey, error) {
	ns, err := namespaceOf(namespace)
	if err == nil {
		err = registry.ValidateName("service", service)
	}
	return registry.ServiceKey{Namespace: ns, Service: service}, err
}

func (a api) serviceConfigProto(sk registry.ServiceKey, set store.ServiceSettings) *beaconv1.ServiceConfig {
	c := &beaconv1.ServiceConfig{Namespace: sk.Namespace, Service: sk.Service, ProtectionThreshold: a.s.cfg.ProtectionThreshold, ProtectionThresholdDefault: true}
	if set.Threshold != nil {
		c.ProtectionThreshold, c.ProtectionThresholdDefault = *set.Threshold, false
	}
	c.LoadBalancing = wire.LoadBalancingToProto(set.Policy.LoadBalancing)
	c.RetryPolicy = wire.RetryPolicyToProto(set.Policy.Retry)
	c.OutlierDetection = wire.OutlierDetectionToProto(set.Policy.OutlierDetection)
	return c
}

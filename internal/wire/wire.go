// Package wire converts between the API's protobuf messages and the
// registry model. Server and SDK share it so both sides agree exactly.
package wire

import (
	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/registry"
)

// InstanceFromProto converts without validating; callers validate.
func InstanceFromProto(p *beaconv1.Instance) registry.Instance {
	if p == nil {
		return registry.Instance{}
	}
	return registry.Instance{
		Namespace: p.GetNamespace(), Service: p.GetService(), ID: p.GetId(),
		Address: p.GetAddress(), Port: int(p.GetPort()), Weight: int(p.GetWeight()),
		Zone: p.GetZone(), Version: p.GetVersion(), Tags: p.GetTags(), Metadata: p.GetMetadata(),
		Status: registry.Status(p.GetStatus()), Health: registry.Health(p.GetHealth()),
		SessionID: p.GetSessionId(), Revision: p.GetRevision(),
	}
}

// InstanceToProto converts an instance for the wire.
func InstanceToProto(in *registry.Instance) *beaconv1.Instance {
	return &beaconv1.Instance{
		Namespace: in.Namespace, Service: in.Service, Id: in.ID,
		Address: in.Address, Port: int32(in.Port), Weight: int32(in.Weight),
		Zone: in.Zone, Version: in.Version, Tags: in.Tags, Metadata: in.Metadata,
		Status: beaconv1.Status(in.Status), Health: beaconv1.Health(in.Health),
		SessionId: in.SessionID, Revision: in.Revision,
	}
}

// SnapshotToProto converts a snapshot for the wire.
func SnapshotToProto(s *registry.Snapshot) *beaconv1.ServiceSnapshot {
	out := &beaconv1.ServiceSnapshot{
		Namespace: s.Namespace, Service: s.Service, Revision: s.Revision,
		Instances: make([]*beaconv1.Instance, len(s.Instances)),
	}
	for i, in := range s.Instances {
		out.Instances[i] = InstanceToProto(in)
	}
	return out
}

// SnapshotFromProto converts a received snapshot.
func SnapshotFromProto(p *beaconv1.ServiceSnapshot) *registry.Snapshot {
	s := &registry.Snapshot{
		Namespace: p.GetNamespace(), Service: p.GetService(), Revision: p.GetRevision(),
		Instances: make([]*registry.Instance, len(p.GetInstances())),
	}
	for i, pi := range p.GetInstances() {
		in := InstanceFromProto(pi)
		s.Instances[i] = &in
	}
	return s
}

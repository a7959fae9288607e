// Package wire converts between the API's protobuf messages and the
// registry model. Server and SDK share it so both sides agree exactly.
package wire

import (
	"fmt"
	"slices"
	"sort"

	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

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
		Checks: checksFromProto(p.GetChecks()), Suspect: p.GetSuspect(),
	}
}

func checksFromProto(ps []*beaconv1.Check) []registry.Check {
	if len(ps) == 0 {
		return nil
	}
	out := make([]registry.Check, len(ps))
	for i, p := range ps {
		out[i] = registry.Check{
			Name: p.GetName(), Kind: registry.CheckKind(p.GetKind()), Target: p.GetTarget(),
			Headers: p.GetHeaders(), ExpectStatus: p.GetExpectStatus(), BodyContains: p.GetBodyContains(),
			GRPCService: p.GetGrpcService(), Interval: p.GetInterval().AsDuration(), Timeout: p.GetTimeout().AsDuration(),
			Jitter: p.GetJitter(), FailuresBeforeCritical: int(p.GetFailuresBeforeCritical()),
			SuccessesBeforePassing: int(p.GetSuccessesBeforePassing()), DeregisterCriticalAfter: p.GetDeregisterCriticalAfter().AsDuration(),
			Status: registry.Health(p.GetStatus()), Output: p.GetOutput(),
		}
		if p.GetSince() != nil {
			out[i].Since = p.GetSince().AsTime()
		}
	}
	return out
}

func checksToProto(cs []registry.Check) []*beaconv1.Check {
	if len(cs) == 0 {
		return nil
	}
	out := make([]*beaconv1.Check, len(cs))
	for i, c := range cs {
		out[i] = &beaconv1.Check{
			Name: c.Name, Kind: beaconv1.CheckKind(c.Kind), Target: c.Target, Headers: c.Headers,
			ExpectStatus: c.ExpectStatus, BodyContains: c.BodyContains, GrpcService: c.GRPCService,
			Interval: durationpb.New(c.Interval), Timeout: durationpb.New(c.Timeout), Jitter: c.Jitter,
			FailuresBeforeCritical: int32(c.FailuresBeforeCritical), SuccessesBeforePassing: int32(c.SuccessesBeforePassing),
			Status: beaconv1.Health(c.Status), Output: c.Output,
		}
		if c.DeregisterCriticalAfter > 0 {
			out[i].DeregisterCriticalAfter = durationpb.New(c.DeregisterCriticalAfter)
		}
		if !c.Since.IsZero() {
			out[i].Since = timestamppb.New(c.Since)
		}
	}
	return out
}

// InstanceToProto converts an instance for the wire.
func InstanceToProto(in *registry.Instance) *beaconv1.Instance {
	return &beaconv1.Instance{
		Namespace: in.Namespace, Service: in.Service, Id: in.ID,
		Address: in.Address, Port: int32(in.Port), Weight: int32(in.Weight),
		Zone: in.Zone, Version: in.Version, Tags: in.Tags, Metadata: in.Metadata,
		Status: beaconv1.Status(in.Status), Health: beaconv1.Health(in.Health),
		SessionId: in.SessionID, Revision: in.Revision,
		Checks: checksToProto(in.Checks), Suspect: in.Suspect,
	}
}

// SnapshotToProto converts a snapshot for the wire.
func SnapshotToProto(s *registry.Snapshot) *beaconv1.ServiceSnapshot {
	out := &beaconv1.ServiceSnapshot{
		Namespace: s.Namespace, Service: s.Service, Revision: s.Revision,
		Instances:           make([]*beaconv1.Instance, len(s.Instances)),
		ProtectionThreshold: s.ProtectionThreshold,
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
		Instances:           make([]*registry.Instance, len(p.GetInstances())),
		ProtectionThreshold: p.GetProtectionThreshold(),
	}
	for i, pi := range p.GetInstances() {
		in := InstanceFromProto(pi)
		s.Instances[i] = &in
	}
	return s
}

// ListInstancesResponse is the API's answer to ListInstances for a
// service's full snapshot: every instance when all, otherwise those callers
// should use (protection included). The server answers with it and the CLI
// prints it, so `beacon instances -o json` is the API's JSON.
func ListInstancesResponse(snap *registry.Snapshot, all bool) *beaconv1.ListInstancesResponse {
	resp := &beaconv1.ListInstancesResponse{Revision: snap.Revision, ProtectionThreshold: snap.ProtectionThreshold, ResultsFiltered: snap.Filtered}
	list := snap.Instances
	if !all {
		list, resp.Protected = snap.Available()
	}
	for _, in := range list {
		resp.Instances = append(resp.Instances, InstanceToProto(in))
	}
	return resp
}

// ApplyDelta returns the snapshot a delta (BaseRevision set) describes,
// from base, the snapshot at its BaseRevision, which it does not modify.
// Instances that did not change are base's own pointers: received
// snapshots and their instances are read-only. It fails if base is not
// the delta's base.
func ApplyDelta(base *registry.Snapshot, d *beaconv1.ServiceSnapshot) (*registry.Snapshot, error) {
	if base == nil || base.Revision != d.GetBaseRevision() {
		held := int64(0)
		if base != nil {
			held = base.Revision
		}
		return nil, fmt.Errorf("wire: a delta of %s from revision %d, but revision %d is held", d.GetService(), d.GetBaseRevision(), held)
	}
	removed := d.GetRemoved()
	if !slices.IsSorted(removed) {
		return nil, fmt.Errorf("wire: a delta of %s lists removed instances out of order", d.GetService())
	}
	upserts := d.GetInstances()
	out := &registry.Snapshot{
		Namespace: d.GetNamespace(), Service: d.GetService(), Revision: d.GetRevision(),
		ProtectionThreshold: d.GetProtectionThreshold(),
		Instances:           make([]*registry.Instance, 0, max(len(base.Instances)+len(upserts)-len(removed), 0)),
	}
	// Walk the changes in id order (upserts and removals are each sorted),
	// copying the unchanged runs of base between them whole: a change of
	// one instance among many costs two binary searches and a copy.
	old := base.Instances
	i, u, r := 0, 0, 0
	for u < len(upserts) || r < len(removed) {
		upsert := r == len(removed) || (u < len(upserts) && upserts[u].GetId() < removed[r])
		id := ""
		if upsert {
			id = upserts[u].GetId()
		} else {
			id = removed[r]
			if u < len(upserts) && upserts[u].GetId() == id {
				return nil, fmt.Errorf("wire: a delta of %s both changes and removes instance %q", d.GetService(), id)
			}
		}
		j := i + sort.Search(len(old)-i, func(k int) bool { return old[i+k].ID >= id })
		out.Instances = append(out.Instances, old[i:j]...)
		i = j
		if i < len(old) && old[i].ID == id {
			i++ // replaced or removed
		}
		if !upsert {
			r++
			continue
		}
		if n := len(out.Instances); n > 0 && out.Instances[n-1].ID >= id {
			return nil, fmt.Errorf("wire: a delta of %s lists instance %q out of order", d.GetService(), id)
		}
		in := InstanceFromProto(upserts[u])
		out.Instances = append(out.Instances, &in)
		u++
	}
	out.Instances = append(out.Instances, old[i:]...)
	return out, nil
}

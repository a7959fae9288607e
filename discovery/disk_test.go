package discovery

import (
	"os"
	"strings"
	"testing"
	"time"

	"beacon.dev/beacon/registry"
)

func TestSnapshotRoundTripAndAge(t *testing.T) {
	dir := t.TempDir()
	now := time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)
	snaps := map[string]*registry.Snapshot{"orders": {Service: "orders", Revision: 42, Instances: []*registry.Instance{
		{ID: "a", Address: "10.0.0.1", Port: 80, Weight: 100, Zone: "z1", Tags: []string{"t"}, Metadata: map[string]string{"k": "v"}, Status: registry.StatusUp, Health: registry.HealthPassing, SessionID: 7},
		{ID: "drain", Address: "10.0.0.2", Port: 80, Weight: 100, Status: registry.StatusDraining, Health: registry.HealthPassing},
	}}}
	if err := writeSnapshot(dir, "default", snaps, now); err != nil {
		t.Fatal(err)
	}
	got, at, err := readSnapshot(dir, "default", time.Hour, now.Add(time.Minute))
	if err != nil || !at.Equal(now) {
		t.Fatalf("readSnapshot() = %v at %v, want the snapshot written at %v", err, at, now)
	}
	s := got["orders"]
	if s == nil || s.Revision != 42 || len(s.Instances) != 1 || s.Instances[0].ID != "a" || s.Instances[0].Zone != "z1" || s.Instances[0].SessionID != 7 {
		t.Fatalf("read back %+v, want orders@42 with only the routable instance a", s)
	}
	if _, _, err := readSnapshot(dir, "default", time.Hour, now.Add(2*time.Hour)); err == nil || !strings.Contains(err.Error(), "max age 1h0m0s") {
		t.Errorf("readSnapshot(too old) = %v, want a max-age error", err)
	}
	if _, _, err := readSnapshot(dir, "other", time.Hour, now); err == nil {
		t.Error("readSnapshot(other namespace) = nil, want an error")
	}
}

// FuzzDecodeSnapshot: any bytes give a snapshot or an error, never a panic,
// and what decodes passes validation.
func FuzzDecodeSnapshot(f *testing.F) {
	dir := f.TempDir()
	now := time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)
	_ = writeSnapshot(dir, "default", map[string]*registry.Snapshot{"s": {Service: "s", Revision: 1, Instances: []*registry.Instance{
		{ID: "a", Address: "h", Port: 1, Weight: 1, Status: registry.StatusUp, Health: registry.HealthPassing},
	}}}, now)
	if data, err := os.ReadFile(snapshotPath(dir, "default")); err == nil {
		f.Add(data)
	}
	f.Add([]byte(`{"format":"beacon-discovery-snapshot","version":2,"namespace":"default"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		snaps, _, err := decodeSnapshot(data, "default", 100*365*24*time.Hour, now)
		if err != nil {
			return
		}
		for _, s := range snaps {
			for _, in := range s.Instances {
				if err := in.Validate(); err != nil {
					t.Fatalf("decoded an invalid instance: %v", err)
				}
			}
		}
	})
}

// The checksum holds whatever spacing protojson picks and whatever the
// payload's strings contain (encoding/json HTML-escapes a RawMessage it
// writes): a snapshot always reads back.
func TestSnapshotChecksumCoversTheStoredBytes(t *testing.T) {
	dir := t.TempDir()
	now := time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)
	in := &registry.Instance{ID: "a", Address: "h", Port: 1, Weight: 1, Status: registry.StatusUp, Health: registry.HealthPassing,
		Metadata: map[string]string{"html": "<b>&amp;</b>", "spaces": "a : b , c"}}
	if err := writeSnapshot(dir, "default", map[string]*registry.Snapshot{"s": {Service: "s", Revision: 3, Instances: []*registry.Instance{in}}}, now); err != nil {
		t.Fatal(err)
	}
	snaps, _, err := readSnapshot(dir, "default", time.Hour, now)
	if err != nil || len(snaps["s"].Instances) != 1 || snaps["s"].Instances[0].Metadata["html"] != "<b>&amp;</b>" {
		t.Fatalf("readSnapshot = %v, %v", snaps, err)
	}
}

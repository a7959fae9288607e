package discovery

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/internal/atomicfile"
	"beacon.dev/beacon/internal/wire"
	"beacon.dev/beacon/registry"
)

// The snapshot file: a versioned envelope whose checksum covers the
// payload bytes exactly as stored. The payload is the API's own JSON for a
// list of service snapshots (a beacon.v1.WatchResponse, as protojson): one
// shape for an instance wherever a user may read it.
const (
	snapshotFormat  = "beacon-discovery-snapshot"
	snapshotVersion = 2
	// MaxSnapshotBytes bounds the file read at a cold start.
	MaxSnapshotBytes = 64 << 20
)

type envelope struct {
	Format    string          `json:"format"`
	Version   int             `json:"version"`
	WrittenAt time.Time       `json:"written_at"`
	Namespace string          `json:"namespace"`
	SHA256    string          `json:"sha256"`
	Payload   json.RawMessage `json:"payload"`
}

func snapshotPath(dir, namespace string) string {
	return filepath.Join(dir, "beacon-discovery-"+namespace+".json")
}

// writeSnapshot stores the routable instances of every service atomically
// (temporary file, fsync, rename).
func writeSnapshot(dir, namespace string, snaps map[string]*registry.Snapshot, now time.Time) error {
	names := make([]string, 0, len(snaps))
	for name := range snaps {
		names = append(names, name)
	}
	slices.Sort(names)
	p := &beaconv1.WatchResponse{}
	for _, name := range names {
		s := *snaps[name]
		s.Service, s.Instances = name, s.Routable()
		p.Snapshots = append(p.Snapshots, wire.SnapshotToProto(&s))
	}
	raw, err := protojson.Marshal(p)
	if err != nil {
		return err
	}
	// The checksum covers the payload as the file holds it. encoding/json
	// compacts (and HTML-escapes) a RawMessage it writes, and protojson
	// varies its spacing from build to build on purpose: normalize first,
	// so that what is hashed is what is stored.
	var compact, payloadBuf bytes.Buffer
	if err := json.Compact(&compact, raw); err != nil {
		return err
	}
	json.HTMLEscape(&payloadBuf, compact.Bytes())
	payload := payloadBuf.Bytes()
	sum := sha256.Sum256(payload)
	data, err := json.Marshal(envelope{
		Format: snapshotFormat, Version: snapshotVersion, WrittenAt: now.UTC(), Namespace: namespace,
		SHA256: hex.EncodeToString(sum[:]), Payload: payload,
	})
	if err != nil {
		return err
	}
	return atomicfile.Write(snapshotPath(dir, namespace), data)
}

// ErrBadSnapshot wraps every reason a snapshot file is not used.
var ErrBadSnapshot = errors.New("discovery: snapshot not usable")

// readSnapshot loads and checks a snapshot file written at most maxAge ago.
func readSnapshot(dir, namespace string, maxAge time.Duration, now time.Time) (map[string]*registry.Snapshot, time.Time, error) {
	path := snapshotPath(dir, namespace)
	f, err := os.Open(path)
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("%w: %v", ErrBadSnapshot, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("%w: %v", ErrBadSnapshot, err)
	}
	if st.Size() > MaxSnapshotBytes {
		return nil, time.Time{}, fmt.Errorf("%w: %s is %d bytes, limit %d", ErrBadSnapshot, path, st.Size(), MaxSnapshotBytes)
	}
	data := make([]byte, st.Size())
	if _, err := io.ReadFull(f, data); err != nil {
		return nil, time.Time{}, fmt.Errorf("%w: %v", ErrBadSnapshot, err)
	}
	return decodeSnapshot(data, namespace, maxAge, now)
}

// decodeSnapshot checks the envelope, checksum, age and contents.
func decodeSnapshot(data []byte, namespace string, maxAge time.Duration, now time.Time) (map[string]*registry.Snapshot, time.Time, error) {
	var env envelope
	if err := json.Unmarshal(data, &env); err != nil {
		return nil, time.Time{}, fmt.Errorf("%w: envelope: %v", ErrBadSnapshot, err)
	}
	switch {
	case env.Format != snapshotFormat:
		return nil, time.Time{}, fmt.Errorf("%w: format %q, want %q", ErrBadSnapshot, env.Format, snapshotFormat)
	case env.Version != snapshotVersion:
		return nil, time.Time{}, fmt.Errorf("%w: version %d, this build reads %d", ErrBadSnapshot, env.Version, snapshotVersion)
	case env.Namespace != namespace:
		return nil, time.Time{}, fmt.Errorf("%w: namespace %q, want %q", ErrBadSnapshot, env.Namespace, namespace)
	}
	sum := sha256.Sum256(env.Payload)
	if hex.EncodeToString(sum[:]) != env.SHA256 {
		return nil, time.Time{}, fmt.Errorf("%w: checksum mismatch", ErrBadSnapshot)
	}
	if age := now.Sub(env.WrittenAt); age > maxAge || age < -time.Minute {
		return nil, time.Time{}, fmt.Errorf("%w: written %v ago, max age %v", ErrBadSnapshot, age.Round(time.Second), maxAge)
	}
	var p beaconv1.WatchResponse
	if err := protojson.Unmarshal(env.Payload, &p); err != nil {
		return nil, time.Time{}, fmt.Errorf("%w: payload: %v", ErrBadSnapshot, err)
	}
	out := make(map[string]*registry.Snapshot, len(p.Snapshots))
	for _, ps := range p.Snapshots {
		s := wire.SnapshotFromProto(ps)
		if err := registry.ValidateName("service", s.Service); err != nil {
			return nil, time.Time{}, fmt.Errorf("%w: %v", ErrBadSnapshot, err)
		}
		if _, dup := out[s.Service]; dup {
			return nil, time.Time{}, fmt.Errorf("%w: service %s listed twice", ErrBadSnapshot, s.Service)
		}
		if s.Namespace != namespace && s.Namespace != "" {
			return nil, time.Time{}, fmt.Errorf("%w: service %s of namespace %q, want %q", ErrBadSnapshot, s.Service, s.Namespace, namespace)
		}
		s.Namespace = namespace
		for _, in := range s.Instances {
			in.Namespace, in.Service = namespace, s.Service
			if err := in.Validate(); err != nil {
				return nil, time.Time{}, fmt.Errorf("%w: service %s: %v", ErrBadSnapshot, s.Service, err)
			}
		}
		out[s.Service] = s
	}
	return out, env.WrittenAt, nil
}

package kv

import (
	"bytes"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
)

// FuzzVersionRecord: a history record decodes back to what was written
// (a value may hold any bytes, newlines included), and no record made by
// hand panics the decoder.
func FuzzVersionRecord(f *testing.F) {
	f.Add([]byte("plain"), "", false, int64(0))
	f.Add([]byte("line 1\nline 2\n"), "6d3c2f8a", false, int64(42))
	f.Add([]byte{}, "", true, int64(0))
	f.Add([]byte("{\"time\":\"x\"}\n"), "a", false, int64(-1))
	f.Fuzz(func(t *testing.T, value []byte, accessor string, deleted bool, rollbackOf int64) {
		at := time.Date(2026, 12, 6, 1, 2, 3, 4, time.UTC)
		rec := encodeVersion(versionHeader{Time: at, Accessor: accessor, Deleted: deleted, RollbackOf: rollbackOf}, value)
		v, err := decodeVersion(&mvccpb.KeyValue{Value: rec, CreateRevision: 9})
		if err != nil {
			t.Fatalf("decoding what was encoded: %v", err)
		}
		want := value
		if deleted {
			want = nil
		}
		if !bytes.Equal(v.GetValue(), want) || v.GetDeleted() != deleted || v.GetRollbackOf() != rollbackOf || v.GetRevision() != 9 || !v.GetTime().AsTime().Equal(at) {
			t.Fatalf("round trip: %v", v)
		}
		_, _ = decodeVersion(&mvccpb.KeyValue{Value: value}) // arbitrary bytes: no panic
	})
}

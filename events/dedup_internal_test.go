package events

import (
	"bytes"
	"encoding/json"
	"testing"
)

// The ring keeps the last window marks, oldest first, and survives its
// encoding.
func TestRingKeepsTheLastWindowMarks(t *testing.T) {
	r := &ring{}
	for m := range uint64(10) {
		r = r.with(m, 4)
	}
	if len(r.marks) != 4 || r.marks[0] != 6 || r.marks[3] != 9 || r.has(5) || !r.has(6) {
		t.Fatalf("ring %v, want [6 7 8 9]", r.marks)
	}
	back, err := decodeRing(r.encode())
	if err != nil || len(back.marks) != 4 || back.marks[0] != 6 {
		t.Fatalf("decoded %v, %v", back, err)
	}
}

// FuzzDecodeRing: any bytes in the dedup key decode to a ring that
// encodes back to them, or to an error — never a panic.
func FuzzDecodeRing(f *testing.F) {
	f.Add((&ring{marks: []uint64{1, 2}}).encode())
	f.Add([]byte{})
	f.Add([]byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := decodeRing(b)
		if err != nil {
			return
		}
		if !bytes.Equal(r.encode(), b) {
			t.Fatalf("decode/encode changed %x", b)
		}
	})
}

// FuzzDecodeShard: any bytes in an outbox shard decode or fail, never
// panic; what decodes encodes again and decodes to the same events.
func FuzzDecodeShard(f *testing.F) {
	f.Add([]byte(`{"events":[{"id":"a","topic":"t","key":"aw==","value":"dg=="}]}`))
	f.Add([]byte(`{"events":null}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		l, err := decodeShard(b)
		if err != nil {
			return
		}
		again, err := json.Marshal(l)
		if err != nil {
			t.Fatalf("a decoded shard does not encode: %v", err)
		}
		l2, err := decodeShard(again)
		if err != nil || len(l2.Events) != len(l.Events) {
			t.Fatalf("re-encoded shard %s: %v, %d events, want %d", again, err, len(l2.Events), len(l.Events))
		}
	})
}

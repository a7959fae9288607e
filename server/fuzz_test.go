package server

import (
	"errors"
	"testing"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/internal/store"
	"beacon.dev/beacon/registry"
)

// FuzzRegisterJSON drives arbitrary request bodies through the same decode
// and validation the HTTP API uses: no panic, every rejection is a field
// error or a decoding error, and every accepted instance stores and loads
// back unchanged.
func FuzzRegisterJSON(f *testing.F) {
	f.Add(`{"instance":{"service":"orders","id":"o-1","address":"127.0.0.1","port":9001}}`)
	f.Add(`{"instance":{"namespace":"prod","service":"orders","id":"o-1","address":"::1","port":1,"weight":10,"zone":"a","tags":["x"],"metadata":{"k":"v"},"status":"STATUS_DRAINING"},"sessionId":"5"}`)
	f.Add(`{"instance":{"service":"orders","id":"o-1","address":"127.0.0.1","port":70000}}`)
	f.Add(`{"instance":`)
	f.Add(`{"wieght":1}`)
	codec := strictJSON{"json"}
	layout := store.Layout{Prefix: store.DefaultPrefix}
	f.Fuzz(func(t *testing.T, body string) {
		var req beaconv1.RegisterRequest
		if err := codec.Unmarshal([]byte(body), &req); err != nil {
			return
		}
		in, err := instanceForRegister(&req)
		if err != nil {
			if !errors.Is(err, registry.ErrInvalid) {
				t.Fatalf("rejection %v is not ErrInvalid", err)
			}
			return
		}
		back, err := layout.DecodeInstance(layout.InstanceKey(in.Key()), store.EncodeInstance(in), 0)
		if err != nil {
			t.Fatalf("an accepted instance does not load back: %v", err)
		}
		if back.Port != in.Port || back.Address != in.Address || back.SessionID != in.SessionID || len(back.Metadata) != len(in.Metadata) {
			t.Fatalf("stored %+v, loaded %+v", in, back)
		}
	})
}

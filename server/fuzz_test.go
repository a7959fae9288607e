package server

import (
	"errors"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/internal/store"
	"beacon.dev/beacon/internal/wire"
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
	// Checks of every kind, with every field set: without them the fuzzer
	// never reached the checks' validation (a NaN jitter passed it and
	// panicked the encoder).
	inst := func(fields string) string {
		return `{"instance":{"service":"orders","id":"o-1","address":"127.0.0.1","port":9001` + fields + `}}`
	}
	for _, c := range []string{
		`{"kind":"CHECK_KIND_HTTP"}`,
		`{"name":"ready","kind":"CHECK_KIND_HTTP","target":"https://10.0.0.1:8443/readyz","headers":{"Host":"orders","X-Token":"t"},"expectStatus":"204","bodyContains":"ok","interval":"1s","timeout":"0.5s","jitter":0.25,"failuresBeforeCritical":2,"successesBeforePassing":3,"deregisterCriticalAfter":"60s"}`,
		`{"kind":"CHECK_KIND_HTTP","expect_status":"3xx","body_contains":"","headers":{}}`,
		`{"kind":"CHECK_KIND_TCP","target":"[::1]:9001","interval":"0.1s","timeout":"0.1s","jitter":0.5}`,
		`{"kind":"CHECK_KIND_GRPC","grpcService":"orders.v1.Orders","target":"orders.internal:9001","jitter":0}`,
		`{"kind":"CHECK_KIND_TTL","interval":"2s","status":"HEALTH_WARNING","output":"started","since":"2026-01-01T00:00:00Z"}`,
		`{"kind":"CHECK_KIND_TCP","jitter":"NaN"}`,
		`{"kind":"CHECK_KIND_TCP","jitter":"Infinity"}`,
		`{"kind":"CHECK_KIND_TCP","jitter":"-Infinity"}`,
		`{"kind":"CHECK_KIND_TCP","jitter":-0}`,
		`{"kind":"CHECK_KIND_TCP","jitter":1e-320}`,
		`{"kind":"CHECK_KIND_TCP","jitter":"0.5"}`,
		`{"kind":"CHECK_KIND_TCP","interval":"3600s","timeout":"3600s","deregisterCriticalAfter":"3600s"}`,
		`{"kind":"CHECK_KIND_TCP","failuresBeforeCritical":-1}`,
		`{"kind":"CHECK_KIND_UNSPECIFIED"}`,
		`{"kind":7}`,
	} {
		f.Add(inst(`,"checks":[` + c + `]`))
	}
	f.Add(inst(`,"checks":[{"kind":"CHECK_KIND_TCP"},{"kind":"CHECK_KIND_HTTP"},{"kind":"CHECK_KIND_GRPC"},{"kind":"CHECK_KIND_TTL"}]`))
	f.Add(inst(`,"checks":[]`))
	f.Add(inst(`,"tags":[],"metadata":{}`))
	f.Add(inst(`,"weight":10000,"zone":"eu-1","version":"v1.2.3 (build 7)","tags":["ü","a b"],"metadata":{"k":"","app.kubernetes.io/name":"x"}`))
	f.Add(`{"instance":{"service":"orders","id":"..","address":"999.1.1.1","port":1}}`)
	f.Add(`{"instance":{"service":"orders","id":".","address":"1.2.3","port":1}}`)
	f.Add(`{"instance":{"service":"orders","id":"o","address":"-a-.b","port":1}}`)
	f.Add(`{"instance":{"service":"orders","id":"o","address":"fe80::1%eth0","port":1}}`)
	f.Add(`{"instance":{"service":"orders","id":"o","address":"orders.internal.","port":1,"sessionId":"7"},"sessionId":"7"}`)
	f.Add(`{"instance":{"service":"orders","id":"o","address":"h","port":1,"status":"STATUS_OUT_OF_SERVICE","health":"HEALTH_CRITICAL"}}`)
	f.Add(`{"instance":{"SERVICE":"orders","id":"o","address":"h","port":1}}`)
	f.Add(`{"instance":{"service":"orders","service":"other","id":"o","address":"h","port":1}}`)
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
			var fe *registry.FieldError
			if !errors.As(err, &fe) || fe.Field == "" {
				t.Fatalf("rejection %v names no field", err)
			}
			return
		}
		// What the handler stores loads back the same (the revision is
		// etcd's; empty and nil lists are one thing on the wire).
		back, err := layout.DecodeInstance(layout.InstanceKey(in.Key()), store.EncodeInstance(in), in.Revision)
		if err != nil {
			t.Fatalf("an accepted instance does not load back: %v", err)
		}
		if diff := cmp.Diff(in, back, cmpopts.EquateEmpty()); diff != "" {
			t.Fatalf("stored and loaded back differ (-stored +loaded):\n%s", diff)
		}
		// And the API can send it back to clients.
		if _, err := codec.Marshal(wire.InstanceToProto(back)); err != nil {
			t.Fatalf("an accepted instance does not encode for clients: %v", err)
		}
	})
}

// FuzzKVTxnJSON drives arbitrary KV transaction bodies through the HTTP
// API's decoding and the KV validation: no panic, every rejection names a
// field, and every accepted transaction has valid, distinct keys within
// the limits.
func FuzzKVTxnJSON(f *testing.F) {
	f.Add(`{"ops":[{"type":"TYPE_PUT","key":"app/price","value":"MTA="}]}`)
	f.Add(`{"namespace":"prod","ops":[{"type":"TYPE_CHECK","key":"a","expectedRevision":"0"},{"type":"TYPE_DELETE","key":"b","expected_revision":"7"}]}`)
	f.Add(`{"ops":[{"type":"TYPE_PUT","key":"a"},{"type":"TYPE_PUT","key":"a"}]}`)
	f.Add(`{"ops":[{"type":"TYPE_DELETE","key":"a","value":"eA=="}]}`)
	f.Add(`{"ops":[{"type":"TYPE_CHECK","key":"a"}]}`)
	f.Add(`{"ops":[{"type":"TYPE_PUT","key":"/a"},{"type":9,"key":"b"}]}`)
	f.Add(`{"ops":[{"type":"TYPE_PUT","key":"a//b","expectedRevision":"-1"}]}`)
	f.Add(`{"ops":[]}`)
	f.Add(`{"ops":[{"type":"TYPE_PUT","key":"k","value":"` + strings.Repeat("QUFB", 400) + `"}]}`)
	codec := strictJSON{"json"}
	const maxOps, maxValue = 4, 1024
	f.Fuzz(func(t *testing.T, body string) {
		var req beaconv1.KVTxnRequest
		if err := codec.Unmarshal([]byte(body), &req); err != nil {
			return
		}
		ops, put, err := kvOps(req.GetOps(), false, maxOps, maxValue)
		if err != nil {
			var fe *registry.FieldError
			if !errors.As(err, &fe) || fe.Field == "" {
				t.Fatalf("rejection %v names no field", err)
			}
			return
		}
		if len(ops) == 0 || len(ops) > maxOps {
			t.Fatalf("accepted %d operations", len(ops))
		}
		keys, size := map[string]bool{}, 0
		for _, op := range ops {
			if registry.ValidateKey("key", op.Key) != nil || keys[op.Key] {
				t.Fatalf("accepted key %q (twice: %v)", op.Key, keys[op.Key])
			}
			keys[op.Key] = true
			size += len(op.Value)
		}
		if size > maxValue || len(put) > len(ops) {
			t.Fatalf("accepted %d bytes of values, %d puts", size, len(put))
		}
	})
}

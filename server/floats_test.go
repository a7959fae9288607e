package server_test

import (
	"encoding/json"
	"math"
	"net/http"
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/reflect/protoreflect"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/server"
)

// floatFields lists the float and double fields reachable from the
// requests of every service in the API, as "Request.path.to.field".
func floatFields() []string {
	var out []string
	var walk func(prefix string, md protoreflect.MessageDescriptor, seen map[protoreflect.FullName]bool)
	walk = func(prefix string, md protoreflect.MessageDescriptor, seen map[protoreflect.FullName]bool) {
		if seen[md.FullName()] {
			return
		}
		seen[md.FullName()] = true
		defer delete(seen, md.FullName())
		fs := md.Fields()
		for i := range fs.Len() {
			f := fs.Get(i)
			switch {
			case f.Kind() == protoreflect.FloatKind || f.Kind() == protoreflect.DoubleKind:
				out = append(out, prefix+"."+string(f.Name()))
			case f.IsMap():
				if v := f.MapValue(); v.Kind() == protoreflect.FloatKind || v.Kind() == protoreflect.DoubleKind {
					out = append(out, prefix+"."+string(f.Name())+"[]")
				} else if v.Message() != nil {
					walk(prefix+"."+string(f.Name())+"[]", v.Message(), seen)
				}
			case f.Message() != nil:
				walk(prefix+"."+string(f.Name()), f.Message(), seen)
			}
		}
	}
	svcs := beaconv1.File_beacon_v1_registry_proto.Services()
	for i := range svcs.Len() {
		ms := svcs.Get(i).Methods()
		for j := range ms.Len() {
			in := ms.Get(j).Input()
			walk(string(in.Name()), in, map[protoreflect.FullName]bool{})
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// Finding 7: a NaN or infinite float, which JSON clients can send as
// "NaN", "Infinity" or "-Infinity", is refused with 400 / invalid_argument
// naming the field, and nothing is written. A NaN jitter used to pass
// validation (every comparison with NaN is false) and panic the handler
// when the record was encoded, so the client saw a reset stream. The test
// covers every float field of every request: a new one fails it until it
// is added here.
func TestNonFiniteFloatsAreRefused(t *testing.T) {
	type call struct {
		method, body string // body holds %v where the value goes
		field        string // what the error must name
		batch        bool   // answered per instance: 200 with the refusal in results[0]
	}
	withCheck := func(check string) string {
		return `{"instance":{"service":"orders","id":"o-1","address":"127.0.0.1","port":9001,"checks":[` + check + `]}}`
	}
	covered := map[string][]call{
		"RegisterRequest.instance.checks.jitter": {
			{"Register", withCheck(`{"kind":"CHECK_KIND_TCP","jitter":%v}`), "checks[0].jitter", false},
			{"Register", withCheck(`{"kind":"CHECK_KIND_HTTP","jitter":%v}`), "checks[0].jitter", false},
			{"Register", withCheck(`{"kind":"CHECK_KIND_GRPC","jitter":%v}`), "checks[0].jitter", false},
			{"Register", withCheck(`{"kind":"CHECK_KIND_TTL","jitter":%v}`), "checks[0].jitter", false},
			{"Register", withCheck(`{"kind":"CHECK_KIND_TCP"},{"kind":"CHECK_KIND_TCP","name":"b","jitter":%v}`), "checks[1].jitter", false},
			{"Register", `{"sessionId":"0","instance":{"service":"orders","id":"o-2","address":"::1","port":1,"checks":[{"kind":"CHECK_KIND_TCP","jitter":%v}]}}`, "checks[0].jitter", false},
		},
		"RegisterBatchRequest.instances.checks.jitter": {
			{"RegisterBatch", `{"instances":[{"service":"orders","id":"o-3","address":"127.0.0.1","port":9001,"checks":[{"kind":"CHECK_KIND_TCP","jitter":%v}]}]}`, "checks[0].jitter", true},
		},
		"SetServiceConfigRequest.protection_threshold": {
			{"SetServiceConfig", `{"service":"orders","protection_threshold":%v}`, "protection_threshold", false},
			{"SetServiceConfig", `{"service":"orders","protectionThreshold":%v,"use_default":true}`, "protection_threshold", false},
		},
	}
	var keys []string
	for k := range covered {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	if got := floatFields(); !slices.Equal(got, keys) {
		t.Fatalf("float fields of the API's requests = %v, this test covers %v: add the new ones (and check them for NaN and ±Inf)", got, keys)
	}

	srv := startServer(t)
	good := `{"instance":{"service":"orders","id":"o-1","address":"127.0.0.1","port":9001,"checks":[{"kind":"CHECK_KIND_TCP","jitter":0.2}]}}`
	if code, body := post(t, srv, "Register", good); code != http.StatusOK {
		t.Fatalf("Register(good) = %d %s", code, body)
	}
	if code, body := post(t, srv, "SetServiceConfig", `{"service":"orders","protection_threshold":0.5}`); code != http.StatusOK {
		t.Fatalf("SetServiceConfig(0.5) = %d %s", code, body)
	}
	list := `{"service":"orders","all":true}`
	_, before := post(t, srv, "ListInstances", list)

	for _, field := range keys {
		for _, c := range covered[field] {
			for _, v := range []string{`"NaN"`, `"Infinity"`, `"-Infinity"`} {
				body := strings.Replace(c.body, "%v", v, 1)
				code, resp := post(t, srv, c.method, body)
				if c.batch {
					var r struct {
						Results []struct {
							ErrorCode int
							Error     string
						}
					}
					_ = json.Unmarshal([]byte(resp), &r)
					if code != http.StatusOK || len(r.Results) != 1 || r.Results[0].ErrorCode != 3 || !strings.Contains(r.Results[0].Error, c.field) {
						t.Errorf("%s(%s) = %d %s, want the instance refused (3, invalid_argument) naming %s", c.method, body, code, resp, c.field)
					}
					continue
				}
				var e struct{ Code, Message string }
				_ = json.Unmarshal([]byte(resp), &e)
				if code != http.StatusBadRequest || e.Code != "invalid_argument" || !strings.Contains(e.Message, c.field) {
					t.Errorf("%s(%s) = %d %s, want 400 invalid_argument naming %s", c.method, body, code, resp, c.field)
				}
			}
		}
	}
	// The server still answers, and nothing changed: the instance, its
	// check's jitter and the service's threshold are what they were.
	if _, after := post(t, srv, "ListInstances", list); after != before {
		t.Errorf("refused requests changed the stored state:\nbefore %s\nafter  %s", before, after)
	}
	if !strings.Contains(before, `"jitter":0.2`) || !strings.Contains(before, `"protectionThreshold":0.5`) {
		t.Errorf("ListInstances = %s, want jitter 0.2 and protection threshold 0.5", before)
	}
	if _, body := post(t, srv, "ListInstances", `{"service":"orders","all":true,"namespace":"default"}`); strings.Contains(body, `"o-2"`) || strings.Contains(body, `"o-3"`) {
		t.Errorf("ListInstances = %s, o-2 or o-3 was registered", body)
	}
}

// --protection-threshold refuses NaN and ±Inf like any other value out of
// [0, 1].
func TestConfigRefusesNonFiniteProtectionThreshold(t *testing.T) {
	for _, f := range []float64{math.NaN(), math.Inf(1), math.Inf(-1)} {
		cfg := server.NewConfig()
		cfg.ProtectionThreshold = f
		if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "--protection-threshold") {
			t.Errorf("Validate(--protection-threshold %v) = %v, want an error naming --protection-threshold", f, err)
		}
	}
}

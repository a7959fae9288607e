package saga

import (
	"encoding/json"
	"testing"

	"beacon.dev/beacon/client"
)

// FuzzDecodeState: any stored bytes decode into a state or an error,
// never a panic; a state that decodes encodes and decodes to itself, and
// says where its step points without going out of its steps.
func FuzzDecodeState(f *testing.F) {
	f.Add([]byte(`{"saga":"order","id":"o-1","status":"running","step":1,"steps":["reserve","charge"],"input":"e30=","outputs":{"reserve":"MQ=="},"history":[{"step":"reserve","what":"done"}]}`))
	f.Add([]byte(`{"saga":"order","id":"o-1","status":"compensating","step":-1,"steps":["a"]}`))
	f.Add([]byte(`{}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, b []byte) {
		st, err := decodeState(client.KeyValue{Key: "sagas/runs/order/o-1", Value: b, ModRevision: 7})
		if err != nil {
			return
		}
		_ = st.StepName() // must not index out of Steps
		_ = st.Status.Finished()
		again, err := json.Marshal(&st)
		if err != nil {
			t.Fatalf("a decoded state does not encode: %v", err)
		}
		st2, err := decodeState(client.KeyValue{Key: st.Key, Value: again, ModRevision: 7})
		if err != nil {
			t.Fatalf("a re-encoded state does not decode: %v", err)
		}
		if st2.Saga != st.Saga || st2.ID != st.ID || st2.Step != st.Step || len(st2.Steps) != len(st.Steps) || st2.Status != st.Status {
			t.Fatalf("round trip changed the state: %+v → %+v", st, st2)
		}
	})
}

package config

import (
	"testing"
)

// The reused decoder decodes each value as a fresh one does: strictly,
// one value, and an error does not spoil the values after it.
func TestJSONDecoderReusedGivesWhatAFreshOneGives(t *testing.T) {
	type flag struct {
		Port int    `json:"port"`
		Name string `json:"name"`
	}
	var j jsonDecoder[flag]
	for i, in := range []string{
		`{"port":1}`,
		`  {"port":2,"name":"a"}  `,
		`{"port":3,"extra":true}`,
		`{"port":4}{"port":5}`,
		`{"port":6} x`,
		``,
		`   `,
		`{"port":7`,
		`{"port":8}]`,
		`{"port":"nine"}`,
		`{"port":10,"name":"b"}`,
		"\n{\"port\":11}\n",
	} {
		got, gotErr := j.decode([]byte(in))
		want, wantErr := decodeJSON[flag]([]byte(in))
		if got != want || (gotErr == nil) != (wantErr == nil) || (gotErr != nil && gotErr.Error() != wantErr.Error()) {
			t.Errorf("value %d %q: reused decoder gave %+v, %v; a fresh one %+v, %v", i, in, got, gotErr, want, wantErr)
		}
	}
}

// The point of reusing it: fewer allocations per value than a fresh one.
func TestJSONDecoderReusedAllocatesLess(t *testing.T) {
	type flag struct {
		Port int `json:"port"`
	}
	var j jsonDecoder[flag]
	data := []byte(`{"port":12345}`)
	reused := testing.AllocsPerRun(100, func() { _, _ = j.decode(data) })
	fresh := testing.AllocsPerRun(100, func() { _, _ = decodeJSON[flag](data) })
	if reused >= fresh {
		t.Errorf("%v allocations per value reused, %v fresh", reused, fresh)
	}
	t.Logf("%v allocations per value reused, %v fresh", reused, fresh)
}

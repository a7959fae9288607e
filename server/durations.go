package server

import (
	"bytes"
	"encoding/json"
	"strconv"
	"strings"
	"time"

	"google.golang.org/protobuf/reflect/protoreflect"
)

// goDurations rewrites, in a JSON request body for msg, every duration
// field written the Go way ("10ms", "1m30s") into protobuf's JSON form
// (seconds with an "s": "0.010s"), so that both spellings are accepted.
// It reports false, leaving the body to protojson's own error, when the
// body is not a JSON object or nothing needed rewriting.
func goDurations(body []byte, msg protoreflect.MessageDescriptor) ([]byte, bool) {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, false
	}
	if !rewriteDurations(v, msg) {
		return nil, false
	}
	out, err := json.Marshal(v)
	if err != nil {
		return nil, false
	}
	return out, true
}

// rewriteDurations walks v (decoded JSON) along msg's fields.
func rewriteDurations(v any, msg protoreflect.MessageDescriptor) bool {
	obj, ok := v.(map[string]any)
	if !ok {
		return false
	}
	changed := false
	fields := msg.Fields()
	for key, val := range obj {
		fd := fields.ByJSONName(key)
		if fd == nil {
			fd = fields.ByTextName(key)
		}
		if fd == nil || fd.Message() == nil {
			continue
		}
		if fd.IsMap() {
			if fd.MapValue().Message() == nil {
				continue
			}
			if m, ok := val.(map[string]any); ok {
				for k, e := range m {
					if r, ok := rewriteOne(e, fd.MapValue().Message()); ok {
						m[k], changed = r, true
					}
				}
			}
			continue
		}
		if fd.IsList() {
			if list, ok := val.([]any); ok {
				for i, e := range list {
					if r, ok := rewriteOne(e, fd.Message()); ok {
						list[i], changed = r, true
					}
				}
			}
			continue
		}
		if r, ok := rewriteOne(val, fd.Message()); ok {
			obj[key], changed = r, true
		}
	}
	return changed
}

// rewriteOne rewrites one value of message type md: a Go duration string
// when md is google.protobuf.Duration, the fields of a nested message
// otherwise (in place; the returned value is then v itself).
func rewriteOne(v any, md protoreflect.MessageDescriptor) (any, bool) {
	if md.FullName() == "google.protobuf.Duration" {
		s, ok := v.(string)
		if !ok || validProtoDuration(s) {
			return nil, false
		}
		d, err := time.ParseDuration(s)
		if err != nil {
			return nil, false
		}
		return strconv.FormatFloat(d.Seconds(), 'f', -1, 64) + "s", true
	}
	return v, rewriteDurations(v, md)
}

// validProtoDuration: protobuf's own form, a decimal number of seconds
// and "s".
func validProtoDuration(s string) bool {
	num, ok := strings.CutSuffix(s, "s")
	if !ok {
		return false
	}
	_, err := strconv.ParseFloat(num, 64)
	return err == nil && !strings.ContainsAny(num, "eEnN+")
}

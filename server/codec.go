package server

import (
	"fmt"
	"strings"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// strictJSON is the JSON codec for the Connect protocol. Unlike connect's
// default it rejects unknown fields: a misspelt "wieght" in a hand-written
// request must fail loudly rather than register weight 100.
type strictJSON struct{ name string }

func (c strictJSON) Name() string { return c.name }

func (strictJSON) Marshal(m any) ([]byte, error) {
	msg, ok := m.(proto.Message)
	if !ok {
		return nil, fmt.Errorf("json: %T is not a proto.Message", m)
	}
	return protojson.MarshalOptions{}.Marshal(msg)
}

func (strictJSON) Unmarshal(b []byte, m any) error {
	msg, ok := m.(proto.Message)
	if !ok {
		return fmt.Errorf("json: %T is not a proto.Message", m)
	}
	if len(b) == 0 {
		// An empty body is the empty message, as in connect's own codec.
		return nil
	}
	err := protojson.UnmarshalOptions{}.Unmarshal(b, msg)
	if err != nil && strings.Contains(err.Error(), "google.protobuf.Duration") {
		// "10ms" the Go way: accepted too, so that the obvious input
		// reaches validation (which names the field and its limit).
		if fixed, ok := goDurations(b, msg.ProtoReflect().Descriptor()); ok {
			proto.Reset(msg)
			if err2 := (protojson.UnmarshalOptions{}).Unmarshal(fixed, msg); err2 == nil {
				return nil
			}
		}
		return fmt.Errorf("%w (a duration is written \"10s\", \"0.5s\" or the Go way, \"10ms\", \"1m30s\")", err)
	}
	return err
}

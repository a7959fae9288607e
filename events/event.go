package events

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"time"
)

// Event is one message on a topic.
type Event struct {
	Topic string
	// Key orders events: those with the same key go to one partition and
	// are handled one after the other, in publishing order.
	Key   []byte
	Value []byte
	// ID names the event across redeliveries and republishing (header
	// HeaderID); Publish fills it in when empty.
	ID      string
	Headers []Header

	// Set on consumed events.
	Partition int32
	Offset    int64
	Time      time.Time
	// Attempt is 1 for the first delivery to the handler, 2 for its first
	// retry, and so on.
	Attempt int
}

// Header is a Kafka record header.
type Header struct {
	Key   string
	Value []byte
}

// Header returns the value of the first header named key.
func (e *Event) Header(key string) ([]byte, bool) {
	for _, h := range e.Headers {
		if h.Key == key {
			return h.Value, true
		}
	}
	return nil, false
}

// Headers beacon writes.
const (
	// HeaderID carries Event.ID.
	HeaderID = "beacon-event-id"
	// Dead letters carry where the event came from and why it failed.
	HeaderDLQTopic     = "beacon-dlq-topic"
	HeaderDLQPartition = "beacon-dlq-partition"
	HeaderDLQOffset    = "beacon-dlq-offset"
	HeaderDLQAttempts  = "beacon-dlq-attempts"
	HeaderDLQError     = "beacon-dlq-error"
	// The dead letter's value was too large for its topic and was left
	// out; the header holds its length.
	HeaderDLQValueDropped = "beacon-dlq-value-dropped"
)

// Limits on what Publish accepts (and what a consumer accepts as an event
// id). The default event size fits in franz-go's default batch, itself
// under Kafka's default message.max.bytes (1,048,588).
const (
	DefaultMaxEventBytes = 960 << 10
	MaxIDBytes           = 128
	MaxHeaders           = 64
	MaxHeaderKeyBytes    = 256
)

// ErrInvalidEvent wraps every refusal of an event's contents: its field
// and limit follow in the message. Trying again does not help.
var ErrInvalidEvent = errors.New("events: invalid event")

// newID returns a random 128-bit event id in hex.
func newID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand)
	return hex.EncodeToString(b[:])
}

// checkID validates an event id: 1 to MaxIDBytes printable ASCII bytes.
func checkID(id string) error {
	if id == "" || len(id) > MaxIDBytes {
		return fmt.Errorf("%w: %s: %d bytes, must be 1 to %d", ErrInvalidEvent, HeaderID, len(id), MaxIDBytes)
	}
	for i := 0; i < len(id); i++ {
		if id[i] < 0x21 || id[i] > 0x7e {
			return fmt.Errorf("%w: %s: byte %d is not printable ASCII", ErrInvalidEvent, HeaderID, i)
		}
	}
	return nil
}

// size is the event's size as Publish counts it against the limit.
func (e *Event) size() int {
	n := len(e.Key) + len(e.Value) + len(e.ID)
	for _, h := range e.Headers {
		n += len(h.Key) + len(h.Value)
	}
	return n
}

// check validates an event for Publish against maxBytes.
func (e *Event) check(maxBytes int) error {
	switch {
	case e.Topic == "":
		return fmt.Errorf("%w: topic: empty", ErrInvalidEvent)
	case len(e.Headers) > MaxHeaders:
		return fmt.Errorf("%w: headers: %d, at most %d (MaxHeaders)", ErrInvalidEvent, len(e.Headers), MaxHeaders)
	case e.size() > maxBytes:
		return fmt.Errorf("%w: event on %q: %d bytes, at most %d (max event bytes)", ErrInvalidEvent, e.Topic, e.size(), maxBytes)
	}
	for i, h := range e.Headers {
		if h.Key == "" || len(h.Key) > MaxHeaderKeyBytes {
			return fmt.Errorf("%w: headers[%d].key: %d bytes, must be 1 to %d", ErrInvalidEvent, i, len(h.Key), MaxHeaderKeyBytes)
		}
		if h.Key == HeaderID {
			return fmt.Errorf("%w: headers[%d]: %s is set from Event.ID", ErrInvalidEvent, i, HeaderID)
		}
	}
	return checkID(e.ID)
}

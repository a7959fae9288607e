// Package events is beacon's event processing on Kafka: a Producer that
// publishes with keys, headers, an event id and the caller's trace
// context; a Consumer that handles a consumer group's events at least
// once — committing only what its handler finished, in order per key, on
// a few workers per partition, retries paid from a budget, a dead-letter topic
// for events that keep failing and a drain on shutdown; and KVDedup, which
// makes a handler's effect in beacon KV happen exactly once per event.
//
// It speaks only the Kafka protocol (github.com/twmb/franz-go): the tests
// and the demo run franz-go's in-process cluster (kfake), a real Kafka
// cluster is a list of seed brokers (docs/events.md).
package events

// Package saga runs orchestrated sagas: a business transaction across
// services as steps, each an action with a compensation, taken forward
// until done or back until compensated — never both, never neither.
//
// A saga's state lives in beacon KV (one key per saga, written after
// every step). Sagas are spread over shards; each shard is led by one
// orchestrator at a time (a beacon election on a session), and every
// write of a saga's state carries the shard's fencing token, so an
// orchestrator paused past its session (GC, SIGSTOP, a partition) cannot
// overwrite the progress of the one that took over. An orchestrator that
// dies is replaced by another, which takes every saga of its shards on
// from the last recorded step. docs/sagas.md has the design and its
// limits.
package saga

// Package bench holds beacon's benchmarks. Each measures beacon beside its
// anchor — raw etcd on the same embedded etcd — in the same run and
// reports the ratio. Run them with scripts/bench.sh (make bench).
package bench

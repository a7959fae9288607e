#!/usr/bin/env bash
# beacon's benchmarks, each beside its raw-etcd anchor in the same run.
# Results go to bench/results/<timestamp>.txt (benchstat-readable).
# Loopback only; every benchmark is bounded in count and time.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
out="bench/results/$(date -u +%Y%m%dT%H%M%SZ).txt"
{
	echo "# $(uname -srm), $(nproc) cores, $(go version)"
	go test -run '^$' -bench 'Propagation' -benchtime "${PROPAGATION_CHANGES:-100}x" -timeout 30m ./bench
	go test -run '^$' -bench 'RegisterThroughput' -benchtime 8000x -count "${COUNT:-5}" -timeout 30m ./bench
	go test -run '^$' -bench 'Sessions|MemoryPerInstance' -benchtime 1x -timeout 30m ./bench
} 2>&1 | tee "$out"
echo "results: $out"

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
	# 200 changes a run: with 100, a p99 is the run's slowest change.
	go test -run '^$' -bench 'BenchmarkPropagation$' -benchtime "${PROPAGATION_CHANGES:-200}x" -count "${COUNT:-5}" -timeout 60m ./bench
	go test -run '^$' -bench 'RegisterThroughput' -benchtime 8000x -count "${COUNT:-5}" -timeout 30m ./bench
	# The config center: KV puts and KV watch propagation beside raw etcd,
	# and locks beside etcd's concurrency.Mutex.
	go test -run '^$' -bench 'KVPut' -benchtime 4000x -count "${COUNT:-5}" -timeout 30m ./bench
	go test -run '^$' -bench 'KVWatchPropagation' -benchtime 100x -count "${COUNT:-5}" -timeout 60m ./bench
	go test -run '^$' -bench 'BenchmarkLock' -benchtime 400x -count "${COUNT:-5}" -timeout 30m ./bench
	go test -run '^$' -bench 'Sessions|MemoryPerInstance' -benchtime 1x -timeout 30m ./bench
	# Scale: 100k instances in 10k sessions and 5,000 watchers on one
	# server process, beside the same fleet on raw etcd (about 4.5 minutes
	# a run: both watch heartbeats, each with its anchor).
	go test -run '^$' -bench 'BenchmarkScale$' -benchtime 1x -count "${COUNT:-5}" -timeout 90m ./bench
	# Client data plane: picks, rebuilds, and the call chain beside
	# gobreaker v2 and failsafe-go (a module of its own, so beacon does not
	# depend on them).
	go test -run '^$' -bench 'Pick|Rebuild' -benchmem -count "${COUNT:-5}" ./balancer
	# Calls through the integrations beside grpc-go round_robin and a plain
	# http.Transport, and the drain of a real process on SIGTERM.
	go test -run '^$' -bench 'GRPCUnary|HTTPCalls' -benchtime 40000x -count "${COUNT:-5}" -timeout 30m ./bench
	go test -run '^$' -bench 'RoundTripOverhead' -benchmem -count "${COUNT:-5}" ./beaconhttp
	# Tracing's cost per call: off, beacon's spans, otelgrpc's, both.
	go test -run '^$' -bench 'TracingCost' -benchmem -count "${COUNT:-5}" ./beacongrpc
	go test -run '^$' -bench 'DrainOnSIGTERM' -benchtime 20x -timeout 30m ./bench
	# Server-side health checks: 1,000 checks at 1 s, detection time.
	go test -run '^$' -bench 'Checks1000|CheckDetection' -benchtime 1x -timeout 30m ./bench
	# xDS: a registration reaching 100 ADS clients, beside 100 SDK watchers.
	go test -run '^$' -bench 'BenchmarkXDSPropagation$' -benchtime 100x -count "${COUNT:-5}" -timeout 30m ./bench
	# The DNS interface: dnsperf's SRV queries against 1,000 services beside
	# the same server's ListInstances over HTTP (needs Debian's dnsperf).
	go test -run '^$' -bench 'BenchmarkDNS$' -benchtime 1x -count "${COUNT:-5}" -timeout 30m ./bench
	# The edge proxy: wrk through beacon proxy, nginx 1.22 and HAProxy 2.6
	# to the same three backends, and a backend SIGKILLed under load
	# (Debian's nginx, haproxy and wrk).
	go test -run '^$' -bench 'BenchmarkProxy$' -benchtime 1x -count "${COUNT:-5}" -timeout 30m ./bench
	go test -run '^$' -bench 'BenchmarkProxyChaos$' -benchtime 1x -count 3 -timeout 30m ./bench
	go test -run '^$' -bench 'ProxyRequest' -benchmem -count "${COUNT:-5}" ./proxy
	# The web console in headless Chromium: first paint, the services
	# table drawn from the API, the assets' size (Debian's chromium).
	go test -run '^$' -bench 'ConsoleFirstPaint' -benchtime 20x -count "${COUNT:-5}" -timeout 30m ./e2e
	# Events: consumer throughput (a no-op handler, and one waiting 1 ms an
	# event) and publish-to-handled latency, beside franz-go used directly,
	# on franz-go's in-process Kafka (kfake).
	go test -run '^$' -bench 'Consume/handler=none' -benchtime 1000000x -count "${COUNT:-5}" ./events
	go test -run '^$' -bench 'Consume/handler=1ms' -benchtime 2000x -count "${COUNT:-5}" ./events
	go test -run '^$' -bench 'PublishToHandled' -benchtime 1000x -count "${COUNT:-5}" ./events
	# Sagas: steps/s beside the same fenced KV writes by hand, and the
	# recovery after an orchestrator's session is lost.
	go test -run '^$' -bench 'SagaSteps' -benchtime 2000x -count "${COUNT:-5}" ./saga
	go test -run '^$' -bench 'SagaRecovery' -benchtime 1x -count "${COUNT:-5}" ./saga
	# Cluster mode: failover (20 kills of the leader's node), the 3-node
	# cluster beside a single node, and 300 clients through a node's death
	# and restart (reconnect spread, return home).
	go test -run '^$' -bench 'ClusterFailover|ClusterVsSingle|ClusterRebalance' -benchtime 1x -timeout 30m ./bench
	# The soak: a normal client beside every hostile client at once, each
	# phase (idle, hostile) -soak.duration long (SOAK, default 10m).
	go test -run '^$' -bench 'Soak' -benchtime 1x -timeout 60m ./bench -soak.duration "${SOAK:-10m}"
	(cd bench/anchors && go test -run '^$' -bench 'Chain' -benchmem -cpu 1,2 -count "${COUNT:-5}" .)
} 2>&1 | tee "$out"
echo "results: $out"

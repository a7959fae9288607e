#!/usr/bin/env bash
# The whole test suite: installs what the tests need (as root, on Debian),
# then go vet and every test with the race detector. Each test package
# checks for leaked goroutines (go.uber.org/goleak) when it finishes.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
	missing=()
	command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
	command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
	if [ ${#missing[@]} -gt 0 ]; then
		echo "installing ${missing[*]} for the external-etcd tests"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
	fi
	# Installed: the Debian etcd 3.4 tests must run, not skip.
	export BEACON_REQUIRE_ETCD=1
fi

go mod download
go vet ./...
# The chaos scorecard's short run starts a dozen processes per scenario;
# it runs alone, after the rest, so neither starves the other of CPU.
go test -race -count=1 -timeout 25m $(go list ./... | grep -v /bench/chaos)
go test -race -count=1 -timeout 10m ./bench/chaos

# The anchor benchmarks live in a module of their own: vet them and run each
# once so they cannot rot.
(cd bench/anchors && go vet . && go test -count=1 -run '^$' -bench Chain -benchtime 1x . >/dev/null)

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
	# Three independent DNS parsers check the DNS interface's answers;
	# dnsperf is its benchmark's load generator.
	command -v dig >/dev/null 2>&1 || missing+=(dnsutils)
	command -v kdig >/dev/null 2>&1 || missing+=(knot-dnsutils)
	command -v drill >/dev/null 2>&1 || missing+=(ldnsutils)
	command -v dnsperf >/dev/null 2>&1 || missing+=(dnsperf)
	# Debian's Prometheus (2.42) discovers targets through the server's
	# http_sd endpoint (/v1/sd/prometheus) in server/promsd_prometheus_test.go.
	command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
	# The edge-proxy benchmark's anchors and load generator; its rig test
	# (bench/proxy_test.go) checks their configurations.
	command -v nginx >/dev/null 2>&1 || missing+=(nginx)
	command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
	command -v wrk >/dev/null 2>&1 || missing+=(wrk)
	# The web console's browser tests (e2e/console_test.go) drive headless
	# Chromium through chromedp.
	command -v chromium >/dev/null 2>&1 || missing+=(chromium)
	if [ ${#missing[@]} -gt 0 ]; then
		echo "installing ${missing[*]} for the external-etcd, DNS, Prometheus, proxy-anchor and console tests"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	fi
	# Installed: the Debian etcd 3.4 tests and the DNS tools' tests must
	# run, not skip.
	export BEACON_REQUIRE_ETCD=1
	export BEACON_REQUIRE_DNS_TOOLS=1
	export BEACON_REQUIRE_PROMETHEUS=1
	export BEACON_REQUIRE_PROXY_ANCHORS=1
	export BEACON_REQUIRE_CHROMIUM=1
fi

# One workspace (go.work) of several modules: the SDK at the root, the
# server, the CLI, each heavy backend, the examples, e2e and the
# benchmarks. `./...` would stop at the root module's edge; the import-path
# pattern takes every module of the workspace.
all=$(go list beacon.dev/beacon/...)
go mod download
go vet $all

# The SDK's tests run the beacon binary as a child process (they may not
# import the server): build it once for every package.
bindir="${XDG_CACHE_HOME:-$HOME/.cache}/beacon-test"
mkdir -p "$bindir"
go build -o "$bindir/beacon" ./cmd/beacon
export BEACON_BIN="$bindir/beacon"

# The real third-party clients of the Consul-compatible API (consul-template,
# Prometheus 3 with consul_sd: Debian's 2.42 above has none), pinned, built
# from source once into the same cache (about 5 minutes cold; a no-op when
# they are there). Installed: their tests (e2e) must run, not skip.
scripts/interop-tools.sh "$bindir"
export BEACON_CONSUL_TEMPLATE_BIN="$bindir/consul-template"
export BEACON_PROMETHEUS_BIN="$bindir/prometheus"
export BEACON_REQUIRE_INTEROP=1

# The chaos scorecard's short run starts a dozen processes per scenario;
# it runs alone, after the rest, so neither starves the other of CPU.
go test -race -count=1 -timeout 25m $(echo "$all" | grep -v -e /bench/chaos -e /bench/anchors)
go test -race -count=1 -timeout 10m ./bench/chaos

# The anchor benchmarks (their own module, for their third-party anchors):
# run each once so they cannot rot.
go test -count=1 -run '^$' -bench Chain -benchtime 1x ./bench/anchors >/dev/null

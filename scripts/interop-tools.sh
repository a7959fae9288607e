#!/usr/bin/env bash
# Installs the real third-party clients that the interop tests run against
# beacon's Consul-compatible API (issue 21), pinned, into a cache directory:
#
#   consul-template   github.com/hashicorp/consul-template v0.41.0 (MPL-2.0)
#   prometheus        github.com/prometheus/prometheus v0.316.0 = Prometheus
#                     3.16.0 (Apache-2.0), built from source with only the
#                     consul service discovery (Debian's prometheus 2.42 has
#                     no consul_sd_configs)
#
# Usage: scripts/interop-tools.sh [DIR]
#   DIR defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/beacon-test, where the
#   tests look when BEACON_CONSUL_TEMPLATE_BIN / BEACON_PROMETHEUS_BIN are
#   unset (scripts/test.sh sets them).
#
# Idempotent: a binary already there at the pinned version (and, for
# Prometheus, the pinned build tags), read from its embedded build info with
# `go version -m`, is left alone, so a warm run takes well under a second.
# A cold run builds both with `nice` (about 4 minutes on 2 cores with the
# module cache empty). Builds go to a temporary directory beside DIR and are
# renamed into place, so an interrupted run never leaves half a binary.
#
# Neither build includes a HashiCorp BSL module: consul-template links the
# MPL-2.0 API modules (consul/api, vault/api, nomad/api of January 2023);
# Prometheus with its optional service discoveries removed (build tag
# remove_all_sd) links consul/api and no nomad. The check below refuses a
# binary that would contain github.com/hashicorp/consul itself or nomad.
set -euo pipefail

consul_template_mod=github.com/hashicorp/consul-template
consul_template_version=v0.41.0
prometheus_mod=github.com/prometheus/prometheus
prometheus_version=v0.316.0 # Prometheus 3.16.0
prometheus_release=3.16.0
# Only the Consul service discovery (file, http and static stay): a third of
# the dependencies, and no Kubernetes, cloud or Nomad discovery.
prometheus_tags=remove_all_sd,enable_consul_sd

dir="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/beacon-test}"
mkdir -p "$dir"

# One installer at a time per directory (two test runs side by side would
# otherwise both build); the beacon binary's own lock is another file.
exec 9>"$dir/interop-tools.lock"
flock 9

# has BIN MOD VERSION [TAGS]: BIN exists and was built from MOD at VERSION
# (and with TAGS).
has() {
	local info
	[ -x "$1" ] || return 1
	info=$(go version -m "$1" 2>/dev/null) || return 1
	grep -qE "^[[:space:]]+mod[[:space:]]+$2[[:space:]]+$3([[:space:]]|\$)" <<<"$info" || return 1
	[ -z "${4:-}" ] || grep -qE "^[[:space:]]+build[[:space:]]+-tags=$4\$" <<<"$info"
}

# no_bsl BIN: fail if BIN links HashiCorp's BSL-licensed code (Consul
# itself, or Nomad other than its MPL-2.0 api module of before August 2023).
no_bsl() {
	local bad
	bad=$(go version -m "$1" | awk '$1 == "dep" || $1 == "=>" { print $2 }' |
		grep -E '^github\.com/hashicorp/(consul|nomad)(/|$)' |
		grep -vE '^github\.com/hashicorp/consul/(api|sdk|proto-public)$' |
		grep -vxF 'github.com/hashicorp/nomad/api' || true)
	if [ -n "$bad" ]; then
		echo "interop-tools: $1 links $bad (not open source): refusing it" >&2
		return 1
	fi
}

tmp=$(mktemp -d "$dir/.interop-build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# build NAME MOD VERSION PKG [TAGS [LDFLAGS]]
build() {
	local name=$1 mod=$2 version=$3 pkg=$4 tags=${5:-} ldflags=${6:-}
	local args=()
	[ -z "$tags" ] || args+=(-tags "$tags")
	[ -z "$ldflags" ] || args+=(-ldflags "$ldflags")
	if has "$dir/$name" "$mod" "$version" "$tags"; then
		return 0
	fi
	echo "interop-tools: building $name ($mod@$version${tags:+, tags $tags}) into $dir" >&2
	local start=$SECONDS
	# GOWORK=off and GOFLAGS=-buildvcs=false: pkg@version builds the
	# module's own go.mod, whatever the directory this runs from.
	GOWORK=off GOFLAGS=-buildvcs=false GOBIN="$tmp" nice -n 19 \
		go install "${args[@]}" "$pkg@$version"
	no_bsl "$tmp/$name"
	has "$tmp/$name" "$mod" "$version" "$tags" || {
		echo "interop-tools: $tmp/$name does not report $mod $version" >&2
		return 1
	}
	mv -f "$tmp/$name" "$dir/$name"
	echo "interop-tools: $name built in $((SECONDS - start))s" >&2
}

build consul-template "$consul_template_mod" "$consul_template_version" \
	"$consul_template_mod"
build prometheus "$prometheus_mod" "$prometheus_version" \
	"$prometheus_mod/cmd/prometheus" "$prometheus_tags" \
	"-X github.com/prometheus/common/version.Version=$prometheus_release -X github.com/prometheus/common/version.Revision=$prometheus_version"

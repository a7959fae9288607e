#!/bin/sh
# Regenerates the Go code for the API. Needs protoc (Debian: protobuf-compiler),
# protoc-gen-go and protoc-gen-connect-go (pinned in this script).
set -eu
cd "$(dirname "$0")/.."
GOBIN="$(go env GOPATH)/bin"
go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
go install connectrpc.com/connect/cmd/protoc-gen-connect-go@v1.21.1
PATH="$GOBIN:$PATH" protoc -I api --go_out=. --go_opt=module=beacon.dev/beacon \
  --connect-go_out=. --connect-go_opt=module=beacon.dev/beacon \
  api/beacon/v1/registry.proto api/beacon/v1/acl.proto api/beacon/v1/kv.proto api/beacon/v1/lock.proto

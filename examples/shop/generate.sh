#!/bin/sh
# Regenerates the demo shop's Go code. Needs protoc (Debian: protobuf-compiler);
# the plugins are pinned here.
set -eu
cd "$(dirname "$0")/../.."
GOBIN="$(go env GOPATH)/bin"
go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.5.1
PATH="$GOBIN:$PATH" protoc -I examples/shop/shoppb --go_out=. --go_opt=module=beacon.dev/beacon \
  --go-grpc_out=. --go-grpc_opt=module=beacon.dev/beacon \
  examples/shop/shoppb/shop.proto

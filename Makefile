.PHONY: test run bench fuzz generate

# The whole test suite (installs Debian packages it needs when run as root).
test:
	./scripts/test.sh

# A beacon server on an embedded etcd, data in ./beacon.data.
run:
	go run ./cmd/beacon server

# Benchmarks with their anchors measured in the same run.
bench:
	./scripts/bench.sh

# A short fuzzing session per fuzz target.
fuzz:
	go test -run '^$$' -fuzz FuzzRegisterJSON -fuzztime 30s ./server
	go test -run '^$$' -fuzz FuzzDecodeInstance -fuzztime 30s ./internal/store
	go test -run '^$$' -fuzz FuzzDecodeSnapshot -fuzztime 30s ./discovery

generate:
	./api/generate.sh

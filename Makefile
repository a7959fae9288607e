.PHONY: test run demo chaos bench fuzz generate

# The whole test suite (installs Debian packages it needs when run as root).
test:
	./scripts/test.sh

# A beacon server on an embedded etcd, data in ./beacon.data. (Built, then
# run: `go run` exits 1 on Ctrl-C even when the program stops cleanly.)
run:
	go build -o bin/beacon ./cmd/beacon
	./bin/beacon server

# The demo shop: a beacon server, the shop's services and a steady load,
# shown live until Ctrl-C.
demo:
	go build -o bin/shop ./examples/shop
	./bin/shop demo

# The chaos scorecard, full length (about 15 minutes): scorecard.md and a
# chart per scenario in docs/chaos.
chaos:
	go build -o bin/chaos ./bench/chaos
	./bin/chaos -out docs/chaos

# Benchmarks with their anchors measured in the same run.
bench:
	./scripts/bench.sh

# A short fuzzing session per fuzz target.
fuzz:
	go test -run '^$$' -fuzz FuzzRegisterJSON -fuzztime 30s ./server
	go test -run '^$$' -fuzz FuzzDecodeInstance -fuzztime 30s ./internal/store
	go test -run '^$$' -fuzz FuzzDecodeSnapshot -fuzztime 30s ./discovery
	go test -run '^$$' -fuzz FuzzMetaKeyRoundTrip -fuzztime 30s ./backend/consul
	go test -run '^$$' -fuzz FuzzApplyDelta -fuzztime 30s ./internal/wire
	go test -run '^$$' -fuzz FuzzKVTxnJSON -fuzztime 30s ./server
	go test -run '^$$' -fuzz FuzzVersionRecord -fuzztime 30s ./server/internal/kv
	go test -run '^$$' -fuzz FuzzDNSQuery -fuzztime 30s ./server/internal/dns
	go test -run '^$$' -fuzz FuzzConsulFilter -fuzztime 30s ./server
	go test -run '^$$' -fuzz FuzzProxyConfig -fuzztime 30s ./proxy
	go test -run '^$$' -fuzz FuzzDecodeRing -fuzztime 30s ./events
	go test -run '^$$' -fuzz FuzzDecodeShard -fuzztime 30s ./events
	go test -run '^$$' -fuzz FuzzDecodeState -fuzztime 30s ./saga

generate:
	./api/generate.sh

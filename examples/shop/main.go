// Command shop is the demo system of examples/: a gateway (HTTP) in front
// of orders (gRPC), which places each order as a saga — stock reserved in
// inventory (gRPC), payment taken by payments (HTTP), the order confirmed,
// or all of it undone. The gateway publishes what users do to Kafka, and
// tracking counts it per user and per item. Every service registers itself with
// beacon through lifecycle.Run, calls the others through the SDK, and
// drains on SIGTERM. Stock and charges live in the shop's own database
// (an etcd of its own, `shop db`), not in the registry, so a registry
// outage leaves the data path alone.
//
//	shop demo                        # everything, a steady load and a live view (make demo)
//	shop db        --dir D --client-addr A --peer-addr P
//	shop inventory --registry R --db A
//	shop payments  --registry R --db A
//	shop orders    --registry R --db A
//	shop gateway   --registry R --listen ADDR [--brokers B]
//	shop broker    --addr B                  # the demo's Kafka broker (kfake, in memory)
//	shop tracking  --registry R --brokers B
//
// orders also takes SIGUSR1 to add --slow latency to every request (a
// slow instance, for the chaos scorecard) and SIGUSR2 to take it away.
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: shop demo|db|inventory|payments|orders|gateway|broker|tracking [flags]")
		os.Exit(2)
	}
	run := map[string]func([]string) error{
		"demo": runDemo, "db": runDB, "inventory": runInventory, "payments": runPayments, "orders": runOrders, "gateway": runGateway,
		"broker": runBroker, "tracking": runTracking,
	}[os.Args[1]]
	if run == nil {
		fmt.Fprintf(os.Stderr, "shop: unknown command %q\n", os.Args[1])
		os.Exit(2)
	}
	if err := run(os.Args[2:]); err != nil {
		fmt.Fprintf(os.Stderr, "shop %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

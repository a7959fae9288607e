package beaconhttp_test

import (
	"net/http"
	"time"

	"beacon.dev/beacon/beaconhttp"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/discovery"
)

// ExampleNewTransport is docs/sdk.md's net/http section, compiled (not
// run: it needs a beacon server).
func ExampleNewTransport() {
	c, err := client.New([]string{"127.0.0.1:8970"})
	if err != nil {
		panic(err)
	}
	defer c.Close()
	cache, err := discovery.New(discovery.FromClient(c, ""), discovery.Config{})
	if err != nil {
		panic(err)
	}
	defer cache.Close()
	if err := serveAndCall(cache, http.NotFoundHandler()); err != nil {
		panic(err)
	}
}

func serveAndCall(cache *discovery.Cache, appHandler http.Handler) error {
	tr, err := beaconhttp.NewTransport(cache, // P2C, outlier detection, retries with a budget
		beaconhttp.WithServices("orders", "payments"), // these hosts are services
		beaconhttp.WithServiceSuffix(".svc"))          // and so is NAME.svc, whatever NAME
	if err != nil {
		return err
	}
	defer tr.Close()
	hc := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	for _, url := range []string{
		"http://orders/v1/orders/42",   // any instance of "orders"
		"http://billing.svc/invoices/", // any instance of "billing"
		"http://postgres/",             // not a service: the base transport, unchanged
	} {
		resp, err := hc.Get(url)
		if err != nil {
			return err
		}
		resp.Body.Close()
	}

	// Server side: probes that follow the lifecycle.
	var health beaconhttp.Health
	srv := &http.Server{Handler: health.Wrap(appHandler)} // /livez /readyz /healthz + in-flight counting
	health.Set(beaconhttp.Serving)                        // once ready; Draining before shutdown
	return srv.ListenAndServe()
}

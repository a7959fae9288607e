package beacongrpc

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"beacon.dev/beacon/balancer"
)

// live holds the balancers of every beacon policy instance, by target
// service, for the metrics.
var live struct {
	sync.Mutex
	bals map[*balancer.Balancer]string
}

func track(target string, b *balancer.Balancer) {
	live.Lock()
	defer live.Unlock()
	if live.bals == nil {
		live.bals = make(map[*balancer.Balancer]string)
	}
	live.bals[b] = target
}

func untrack(b *balancer.Balancer) {
	live.Lock()
	defer live.Unlock()
	delete(live.bals, b)
}

var (
	descEjected    = prometheus.NewDesc("beacon_grpc_outlier_ejected_endpoints", "Endpoints ejected now by the beacon gRPC policies, summed over the connections to a target.", []string{"target"}, nil)
	descEjections  = prometheus.NewDesc("beacon_grpc_outlier_ejections_total", "Ejections by the beacon gRPC policies' live connections to a target.", []string{"target"}, nil)
	descReadmitted = prometheus.NewDesc("beacon_grpc_outlier_readmissions_total", "Re-admissions by the beacon gRPC policies' live connections to a target.", []string{"target"}, nil)
)

type collector struct{}

// Collector reports outlier detection of every beacon LB policy in the
// process, by target service: register it with a Prometheus registry.
// Counters cover the connections open now.
func Collector() prometheus.Collector { return collector{} }

func (collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descEjected
	ch <- descEjections
	ch <- descReadmitted
}

// OutlierStats sums outlier detection over the live connections to a
// target service.
type OutlierStats struct {
	Ready                 int // endpoints the connections route to
	Ejected               int
	Ejections, Readmitted int64
}

// Outliers returns outlier detection figures per target service.
func Outliers() map[string]OutlierStats {
	live.Lock()
	defer live.Unlock()
	out := make(map[string]OutlierStats)
	for b, target := range live.bals {
		d := b.Outlier()
		if d == nil {
			continue
		}
		st := d.Stats()
		sum := out[target]
		sum.Ready += st.Endpoints
		sum.Ejected += len(st.Ejected)
		sum.Ejections += st.Ejections
		sum.Readmitted += st.Readmitted
		out[target] = sum
	}
	return out
}

func (collector) Collect(ch chan<- prometheus.Metric) {
	for target, st := range Outliers() {
		ch <- prometheus.MustNewConstMetric(descEjected, prometheus.GaugeValue, float64(st.Ejected), target)
		ch <- prometheus.MustNewConstMetric(descEjections, prometheus.CounterValue, float64(st.Ejections), target)
		ch <- prometheus.MustNewConstMetric(descReadmitted, prometheus.CounterValue, float64(st.Readmitted), target)
	}
}

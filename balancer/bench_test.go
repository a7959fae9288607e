package balancer_test

import (
	"fmt"
	"testing"

	"beacon.dev/beacon/balancer"
	"beacon.dev/beacon/balancer/maglev"
	"beacon.dev/beacon/balancer/p2c"
	"beacon.dev/beacon/balancer/random"
	"beacon.dev/beacon/balancer/ringhash"
	"beacon.dev/beacon/balancer/roundrobin"
	"beacon.dev/beacon/balancer/wrr"
	"beacon.dev/beacon/endpoint"
)

var builders = []balancer.Builder{
	roundrobin.Builder{}, wrr.Builder{}, random.Builder{}, p2c.Builder{},
	ringhash.Builder{}, maglev.Builder{},
}

func benchEndpoints(n int) []*endpoint.Endpoint {
	w := make([]int, n)
	for i := range w {
		w[i] = 50 + i%7*25 // mixed weights, as in a real fleet
	}
	return endpoints(w...)
}

// BenchmarkPick measures Balancer.Pick + Done (the whole per-call cost of
// the balancer) for every algorithm.
func BenchmarkPick(b *testing.B) {
	for _, bld := range builders {
		for _, n := range []int{3, 100, 1000} {
			b.Run(fmt.Sprintf("%s/n=%d", bld.Name(), n), func(b *testing.B) {
				bal, err := balancer.New(bld, balancer.Config{})
				if err != nil {
					b.Fatal(err)
				}
				defer bal.Close()
				bal.Update(endpoint.Set{Service: "bench", Revision: 1, Endpoints: benchEndpoints(n)})
				b.ReportAllocs()
				b.ResetTimer()
				b.RunParallel(func(pb *testing.PB) {
					info := balancer.PickInfo{HasKey: true}
					for pb.Next() {
						info.Key++
						e, err := bal.Pick(info)
						if err != nil {
							b.Error(err)
							return
						}
						e.Done(nil)
					}
				})
			})
		}
	}
}

// BenchmarkPickerOnly measures Picker.Pick alone, without the balancer's
// in-flight accounting.
func BenchmarkPickerOnly(b *testing.B) {
	for _, bld := range builders {
		for _, n := range []int{3, 100, 1000} {
			b.Run(fmt.Sprintf("%s/n=%d", bld.Name(), n), func(b *testing.B) {
				p := bld.Build(benchEndpoints(n), balancer.BuildOptions{})
				b.ReportAllocs()
				b.RunParallel(func(pb *testing.PB) {
					info := balancer.PickInfo{HasKey: true}
					for pb.Next() {
						info.Key++
						if _, err := p.Pick(info); err != nil {
							b.Error(err)
							return
						}
					}
				})
			})
		}
	}
}

// BenchmarkRebuild measures publishing a new picker when one endpoint of a
// 1,000-endpoint service changes (Update = diff + copy + build).
func BenchmarkRebuild(b *testing.B) {
	for _, bld := range builders {
		b.Run(bld.Name(), func(b *testing.B) {
			bal, err := balancer.New(bld, balancer.Config{})
			if err != nil {
				b.Fatal(err)
			}
			defer bal.Close()
			eps := benchEndpoints(1000)
			bal.Update(endpoint.Set{Revision: 1, Endpoints: eps})
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				next := append([]*endpoint.Endpoint(nil), eps...)
				next[i%1000] = &endpoint.Endpoint{ID: fmt.Sprintf("new-%d", i), Addr: "127.0.0.1:1", Weight: 100}
				bal.Update(endpoint.Set{Revision: int64(i + 2), Endpoints: next})
			}
		})
	}
}

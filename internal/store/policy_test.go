package store_test

import (
	"sync"
	"testing"
	"time"

	"beacon.dev/beacon/registry"
)

// Concurrent updates of different parts of a service's policy lose none
// (each is a compare-and-swap on the record read), a threshold written
// beside it stays its own record, and the defaults delete the record.
func TestUpdateServicePolicyLosesNoPart(t *testing.T) {
	st, cli := newStore(t, "/policy-test/")
	ctx := testCtx(t)
	sk := registry.ServiceKey{Namespace: "default", Service: "orders"}
	if _, err := st.PutServiceConfig(ctx, sk, 0.5); err != nil {
		t.Fatal(err)
	}
	want := registry.ServicePolicy{
		LoadBalancing:    registry.LoadBalancing{Policy: registry.LBRingHash, HashHeader: "x-user"},
		Retry:            registry.RetryPolicy{On: registry.RetryOnUnavailable},
		OutlierDetection: registry.OutlierDetection{FailurePercentageThreshold: 30, Interval: time.Second},
	}
	parts := []func(*registry.ServicePolicy){
		func(p *registry.ServicePolicy) { p.LoadBalancing = want.LoadBalancing },
		func(p *registry.ServicePolicy) { p.Retry = want.Retry },
		func(p *registry.ServicePolicy) { p.OutlierDetection = want.OutlierDetection },
	}
	var wg sync.WaitGroup
	errs := make([]error, len(parts))
	for i, part := range parts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _, errs[i] = st.UpdateServicePolicy(ctx, sk, part)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("UpdateServicePolicy(part %d) = %v", i, err)
		}
	}
	set, _, err := st.GetServiceSettings(ctx, sk)
	if err != nil || set.Policy != want || set.Threshold == nil || *set.Threshold != 0.5 {
		t.Fatalf("GetServiceSettings = %+v, %v; want %+v and the threshold 0.5", set, err, want)
	}
	// An invalid policy writes nothing.
	if _, _, err := st.UpdateServicePolicy(ctx, sk, func(p *registry.ServicePolicy) { p.Retry.NumRetries = 9 }); err == nil {
		t.Fatal("UpdateServicePolicy(9 retries) succeeded")
	}
	if set, _, _ := st.GetServiceSettings(ctx, sk); set.Policy != want {
		t.Fatalf("after a refused update: %+v, want %+v", set.Policy, want)
	}
	// Back to the defaults: no record.
	if _, _, err := st.UpdateServicePolicy(ctx, sk, func(p *registry.ServicePolicy) { *p = registry.ServicePolicy{} }); err != nil {
		t.Fatal(err)
	}
	if resp, err := cli.Get(ctx, st.ServicePolicyKey(sk)); err != nil || len(resp.Kvs) != 0 {
		t.Fatalf("the policy record after the defaults: %v, %v; want none", resp, err)
	}
}

package registry

import "testing"

func TestAvailableFollowsTheProtectionThreshold(t *testing.T) {
	mk := func(status Status, health Health) *Instance {
		return &Instance{Status: status, Health: health}
	}
	s := &Snapshot{Instances: []*Instance{
		mk(StatusUp, HealthPassing), mk(StatusUp, HealthCritical), mk(StatusUp, HealthCritical),
		mk(StatusUp, HealthCritical), mk(StatusDraining, HealthPassing), mk(StatusOutOfService, HealthCritical),
	}}
	for _, tc := range []struct {
		threshold float64
		want      int
		protected bool
	}{
		{0, 1, false},    // off: routable only
		{0.25, 1, false}, // 1 of 4 UP routable = 0.25: not below
		{0.5, 4, true},   // below: every UP instance, unhealthy too; never DRAINING or OUT_OF_SERVICE
		{1, 4, true},
	} {
		s.ProtectionThreshold = tc.threshold
		got, protected := s.Available()
		if len(got) != tc.want || protected != tc.protected {
			t.Errorf("threshold %v: %d instances, protected %v; want %d, %v", tc.threshold, len(got), protected, tc.want, tc.protected)
		}
	}
	empty := &Snapshot{ProtectionThreshold: 0.5}
	if got, protected := empty.Available(); len(got) != 0 || protected {
		t.Errorf("empty service: %v, %v", got, protected)
	}
}

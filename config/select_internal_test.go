package config

import (
	"fmt"
	"testing"

	"beacon.dev/beacon/client"
)

// A rollout's percent picks about that share of identities, the same
// ones every time, and labels must all match.
func TestRolloutSelection(t *testing.T) {
	r := client.Rollout{Percent: 30}
	picked := 0
	for i := range 10000 {
		id := fmt.Sprint("instance-", i)
		if selected(r, nil, id) {
			picked++
		}
		if selected(r, nil, id) != selected(r, nil, id) {
			t.Fatal("selection is not stable")
		}
	}
	if picked < 2700 || picked > 3300 {
		t.Fatalf("30%% picked %d of 10000", picked)
	}
	r = client.Rollout{Labels: map[string]string{"zone": "a", "tier": "web"}}
	for _, tc := range []struct {
		labels map[string]string
		want   bool
	}{
		{map[string]string{"zone": "a", "tier": "web", "x": "y"}, true},
		{map[string]string{"zone": "a"}, false},
		{map[string]string{"zone": "b", "tier": "web"}, false},
		{nil, false},
	} {
		if got := selected(r, tc.labels, "id"); got != tc.want {
			t.Errorf("labels %v: selected %v, want %v", tc.labels, got, tc.want)
		}
	}
}

package server

import "testing"

func TestProgressNotifyOrderedVersions(t *testing.T) {
	for v, want := range map[string]bool{
		"3.4.23": false, "3.4.25": true, "3.5.7": false, "3.5.8": true, "3.6.0": true, "3.7.3": true, "4.0.0": true, "3.3.9": false, "bogus": false,
	} {
		if got := progressNotifyOrdered(v); got != want {
			t.Errorf("progressNotifyOrdered(%q) = %v, want %v", v, got, want)
		}
	}
}

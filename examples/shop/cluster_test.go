package main

import (
	"context"
	"testing"

	"beacon.dev/beacon/examples/shop/shopkit"
)

// newCluster builds the shop and beacon into a test directory and returns
// an empty cluster of them, closed when the test ends; edit (if any) sets
// it up before its registry starts.
func newCluster(ctx context.Context, t *testing.T, edit ...func(*shopkit.Cluster)) *shopkit.Cluster {
	t.Helper()
	moduleDir, err := shopkit.ModuleDir()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	shopBin, beaconBin, err := shopkit.Build(ctx, moduleDir, dir)
	if err != nil {
		t.Fatal(err)
	}
	cl, err := shopkit.NewCluster(shopBin, beaconBin, dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	for _, e := range edit {
		e(cl)
	}
	if err := cl.StartRegistry(ctx); err != nil {
		t.Fatal(err)
	}
	return cl
}

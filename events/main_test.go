package events_test

import (
	"os"
	"testing"

	"go.uber.org/goleak"

	"beacon.dev/beacon/internal/testutil"
)

func TestMain(m *testing.M) {
	// The crash test runs consumers as child processes of this binary.
	if os.Getenv(childEnv) != "" {
		os.Exit(runChild())
	}
	goleak.VerifyTestMain(m, testutil.LeakOptions()...)
}

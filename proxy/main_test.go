package proxy_test

import (
	"testing"

	"go.uber.org/goleak"

	"beacon.dev/beacon/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m, testutil.LeakOptions()...) }

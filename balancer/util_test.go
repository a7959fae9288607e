package balancer_test

import (
	"strings"
	"time"
)

func time_(ns int64) time.Duration { return time.Duration(ns) }

func contains(s, sub string) bool { return strings.Contains(s, sub) }

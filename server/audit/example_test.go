package audit_test

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"beacon.dev/beacon/server/audit"
)

func Example() {
	dir, err := os.MkdirTemp("", "audit-example")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "audit.log")

	l, err := audit.Open(path, audit.Options{})
	if err != nil {
		panic(err)
	}
	for _, e := range []audit.Event{
		{Accessor: "6a1f", Source: "10.0.0.7:51234", Operation: "beacon.v1.RegistryService/Register", Resource: "service:prod/web", Outcome: audit.OutcomeAllowed},
		{Source: "10.0.0.9:40100", Operation: "beacon.v1.RegistryService/Deregister", Resource: "service:prod/web", Outcome: audit.OutcomeDenied, Reason: "no token"},
	} {
		e.Time = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
		if err := l.Record(e); err != nil {
			panic(err) // a real caller counts it and goes on
		}
	}
	if err := l.Close(); err != nil {
		panic(err)
	}

	data, _ := os.ReadFile(path)
	fmt.Print(string(data))
	rep, err := audit.VerifyFiles(path)
	fmt.Printf("lines %d, seq %d..%d, from the start %v, err %v\n", rep.Lines, rep.FirstSeq, rep.LastSeq, rep.FromStart, err)
	// Output:
	// {"seq":1,"prev":"0000000000000000000000000000000000000000000000000000000000000000","time":"2026-03-01T12:00:00Z","accessor":"6a1f","source":"10.0.0.7:51234","operation":"beacon.v1.RegistryService/Register","resource":"service:prod/web","outcome":"allowed"}
	// {"seq":2,"prev":"6c548aa9a23323352a9d5fb73e5332717b81fce573b1dac2c54b2016d4c300ad","time":"2026-03-01T12:00:00Z","accessor":"","source":"10.0.0.9:40100","operation":"beacon.v1.RegistryService/Deregister","resource":"service:prod/web","outcome":"denied","reason":"no token"}
	// lines 2, seq 1..2, from the start true, err <nil>
}

package proxy_test

import (
	"context"
	"fmt"
	"net/http"
	"testing"
	"time"

	"beacon.dev/beacon/endpoint"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
)

// nginx's `backup`: an instance registered with metadata tier=1 gets no
// request while a primary serves, takes every request when the primaries
// drain (none failing) or die (once they are ejected), and gives them
// back when a primary returns.
func TestProxyBackupServesOnlyWithoutPrimaries(t *testing.T) {
	e := newEnv(t)
	p1 := e.backend("web", "p1", "", nil)
	e.backend("web", "p2", "", nil)
	e.backendMeta("web", "backup", "", map[string]string{endpoint.MetaTier: "1"}, nil)
	addr := testutil.FreeAddr(t)
	_, base, _ := e.startProxy(fmt.Sprintf("listeners: [{name: edge, addr: %q}]\nroutes: [{name: web, service: web}]\n", addr))
	hc := &http.Client{Timeout: 10 * time.Second}
	defer hc.CloseIdleConnections()
	waitServing(t, hc, base+"/", nil, "p1")
	waitServing(t, hc, base+"/", nil, "p2")
	count := func(n int) map[string]int {
		got := map[string]int{}
		for range n {
			code, body := get(t, hc, base+"/", nil)
			if code != http.StatusOK {
				body = fmt.Sprint(code, " ", body)
			}
			got[body]++
		}
		return got
	}
	if got := count(60); got["backup"] != 0 || got["p1"]+got["p2"] != 60 {
		t.Fatalf("with both primaries serving: %v, want every request on p1 and p2", got)
	}

	// Both primaries drain: the backup takes over and no request fails.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var rev int64
	for _, id := range []string{"p1", "p2"} {
		in, err := e.c.SetStatus(ctx, "web", id, registry.StatusDraining)
		if err != nil {
			t.Fatal(err)
		}
		rev = in.Revision
	}
	if res, err := e.c.AwaitWatchers(ctx, "web", rev, 10*time.Second); err != nil || !res.Complete() {
		t.Fatalf("AwaitWatchers = %+v, %v; want complete", res, err)
	}
	if got := count(60); got["backup"] != 60 {
		t.Fatalf("with both primaries draining: %v, want all 60 on the backup", got)
	}

	// p2 comes back: it takes every request again.
	in, err := e.c.SetStatus(ctx, "web", "p2", registry.StatusUp)
	if err != nil {
		t.Fatal(err)
	}
	if res, err := e.c.AwaitWatchers(ctx, "web", in.Revision, 10*time.Second); err != nil || !res.Complete() {
		t.Fatalf("AwaitWatchers = %+v, %v; want complete", res, err)
	}
	if got := count(60); got["p2"] != 60 {
		t.Fatalf("with p2 back: %v, want all 60 on p2", got)
	}

	// p1 back up but dead (its listener gone, still registered): requests
	// it costs are retried on p2; the backup stays unused.
	in, err = e.c.SetStatus(ctx, "web", "p1", registry.StatusUp)
	if err != nil {
		t.Fatal(err)
	}
	if res, err := e.c.AwaitWatchers(ctx, "web", in.Revision, 10*time.Second); err != nil || !res.Complete() {
		t.Fatalf("AwaitWatchers = %+v, %v; want complete", res, err)
	}
	p1.Close()
	if got := count(60); got["p2"] != 60 {
		t.Fatalf("with p1 dead and p2 serving: %v, want all 60 answered by p2", got)
	}
}

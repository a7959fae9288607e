package proxy_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/testutil"
	"beacon.dev/beacon/registry"
)

// `beacon proxy` as a sidecar, a real child process: it registers the
// local service once its health path answers, serves it, and on SIGTERM
// drains (DRAINING seen by a watcher), deregisters and exits 0.
func TestProxySidecarRegistersServesAndDrainsOnSIGTERM(t *testing.T) {
	nd := testutil.StartBeacon(t)
	ready := make(chan struct{})
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/health" {
			select {
			case <-ready:
			default:
				http.Error(w, "starting", http.StatusServiceUnavailable)
				return
			}
		}
		fmt.Fprintf(w, "app %s %s", r.URL.Path, r.Header.Get("X-Forwarded-For"))
	}))
	defer app.Close()
	c, err := client.New([]string{nd.Addr()})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	w, err := c.Watch(ctx, []string{"web"})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	var mu sync.Mutex
	var statuses []registry.Status
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		for {
			snaps, err := w.Next(ctx)
			if err != nil {
				return
			}
			mu.Lock()
			for _, s := range snaps {
				for _, in := range s.Instances {
					statuses = append(statuses, in.Status)
				}
			}
			mu.Unlock()
		}
	}()
	defer func() { w.Close(); <-watchDone }()

	sidecar := testutil.FreeAddr(t)
	path := filepath.Join(t.TempDir(), "sidecar.yaml")
	cfg := fmt.Sprintf(`registry: {servers: [%q]}
sidecar:
  service: web
  id: web-1
  addr: %q
  local: %q
  healthPath: /health
  healthInterval: 100ms
  ackTimeout: 5s
`, nd.Addr(), sidecar, strings.TrimPrefix(app.URL, "http://"))
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(testutil.BeaconBinary(t), "proxy", "--config", path)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		select {
		case <-exited:
		default:
			cmd.Process.Kill()
			<-exited
		}
	}()
	instances := func() []*registry.Instance {
		snap, err := c.Instances(ctx, "web", client.All())
		if err != nil {
			t.Fatal(err)
		}
		return snap.Instances
	}
	// Not registered while the local service is not healthy.
	hc := &http.Client{Timeout: 5 * time.Second}
	testutil.Eventually(t, 20*time.Second, "the sidecar listening", func() bool {
		resp, err := hc.Get("http://" + sidecar + "/livez")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return true
	})
	if got := instances(); len(got) != 0 {
		t.Errorf("registered before the local service was healthy: %v", got)
	}
	close(ready)
	testutil.Eventually(t, 20*time.Second, "web-1 registered UP", func() bool {
		got := instances()
		return len(got) == 1 && got[0].Status == registry.StatusUp && fmt.Sprint(got[0].Port) == sidecar[strings.LastIndex(sidecar, ":")+1:]
	})
	resp, err := hc.Get("http://" + sidecar + "/hello")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "app /hello 127.0.0.1" {
		t.Errorf("through the sidecar: %q, want \"app /hello 127.0.0.1\"", body)
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		exited <- err // for the deferred check
		if err != nil {
			t.Fatalf("beacon proxy exited with %v after SIGTERM, want 0\n%s", err, stderr.String())
		}
	case <-ctx.Done():
		t.Fatalf("beacon proxy still running after SIGTERM\n%s", stderr.String())
	}
	if got := instances(); len(got) != 0 {
		t.Errorf("after the drain: %v still registered", got)
	}
	testutil.Eventually(t, 10*time.Second, "the watcher seeing DRAINING", func() bool {
		mu.Lock()
		defer mu.Unlock()
		for _, s := range statuses {
			if s == registry.StatusDraining {
				return true
			}
		}
		return false
	})
}

package e2e

import (
	"io"
	"net/http"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
)

func run(t *testing.T, env []string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(beaconBin, args...)
	dieWithTest(cmd)
	cmd.Env = append(cmd.Environ(), env...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// The CLI end to end: persistent registration, reads as tables and JSON,
// watch lines with revisions, BEACON_ADDR, deregistration and bad flags.
func TestCLI(t *testing.T) {
	srv := newServerProc(t)
	env := []string{"BEACON_ADDR=" + srv.addr}
	watcher := start(t, "watch", "--server", srv.addr, "orders")

	out, err := run(t, env, "register", "--persistent", "--service", "orders", "--id", "o-1", "--address", "127.0.0.1",
		"--port", "9001", "--tag", "v1", "--meta", "team=core", "--weight", "30", "--zone", "a")
	if err != nil || !strings.Contains(out, "registered default/orders/o-1 (persistent)") {
		t.Fatalf("register --persistent: %v\n%s", err, out)
	}
	watcher.waitLine(30*time.Second, "default/orders routable=1 total=1 [o-1@127.0.0.1:9001]")

	out, err = run(t, env, "services")
	if err != nil || !strings.Contains(out, "orders") {
		t.Fatalf("services: %v\n%s", err, out)
	}
	out, err = run(t, env, "instances", "orders", "-o", "json")
	if err != nil {
		t.Fatalf("instances -o json: %v\n%s", err, out)
	}
	// One shape: the CLI prints what the API answers curl, field for field.
	var fromCLI, fromAPI beaconv1.ListInstancesResponse
	if err := protojson.Unmarshal([]byte(out), &fromCLI); err != nil || len(fromCLI.Instances) != 1 {
		t.Fatalf("instances -o json = %s (%v)", out, err)
	}
	if in := fromCLI.Instances[0]; in.Id != "o-1" || in.Weight != 30 || in.Zone != "a" || in.Metadata["team"] != "core" || in.Status != beaconv1.Status_STATUS_UP || fromCLI.Revision == 0 {
		t.Errorf("instances -o json = %v", &fromCLI)
	}
	resp, err := http.Post("http://"+srv.addr+"/beacon.v1.RegistryService/ListInstances", "application/json", strings.NewReader(`{"service":"orders"}`))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err := protojson.Unmarshal(body, &fromAPI); err != nil {
		t.Fatalf("ListInstances = %s (%v)", body, err)
	}
	if !proto.Equal(&fromCLI, &fromAPI) {
		t.Errorf("instances -o json differs from the API's answer:\nCLI %s\nAPI %s", out, body)
	}
	for _, want := range []string{`"status": "STATUS_UP"`, `"revision": "`} {
		if !strings.Contains(strings.Join(strings.Fields(out), " "), want) {
			t.Errorf("instances -o json lacks %s (the API's dialect): %s", want, out)
		}
	}
	out, err = run(t, env, "services", "-o", "json")
	var svcs beaconv1.ListServicesResponse
	if err != nil || protojson.Unmarshal([]byte(out), &svcs) != nil || len(svcs.Services) != 1 || svcs.Services[0].Name != "orders" {
		t.Errorf("services -o json: %v\n%s", err, out)
	}

	out, err = run(t, env, "register", "--service", "orders", "--id", "o-2", "--address", "127.0.0.1", "--port", "99999")
	if err == nil || !strings.Contains(out, "port") || !strings.Contains(out, "65535") {
		t.Errorf("register --port 99999 = %v\n%s, want an error naming port and its limit", err, out)
	}
	out, err = run(t, env, "register", "--service", "orders", "--id", "o-2", "--address", "127.0.0.1", "--port", "1", "--meta", "novalue")
	if err == nil || !strings.Contains(out, "--meta") {
		t.Errorf("register --meta novalue = %v\n%s, want an error naming --meta", err, out)
	}
	out, err = run(t, env, "instances", "orders", "-o", "yaml")
	if err == nil || !strings.Contains(out, "--output") {
		t.Errorf("instances -o yaml = %v\n%s, want an error naming --output", err, out)
	}

	out, err = run(t, env, "deregister", "--service", "orders", "--id", "o-1")
	if err != nil {
		t.Fatalf("deregister: %v\n%s", err, out)
	}
	watcher.waitLine(30*time.Second, "default/orders routable=0 total=0")
	if out, err = run(t, env, "deregister", "--service", "orders", "--id", "o-1"); err == nil {
		t.Errorf("deregistering a missing instance succeeded:\n%s", out)
	}
	watcher.signal(syscall.SIGINT)
	if code := watcher.wait(30 * time.Second); code != 0 {
		t.Errorf("watch exit code after SIGINT = %d, want 0", code)
	}
}

// Package modgraph_test builds tiny applications that import the SDK, and
// each heavy backend, the way a user's module would, and checks what their
// module graphs hold: an application that imports the SDK must not get
// etcd's server, bbolt, raft, zap, cobra or consul/api.
package modgraph_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"beacon.dev/beacon/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m, testutil.LeakOptions()...) }

// root is the repository: the SDK module's directory.
func root(t *testing.T) string {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("no source path")
	}
	return filepath.Join(filepath.Dir(file), "..", "..")
}

type app struct {
	modules []string // beacon modules required, "" = the SDK
	imports []string // packages main imports
	banned  []string // module paths its graph must not hold
}

// heavy is what the core SDK keeps out of an application.
var heavy = []string{
	"go.etcd.io/etcd/server/v3", "go.etcd.io/bbolt", "go.etcd.io/raft/v3",
	"go.etcd.io/etcd/client/v3", "go.uber.org/zap", "github.com/spf13/cobra",
	"github.com/hashicorp/consul/api",
}

func TestSDKApplicationGetsNoServerDependencies(t *testing.T) {
	check(t, app{
		modules: []string{""},
		imports: []string{
			"beacon.dev/beacon/client", "beacon.dev/beacon/session", "beacon.dev/beacon/discovery",
			"beacon.dev/beacon/registry", "beacon.dev/beacon/endpoint", "beacon.dev/beacon/outlier",
			"beacon.dev/beacon/policy", "beacon.dev/beacon/balancer", "beacon.dev/beacon/balancer/p2c",
			"beacon.dev/beacon/balancer/roundrobin", "beacon.dev/beacon/balancer/ringhash",
			"beacon.dev/beacon/balancer/maglev", "beacon.dev/beacon/balancer/wrr", "beacon.dev/beacon/balancer/random",
			"beacon.dev/beacon/beacongrpc", "beacon.dev/beacon/beaconhttp", "beacon.dev/beacon/lifecycle",
			"beacon.dev/beacon/backend", "beacon.dev/beacon/backend/beacon", "beacon.dev/beacon/backend/memory",
			"beacon.dev/beacon/config", "beacon.dev/beacon/saga", "beacon.dev/beacon/tracing",
		},
		banned: heavy,
	})
}

// The etcd backend brings etcd's client (and with it zap), never its
// server.
func TestEtcdBackendApplicationGetsOnlyEtcdsClient(t *testing.T) {
	check(t, app{
		modules: []string{"", "/internal/store", "/backend/etcd"},
		imports: []string{"beacon.dev/beacon/backend/etcd", "beacon.dev/beacon/lifecycle"},
		banned: []string{"go.etcd.io/etcd/server/v3", "go.etcd.io/bbolt", "go.etcd.io/raft/v3",
			"github.com/spf13/cobra", "github.com/hashicorp/consul/api", "beacon.dev/beacon/server"},
	})
}

func TestConsulBackendApplicationGetsNoEtcd(t *testing.T) {
	check(t, app{
		modules: []string{"", "/backend/consul"},
		imports: []string{"beacon.dev/beacon/backend/consul", "beacon.dev/beacon/lifecycle"},
		banned: []string{"go.etcd.io/etcd/server/v3", "go.etcd.io/bbolt", "go.etcd.io/raft/v3",
			"go.etcd.io/etcd/client/v3", "go.uber.org/zap", "github.com/spf13/cobra"},
	})
}

// check writes the application's module (requiring the beacon modules
// from this checkout), tidies it offline from the module cache, builds it
// and reads its graph.
func check(t *testing.T, a app) {
	t.Helper()
	dir, repo := t.TempDir(), root(t)
	var mod, sums strings.Builder
	mod.WriteString("module example.com/app\n\ngo 1.26.0\n\n")
	for _, m := range a.modules {
		path := "beacon.dev/beacon" + m
		mod.WriteString("require " + path + " v0.0.0-00010101000000-000000000000\n")
		mod.WriteString("replace " + path + " => " + filepath.Join(repo, m) + "\n")
		// The app's dependencies are a subset of these modules': their
		// checksums let it tidy without the network.
		sum, err := os.ReadFile(filepath.Join(repo, m, "go.sum"))
		if err != nil {
			t.Fatal(err)
		}
		sums.Write(sum)
	}
	var main strings.Builder
	main.WriteString("package main\n\nimport (\n")
	for _, p := range a.imports {
		main.WriteString("\t_ \"" + p + "\"\n")
	}
	main.WriteString(")\n\nfunc main() {}\n")
	for name, content := range map[string]string{"go.mod": mod.String(), "go.sum": sums.String(), "main.go": main.String()} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// -e: tidy also wants the modules of the dependencies' own tests
	// (consul/api's need testify's objx), which a fresh module cache may
	// not hold and the build never uses; the build below fails if
	// anything the application needs is missing.
	gocmd(t, dir, "mod", "tidy", "-e")
	gocmd(t, dir, "build", "-o", os.DevNull, ".")

	graph := map[string]bool{}
	for line := range strings.Lines(gocmd(t, dir, "mod", "graph")) {
		for _, node := range strings.Fields(line) {
			path, _, _ := strings.Cut(node, "@")
			graph[path] = true
		}
	}
	built := map[string]bool{}
	for line := range strings.Lines(gocmd(t, dir, "list", "-deps", "-f", "{{with .Module}}{{.Path}}{{end}}", ".")) {
		if m := strings.TrimSpace(line); m != "" {
			built[m] = true
		}
	}
	for _, b := range a.banned {
		if graph[b] {
			t.Errorf("the module graph holds %s", b)
		}
		if built[b] {
			t.Errorf("the build imports packages of %s", b)
		}
	}
	var names []string
	for m := range graph {
		names = append(names, m)
	}
	slices.Sort(names)
	t.Logf("%d modules in the graph, %d providing packages to the build: %s", len(graph), len(built), strings.Join(names, " "))
}

func gocmd(t *testing.T, dir string, args ...string) string {
	t.Helper()
	cmd := exec.Command("go", args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-mod=mod", "GOPROXY=off", "GOTOOLCHAIN=local")
	out, err := cmd.Output()
	if err != nil {
		stderr := ""
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, stderr)
	}
	return string(out)
}

package shopkit

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ModuleDir returns the repository's directory (Build's moduleDir): the
// shop is built from source, so it runs from within the beacon workspace
// (go.work), or at least one of its modules.
func ModuleDir() (string, error) {
	for _, v := range []string{"GOWORK", "GOMOD"} {
		out, err := exec.Command("go", "env", v).Output()
		if p := strings.TrimSpace(string(out)); err == nil && p != "" && p != os.DevNull && p != "off" {
			return filepath.Dir(p), nil
		}
	}
	return "", errors.New("run from within the beacon repository (go env names no go.work or go.mod)")
}

// Build compiles the shop and the beacon server into dir.
func Build(ctx context.Context, moduleDir, dir string) (shopBin, beaconBin string, err error) {
	shopBin, beaconBin = filepath.Join(dir, "shop"), filepath.Join(dir, "beacon")
	for bin, pkg := range map[string]string{shopBin: "beacon.dev/beacon/examples/shop", beaconBin: "beacon.dev/beacon/cmd/beacon"} {
		cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, pkg)
		cmd.Dir = moduleDir
		if out, err := cmd.CombinedOutput(); err != nil {
			return "", "", fmt.Errorf("go build %s: %v\n%s", pkg, err, out)
		}
	}
	return shopBin, beaconBin, nil
}

// Cluster runs the shop as real processes on 127.0.0.1: a beacon server,
// the shop's database and any number of service instances.
type Cluster struct {
	ShopBin, BeaconBin, Dir string
	Registry                string // the beacon server's address
	DB                      string // the shop database's client address
	Broker                  string // the Kafka broker's address, once StartBroker ran
	// Output, if set, receives every process's output, line by line,
	// prefixed with its name.
	Output io.Writer
	// OTLP, if set, is the collector (host:port) every service exports
	// its traces to (--otlp).
	OTLP string
	// ServiceArgs are added to a service's flags, by service, on every
	// Start.
	ServiceArgs map[string][]string
	// RegistryArgs are added to the beacon server's flags.
	RegistryArgs []string
	// OnLine, if set, is called with every line a process prints, from
	// the goroutine reading its output: keep it short.
	OnLine func(p *Proc, line string)

	registryPeer, dbPeer string
	broker               *Proc // guarded by mu

	mu       sync.Mutex
	registry *Proc   // guarded by mu
	db       *Proc   // guarded by mu
	procs    []*Proc // guarded by mu; service instances, in start order
	outMu    sync.Mutex
}

// Proc is one running process.
type Proc struct {
	Service, ID, Addr string
	cmd               *exec.Cmd
	exited            chan struct{}
	mu                sync.Mutex
	tail              []string // guarded by mu; last lines of output
}

func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// NewCluster prepares a cluster on free loopback ports, its data in dir.
func NewCluster(shopBin, beaconBin, dir string) (*Cluster, error) {
	c := &Cluster{ShopBin: shopBin, BeaconBin: beaconBin, Dir: dir}
	for _, p := range []*string{&c.Registry, &c.DB, &c.registryPeer, &c.dbPeer} {
		a, err := freeAddr()
		if err != nil {
			return nil, err
		}
		*p = a
	}
	return c, nil
}

// start runs a process and waits for its ready line; it returns the text
// after the marker.
func (c *Cluster) start(ctx context.Context, name, marker, bin string, args ...string) (*Proc, string, error) {
	cmd := exec.Command(bin, args...)
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		return nil, "", err
	}
	p := &Proc{cmd: cmd, exited: make(chan struct{})}
	ready := make(chan string, 1)
	go func() { // owned: ends when the process's output closes
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		found := false
		for sc.Scan() {
			line := sc.Text()
			p.mu.Lock()
			p.tail = append(p.tail, line)
			if len(p.tail) > 50 {
				p.tail = p.tail[1:]
			}
			p.mu.Unlock()
			if c.OnLine != nil {
				c.OnLine(p, line)
			}
			if c.Output != nil {
				c.outMu.Lock()
				fmt.Fprintf(c.Output, "%s| %s\n", name, line)
				c.outMu.Unlock()
			}
			if rest, ok := strings.CutPrefix(line, marker); ok && !found {
				found = true
				ready <- rest
			} else if !found && strings.Contains(line, marker) {
				found = true
				ready <- line
			}
		}
		_, _ = io.Copy(io.Discard, pr)
	}()
	go func() { // owned: ends when the process does
		_ = cmd.Wait()
		pw.Close()
		close(p.exited)
	}()
	select {
	case rest := <-ready:
		return p, rest, nil
	case <-p.exited:
		return nil, "", fmt.Errorf("%s exited before it was ready:\n%s", name, p.Output())
	case <-ctx.Done():
		p.Kill()
		return nil, "", fmt.Errorf("%s not ready: %w\n%s", name, ctx.Err(), p.Output())
	}
}

// StartRegistry starts (or restarts, on the same ports and data) the
// beacon server.
func (c *Cluster) StartRegistry(ctx context.Context) error {
	args := append([]string{"server", "--addr", c.Registry, "--data-dir", filepath.Join(c.Dir, "registry"),
		"--etcd-peer-addr", c.registryPeer, "--log-level", "error"}, c.RegistryArgs...)
	p, _, err := c.start(ctx, "beacon", "beacon server ready", c.BeaconBin, args...)
	if err != nil {
		return err
	}
	p.Service = "beacon"
	c.mu.Lock()
	c.registry = p
	c.mu.Unlock()
	return nil
}

// StopRegistry stops the beacon server (SIGTERM) and waits for it.
func (c *Cluster) StopRegistry() {
	c.mu.Lock()
	p := c.registry
	c.registry = nil
	c.mu.Unlock()
	if p != nil {
		p.Terminate(30 * time.Second)
	}
}

// StartBroker starts the demo's Kafka broker (`shop broker`, kfake) on a
// free port; from then on gateway and tracking instances get --brokers.
func (c *Cluster) StartBroker(ctx context.Context) error {
	addr, err := freeAddr()
	if err != nil {
		return err
	}
	p, _, err := c.start(ctx, "broker", "shop: serving ", c.ShopBin, "broker", "--addr", addr)
	if err != nil {
		return err
	}
	p.Service = "broker"
	c.mu.Lock()
	c.broker, c.Broker = p, addr
	c.mu.Unlock()
	return nil
}

// StartDB starts the shop's database.
func (c *Cluster) StartDB(ctx context.Context) error {
	p, _, err := c.start(ctx, "db", "shop: serving ", c.ShopBin, "db", "--dir", filepath.Join(c.Dir, "shop.db"),
		"--client-addr", c.DB, "--peer-addr", c.dbPeer)
	if err != nil {
		return err
	}
	p.Service = "db"
	c.mu.Lock()
	c.db = p
	c.mu.Unlock()
	return nil
}

// Start runs an instance of a shop service and waits until it is
// registered and serving.
func (c *Cluster) Start(ctx context.Context, service string, args ...string) (*Proc, error) {
	all := append(append([]string{service, "--registry", c.Registry}, c.ServiceArgs[service]...), args...)
	if c.OTLP != "" {
		all = append(all, "--otlp", c.OTLP)
	}
	if service == "inventory" || service == "payments" || service == "orders" {
		all = append(all, "--db", c.DB)
	}
	c.mu.Lock()
	broker := c.Broker
	c.mu.Unlock()
	if broker != "" && (service == "gateway" || service == "tracking") {
		all = append(all, "--brokers", broker)
	}
	p, rest, err := c.start(ctx, service, "shop: serving ", c.ShopBin, all...)
	if err != nil {
		return nil, err
	}
	var info struct{ Service, ID, Addr string }
	if err := json.Unmarshal([]byte(rest), &info); err != nil {
		p.Kill()
		return nil, fmt.Errorf("%s: bad ready line %q: %v", service, rest, err)
	}
	p.Service, p.ID, p.Addr = info.Service, info.ID, info.Addr
	c.mu.Lock()
	c.procs = append(c.procs, p)
	c.mu.Unlock()
	return p, nil
}

// Running returns the live instances of a service, oldest first.
func (c *Cluster) Running(service string) []*Proc {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []*Proc
	for _, p := range c.procs {
		if p.Service == service && p.Alive() {
			out = append(out, p)
		}
	}
	return out
}

// Close stops every process: services first (SIGTERM, bounded), then the
// database, the broker and the registry.
func (c *Cluster) Close() {
	c.mu.Lock()
	procs := slices.Clone(c.procs)
	c.mu.Unlock()
	var wg sync.WaitGroup
	for _, p := range procs {
		wg.Go(func() { p.Terminate(15 * time.Second) })
	}
	wg.Wait()
	c.mu.Lock()
	db, broker := c.db, c.broker
	c.mu.Unlock()
	if db != nil {
		db.Terminate(15 * time.Second)
	}
	if broker != nil {
		broker.Terminate(15 * time.Second)
	}
	c.StopRegistry()
}

// Signal sends sig to the process.
func (p *Proc) Signal(sig os.Signal) error { return p.cmd.Process.Signal(sig) }

// Kill sends SIGKILL and waits for the end.
func (p *Proc) Kill() {
	_ = p.cmd.Process.Signal(syscall.SIGCONT) // a stopped process dies as well, but be sure
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.exited
}

// Terminate sends SIGTERM and waits, killing the process after timeout.
func (p *Proc) Terminate(timeout time.Duration) {
	_ = p.cmd.Process.Signal(syscall.SIGCONT) // a stopped process cannot drain
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(timeout):
		p.Kill()
	}
}

// Alive reports whether the process still runs.
func (p *Proc) Alive() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// Exited is closed when the process has ended.
func (p *Proc) Exited() <-chan struct{} { return p.exited }

// Output returns the last lines the process printed.
func (p *Proc) Output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.tail, "\n")
}

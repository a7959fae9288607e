package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/examples/shop/shopkit"
)

// faultHelp lists the demo's commands, one per line on its standard input.
const faultHelp = "kill N | hang N | resume N | slow N | fast N | restart N | add | kill payments | registry down | registry up | discount PERCENT"

// faults injects, into the running shop, the faults the chaos scorecard
// knows: the demo reads them as commands (a line each) and the view shows
// their effect. Orders instances are numbered as the view lists them.
type faults struct {
	cl      *shopkit.Cluster
	actions sync.WaitGroup // commands in progress (a restart takes seconds)

	mu           sync.Mutex
	state        map[string]string // guarded by mu; orders instance ID → "hung", "slow"
	log          []string          // guarded by mu; the last outcomes, newest last
	registryDown bool              // guarded by mu
}

func newFaults(cl *shopkit.Cluster) *faults {
	return &faults{cl: cl, state: map[string]string{}}
}

// read runs the commands of in until it ends (EOF: no more commands; the
// demo goes on) or ctx does.
func (f *faults) read(ctx context.Context, in io.Reader) {
	sc := bufio.NewScanner(in)
	for sc.Scan() && ctx.Err() == nil {
		if line := strings.TrimSpace(sc.Text()); line != "" {
			f.do(ctx, line)
		}
	}
}

// wait waits for the commands still in progress.
func (f *faults) wait() { f.actions.Wait() }

func (f *faults) note(format string, args ...any) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.log = append(f.log, time.Now().Format(time.TimeOnly)+"  "+fmt.Sprintf(format, args...))
	if len(f.log) > 6 {
		f.log = f.log[len(f.log)-6:]
	}
}

// recent returns the last outcomes and the state of each orders instance.
func (f *faults) recent() (log []string, state map[string]string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.log), maps.Clone(f.state)
}

func (f *faults) mark(id, s string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if s == "" {
		delete(f.state, id)
	} else {
		f.state[id] = s
	}
}

// orders returns the orders processes as numbered in the view (1-based,
// oldest first; killed ones keep no number).
func (f *faults) orders() []*shopkit.Proc { return f.cl.Running("orders") }

func (f *faults) instance(arg string) (*shopkit.Proc, error) {
	n, err := strconv.Atoi(arg)
	procs := f.orders()
	if err != nil || n < 1 || n > len(procs) {
		return nil, fmt.Errorf("no orders instance %q: the view numbers them 1 to %d", arg, len(procs))
	}
	return procs[n-1], nil
}

// do runs one command; slow ones run in the background, counted in
// actions, so the view keeps refreshing.
func (f *faults) do(ctx context.Context, line string) {
	fields := strings.Fields(line)
	cmd, arg := fields[0], ""
	if len(fields) > 1 {
		arg = fields[1]
	}
	var p *shopkit.Proc
	killPayments := line == "kill payments" // not `kill N`: N numbers orders
	switch cmd {
	case "kill", "hang", "resume", "slow", "fast", "restart":
		if killPayments {
			break
		}
		var err error
		if p, err = f.instance(arg); err != nil {
			f.note("%s: %v", line, err)
			return
		}
	}
	switch {
	case cmd == "discount":
		f.actions.Go(func() { f.discount(ctx, arg) })
	case killPayments:
		procs := f.cl.Running("payments")
		if len(procs) < 2 {
			f.note("kill payments: only %d payments instance left; keeping it", len(procs))
			return
		}
		p := procs[len(procs)-1]
		f.actions.Go(func() {
			p.Kill()
			f.mark(p.ID, "")
			f.note("killed %s (SIGKILL): orders' calls to it are refused and retried on the other payments instance until beacon drops it", p.ID)
		})
	case cmd == "kill":
		f.actions.Go(func() {
			p.Kill()
			f.mark(p.ID, "")
			f.note("killed %s (SIGKILL): its calls fail over; beacon drops it when its session expires", p.ID)
		})
	case cmd == "hang":
		_ = p.Signal(syscall.SIGSTOP)
		f.mark(p.ID, "hung")
		f.note("hung %s (SIGSTOP): hedges and ejection take it out of the way; `resume %s` ends it", p.ID, arg)
	case cmd == "resume":
		_ = p.Signal(syscall.SIGCONT)
		f.mark(p.ID, "")
		f.note("resumed %s (SIGCONT)", p.ID)
	case cmd == "slow":
		_ = p.Signal(syscall.SIGUSR1)
		f.mark(p.ID, "slow")
		f.note("slowed %s (+200 ms a request): watch its share of answers drop", p.ID)
	case cmd == "fast":
		_ = p.Signal(syscall.SIGUSR2)
		f.mark(p.ID, "")
		f.note("%s at full speed again", p.ID)
	case cmd == "restart":
		f.actions.Go(func() {
			f.note("restarting %s: drain (SIGTERM), then a new instance …", p.ID)
			p.Terminate(30 * time.Second)
			f.mark(p.ID, "")
			f.start(ctx, "restarted: "+p.ID+" drained and stopped")
		})
	case cmd == "add":
		f.actions.Go(func() { f.start(ctx, "added") })
	case line == "registry down":
		f.mu.Lock()
		down := f.registryDown
		f.registryDown = true
		f.mu.Unlock()
		if down {
			f.note("the registry is already down")
			return
		}
		f.actions.Go(func() {
			f.cl.StopRegistry()
			f.note("registry stopped: calls go on from the SDK's cache; new orders (sagas, kept in the registry) and tracking's counts wait for it; sessions resume when it is back")
		})
	case line == "registry up":
		f.mu.Lock()
		down := f.registryDown
		f.registryDown = false
		f.mu.Unlock()
		if !down {
			f.note("the registry is already up")
			return
		}
		f.actions.Go(func() {
			sctx, cancel := context.WithTimeout(ctx, time.Minute)
			defer cancel()
			if err := f.cl.StartRegistry(sctx); err != nil {
				f.note("registry up: %v", err)
				return
			}
			f.note("registry started again")
		})
	default:
		f.note("%q: unknown; commands: %s", line, faultHelp)
	}
}

func (f *faults) start(ctx context.Context, what string) {
	sctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	p, err := f.cl.Start(sctx, "orders")
	if err != nil {
		f.note("%s; starting another orders instance: %v", what, err)
		return
	}
	f.note("%s; %s serves (slow start ramps its share up)", what, p.ID)
}

// discount publishes the shop's pricing config: every orders instance
// applies it (or refuses it, if invalid) and the view counts them.
func (f *faults) discount(ctx context.Context, arg string) {
	n, err := strconv.Atoi(arg)
	if err != nil {
		f.note("discount %q: want a percentage", arg)
		return
	}
	c, err := client.New([]string{f.cl.Registry})
	if err != nil {
		f.note("discount: %v", err)
		return
	}
	defer c.Close()
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	rev, err := c.KV().Put(wctx, pricingKey, fmt.Appendf(nil, `{"discount_percent":%d}`, n))
	if err != nil {
		f.note("discount: %v", err)
		return
	}
	f.note("discount %d%% published as %s revision %d: watch the orders instances apply it", n, pricingKey, rev)
}

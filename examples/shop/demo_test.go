package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"beacon.dev/beacon/internal/testutil"
)

// demoRun is `shop demo` as a child process, its output collected.
type demoRun struct {
	cmd    *exec.Cmd
	stdin  io.Writer
	dir    string
	placed chan struct{} // a load report of ≥ 10 orders/s, none failed
	copied chan struct{} // the output is closed and read

	mu  sync.Mutex
	out strings.Builder // guarded by mu
}

// startDemo builds the shop and runs `shop demo --plain` at 20 orders/s
// in a directory of its own, with extra flags.
func startDemo(ctx context.Context, t *testing.T, extra ...string) *demoRun {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "shop")
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	d := &demoRun{dir: t.TempDir(), placed: make(chan struct{}, 1), copied: make(chan struct{})}
	args := append([]string{"demo", "--dir", d.dir, "--http", testutil.FreeAddr(t), "--rate", "20", "--plain"}, extra...)
	d.cmd = exec.CommandContext(ctx, bin, args...)
	stdout, err := d.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if d.stdin, err = d.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	d.cmd.Stderr = d.cmd.Stdout
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	rate := regexp.MustCompile(`load, last 5 s: ([0-9.]+) orders/s, 0 failed`)
	go func() { // owned: ends when the demo closes its output
		defer close(d.copied)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			line := sc.Text()
			d.mu.Lock()
			d.out.WriteString(line + "\n")
			d.mu.Unlock()
			if m := rate.FindStringSubmatch(line); m != nil {
				if r, _ := strconv.ParseFloat(m[1], 64); r >= 10 {
					select {
					case d.placed <- struct{}{}:
					default:
					}
				}
			}
		}
		_, _ = io.Copy(io.Discard, stdout)
	}()
	return d
}

func (d *demoRun) output() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.out.String()
}

// send types a command into the live view.
func (d *demoRun) send(t *testing.T, command string) {
	t.Helper()
	if _, err := io.WriteString(d.stdin, command+"\n"); err != nil {
		t.Fatal(err)
	}
}

// interrupt is Ctrl-C: it returns how the demo exited, its output read.
func (d *demoRun) interrupt() error {
	if err := d.cmd.Process.Signal(syscall.SIGINT); err != nil {
		return err
	}
	<-d.copied
	return d.cmd.Wait()
}

// kill ends the demo at once.
func (d *demoRun) kill() {
	_ = d.cmd.Process.Kill()
	<-d.copied
	_ = d.cmd.Wait()
}

// The demo as a user runs it: started, serving orders, then Ctrl-C
// (SIGINT) stops everything it started, and no order failed.
func TestDemoRunsAndStopsCleanly(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	d := startDemo(ctx, t)
	select {
	case <-d.placed:
	case <-time.After(3 * time.Minute):
		d.kill()
		t.Fatalf("the demo placed no orders in 3 minutes:\n%s", d.output())
	}
	if running := processesUnder(d.dir); len(running) < 12 { // registry, db, broker, 2+2+3+2 services, gateway
		t.Errorf("while the demo runs, %d processes are seen under its directory, want ≥ 12: %v", len(running), running)
	}
	// The behaviour tracking: both members consume, and the view shows
	// their throughput and lag.
	consuming := regexp.MustCompile(`tracking-\S+ +[1-9][0-9]*\.[0-9] events/s  lag [0-9]+`)
	testutil.Eventually(t, 2*time.Minute, "the view to show a tracking member consuming", func() bool {
		return consuming.MatchString(d.output())
	})
	// Faults typed into the live view, each answered in it; none of these
	// may fail an order (kill and hang have their own end-to-end tests).
	for _, step := range []struct{ command, answer string }{
		{"slow 1", "slowed orders-"},
		{"fast 1", "at full speed again"},
		{"add", "added; orders-"},
		{"restart 2", "restarted: orders-"},
		{"bogus", `"bogus": unknown; commands: kill N`},
		// The pricing config, hot reloaded by every orders instance (4
		// after the add), which report it applied.
		{"discount 10", `{"discount_percent":10}` + " at revision"},
		{"", "applied by 4 of 4 orders instances"},
	} {
		if step.command != "" {
			d.send(t, step.command)
		}
		testutil.Eventually(t, 2*time.Minute, fmt.Sprintf("%q answered in the view with %q", step.command, step.answer), func() bool {
			return strings.Contains(d.output(), step.answer)
		})
	}
	if err := d.interrupt(); err != nil {
		t.Fatalf("demo exited with %v:\n%s", err, d.output())
	}
	got := d.output()
	for _, want := range []string{`orders +[34] instance\(s\)`, `gateway → orders: \d endpoints`, `inventory +2 instance\(s\)`, `tracking \(consumer group "tracking" on topic "behaviour", 2 members\)`, `demo: [1-9]\d* orders placed, 0 failed`, `demo: stopped`} {
		if !regexp.MustCompile(want).MatchString(got) {
			t.Errorf("demo output lacks %s:\n%s", want, got)
		}
	}
	if left := processesUnder(d.dir); len(left) > 0 {
		t.Errorf("processes left running after the demo stopped: %v", left)
	}
}

// processesUnder lists the processes whose command line names dir (every
// process the demo starts runs a binary built there).
func processesUnder(dir string) []string {
	entries, _ := os.ReadDir("/proc")
	var out []string
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		if cmdline := strings.ReplaceAll(string(b), "\x00", " "); strings.Contains(cmdline, dir) {
			out = append(out, e.Name()+": "+cmdline)
		}
	}
	return out
}

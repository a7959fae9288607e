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

// The demo as a user runs it: started, serving orders, then Ctrl-C
// (SIGINT) stops everything it started, and no order failed.
func TestDemoRunsAndStopsCleanly(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	bin := filepath.Join(t.TempDir(), "shop")
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	dir := t.TempDir()
	cmd := exec.CommandContext(ctx, bin, "demo", "--dir", dir, "--http", testutil.FreeAddr(t), "--rate", "20", "--plain")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var out strings.Builder
	placed := make(chan struct{}, 1)
	rate := regexp.MustCompile(`load, last 5 s: ([0-9.]+) orders/s, 0 failed`)
	copied := make(chan struct{})
	go func() { // owned: ends when the demo closes its output
		defer close(copied)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			line := sc.Text()
			mu.Lock()
			out.WriteString(line + "\n")
			mu.Unlock()
			if m := rate.FindStringSubmatch(line); m != nil {
				if r, _ := strconv.ParseFloat(m[1], 64); r >= 10 {
					select {
					case placed <- struct{}{}:
					default:
					}
				}
			}
		}
		_, _ = io.Copy(io.Discard, stdout)
	}()
	output := func() string {
		mu.Lock()
		defer mu.Unlock()
		return out.String()
	}
	select {
	case <-placed:
	case <-time.After(3 * time.Minute):
		_ = cmd.Process.Kill()
		<-copied
		_ = cmd.Wait()
		t.Fatalf("the demo placed no orders in 3 minutes:\n%s", output())
	}
	if running := processesUnder(dir); len(running) < 9 { // registry, db, 2+2+3 services, gateway
		t.Errorf("while the demo runs, %d processes are seen under its directory, want ≥ 9: %v", len(running), running)
	}
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
			if _, err := io.WriteString(stdin, step.command+"\n"); err != nil {
				t.Fatal(err)
			}
		}
		testutil.Eventually(t, 2*time.Minute, fmt.Sprintf("%q answered in the view with %q", step.command, step.answer), func() bool {
			return strings.Contains(output(), step.answer)
		})
	}
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	<-copied
	if err := cmd.Wait(); err != nil {
		t.Fatalf("demo exited with %v:\n%s", err, output())
	}
	got := output()
	for _, want := range []string{`orders +[34] instance\(s\)`, `gateway → orders: \d endpoints`, `inventory +2 instance\(s\)`, `demo: [1-9]\d* orders placed, 0 failed`, `demo: stopped`} {
		if !regexp.MustCompile(want).MatchString(got) {
			t.Errorf("demo output lacks %s:\n%s", want, got)
		}
	}
	if left := processesUnder(dir); len(left) > 0 {
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

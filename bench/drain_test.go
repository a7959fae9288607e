package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	testpb "google.golang.org/grpc/interop/grpc_testing"

	"beacon.dev/beacon/beacongrpc"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/discovery"
	"beacon.dev/beacon/policy"
)

// echoProcess is the echo service (internal/cmd/echo) as a child process.
type echoProcess struct {
	cmd    *exec.Cmd
	lines  chan string
	exited chan struct{}
}

// startEchoProcess starts one and waits until it registered; args are
// added after the defaults (service echo, gRPC only, TTL 5 s) and override
// them.
func startEchoProcess(b testing.TB, bin, registryAddr string, args ...string) *echoProcess {
	b.Helper()
	p := &echoProcess{cmd: exec.Command(bin, append([]string{"--registry", registryAddr, "--service", "echo", "--ttl", "5s"}, args...)...),
		lines: make(chan string, 64), exited: make(chan struct{})}
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL} // dies with the benchmark
	out, _ := p.cmd.StdoutPipe()
	p.cmd.Stderr = p.cmd.Stdout
	if err := p.cmd.Start(); err != nil {
		b.Fatal(err)
	}
	go func() { // ends when the process's output closes
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			select {
			case p.lines <- sc.Text():
			default: // nobody is waiting for this line
			}
		}
		p.cmd.Wait()
		close(p.exited)
	}()
	b.Cleanup(func() { p.cmd.Process.Signal(syscall.SIGKILL); <-p.exited })
	p.await(b, "lifecycle: registered")
	return p
}

func (p *echoProcess) await(b testing.TB, s string) string {
	b.Helper()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case l := <-p.lines:
			if strings.Contains(l, s) {
				return l
			}
		case <-p.exited:
			for { // the lines it printed before exiting are still buffered
				select {
				case l := <-p.lines:
					if strings.Contains(l, s) {
						return l
					}
				default:
					b.Fatalf("echo exited while waiting for %q", s)
				}
			}
		case <-timeout:
			b.Fatalf("echo: no %q after 30 s", s)
		}
	}
}

// BenchmarkDrainOnSIGTERM measures, for one of three echo instances
// serving 16 callers through the beacon client, the time from SIGTERM to
// the process's exit and the part of it spent waiting for the watchers'
// acknowledgements; every call must succeed. One op = one instance
// stopped and replaced.
func BenchmarkDrainOnSIGTERM(b *testing.B) {
	bin := filepath.Join(b.TempDir(), "echo")
	if out, err := exec.Command("go", "build", "-o", bin, "beacon.dev/beacon/internal/cmd/echo").CombinedOutput(); err != nil {
		b.Fatalf("go build: %v\n%s", err, out)
	}
	srv, _ := benchServer(b)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	fleet := []*echoProcess{startEchoProcess(b, bin, srv.Addr()), startEchoProcess(b, bin, srv.Addr()), startEchoProcess(b, bin, srv.Addr())}

	c, err := client.New([]string{srv.Addr()})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	cache, err := discovery.New(discovery.FromClient(c, ""), discovery.Config{}, "echo")
	if err != nil {
		b.Fatal(err)
	}
	defer cache.Close()
	budget, _ := policy.NewBudget(policy.BudgetConfig{})
	exec, _ := policy.New(policy.WithRetry(policy.RetryConfig{MaxAttempts: 3, BaseBackoff: 5 * time.Millisecond, MaxBackoff: 50 * time.Millisecond, RetryOn: beacongrpc.RetryableCode, Budget: budget}))
	cc, err := beacongrpc.NewClient(cache, "echo", beacongrpc.WithPolicies(exec, func(string) bool { return true }))
	if err != nil {
		b.Fatal(err)
	}
	defer cc.Close()
	tc := testpb.NewTestServiceClient(cc)

	loadCtx, stopLoad := context.WithCancel(ctx)
	var calls, failed atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			for loadCtx.Err() == nil {
				cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				_, err := tc.UnaryCall(cctx, &testpb.SimpleRequest{})
				cancel()
				calls.Add(1)
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err)
				}
			}
		})
	}
	for calls.Load() < 1000 {
		time.Sleep(10 * time.Millisecond)
	}

	var stopping, ackWait []time.Duration
	watchers, acked := 0, 0
	b.ResetTimer()
	for i := range b.N {
		victim := fleet[i%3]
		start := time.Now()
		victim.cmd.Process.Signal(syscall.SIGTERM)
		line := victim.await(b, "echo: stopped ")
		<-victim.exited
		stopping = append(stopping, time.Since(start))
		var rep struct {
			AckWaitMS    float64 `json:"ack_wait_ms"`
			Watchers     int     `json:"watchers"`
			Acknowledged int     `json:"acknowledged"`
			Clean        bool    `json:"clean"`
		}
		if err := json.Unmarshal([]byte(line[strings.Index(line, "{"):]), &rep); err != nil {
			b.Fatal(err)
		}
		if code := victim.cmd.ProcessState.ExitCode(); code != 0 || !rep.Clean {
			b.Fatalf("exit code %d, report %+v", code, rep)
		}
		ackWait = append(ackWait, time.Duration(rep.AckWaitMS*float64(time.Millisecond)))
		watchers += rep.Watchers
		acked += rep.Acknowledged
		b.StopTimer()
		fleet[i%3] = startEchoProcess(b, bin, srv.Addr())
		before := calls.Load()
		for calls.Load() < before+500 {
			time.Sleep(5 * time.Millisecond)
		}
		b.StartTimer()
	}
	b.StopTimer()
	stopLoad()
	wg.Wait()
	if n := failed.Load(); n > 0 {
		b.Errorf("%d of %d calls failed during the drains; first: %v", n, calls.Load(), firstErr.Load())
	}
	slices.Sort(stopping)
	slices.Sort(ackWait)
	med := func(d []time.Duration) float64 { return float64(d[len(d)/2]) / 1e6 }
	b.ReportMetric(med(stopping), "sigterm-to-exit-p50-ms")
	b.ReportMetric(float64(stopping[len(stopping)-1])/1e6, "sigterm-to-exit-max-ms")
	b.ReportMetric(med(ackWait), "ack-wait-p50-ms")
	b.ReportMetric(med(ackWait)/med(stopping), "ack-wait-share")
	b.ReportMetric(float64(acked)/float64(max(1, watchers)), "acknowledged-share")
	b.ReportMetric(float64(failed.Load()), "failed-calls")
	b.ReportMetric(float64(calls.Load()), "calls")
	b.ReportMetric(0, "ns/op")
}

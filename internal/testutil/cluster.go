package testutil

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Node is a `beacon server` process, alone or a member of a cluster of
// servers embedding etcd members.
type Node struct {
	Name, API, EtcdClient string
	bin                   string
	args                  []string

	mu     sync.Mutex
	cmd    *exec.Cmd     // guarded by mu
	exited chan struct{} // guarded by mu
	out    *syncBuffer   // guarded by mu
}

// NewCluster prepares n nodes of the beacon binary bin on free loopback
// ports, each with its own data directory and a TCP client listener for
// its embedded etcd (EtcdClient, on loopback without TLS: for the tests'
// own etcd clients); with n > 1 they form one cluster whose members talk
// TLS with certificates of a CA made for it. extra flags go to every
// node. Start them with StartAll.
func NewCluster(t testing.TB, bin string, n int, extra ...string) []*Node {
	t.Helper()
	var ns []*Node
	var initial []string
	var ca *CA
	var certDir, caFile string
	if n > 1 {
		ca, certDir = NewCA(t, "beacon test peers CA"), t.TempDir()
		caFile = ca.WriteCert(t, filepath.Join(certDir, "peers-ca.pem"))
	}
	for i := range n {
		nd := &Node{Name: fmt.Sprint("n", i), API: FreeAddr(t), EtcdClient: FreeAddr(t), bin: bin}
		peer := FreeAddr(t)
		initial = append(initial, nd.Name+"=https://"+peer)
		nd.args = []string{"server", "--name", nd.Name, "--addr", nd.API, "--data-dir", DataDir(t),
			"--etcd-client-addr", nd.EtcdClient, "--etcd-peer-addr", peer,
			"--console-addr", "off"} // a test asks for a console on a port of its choosing
		if ca != nil {
			cert, key := ca.Issue(t, certDir, nd.Name, CertSpec{Names: []string{"127.0.0.1"}, Peer: true})
			nd.args = append(nd.args, "--etcd-peer-cert", cert, "--etcd-peer-key", key, "--etcd-peer-ca", caFile)
		}
		nd.args = append(nd.args, extra...)
		ns = append(ns, nd)
	}
	if n > 1 {
		for _, nd := range ns {
			nd.args = append(nd.args, "--etcd-initial-cluster", strings.Join(initial, ","))
		}
	}
	return ns
}

// StartAll starts every node at once (each member waits for a quorum) and
// waits until all serve.
func StartAll(t testing.TB, ns []*Node) {
	t.Helper()
	var readies []<-chan struct{}
	for _, nd := range ns {
		readies = append(readies, nd.Start(t))
	}
	for i, r := range readies {
		select {
		case <-r:
		case <-time.After(90 * time.Second):
			t.Fatalf("node %s not ready after 90s; output:\n%s", ns[i].Name, ns[i].Output())
		}
	}
}

// Start runs the node (again, after a kill: its data directory makes it
// rejoin); the channel closes when it serves. It is killed when the test
// ends.
func (nd *Node) Start(t testing.TB) <-chan struct{} {
	t.Helper()
	cmd := exec.Command(nd.bin, nd.args...)
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited, ready := make(chan struct{}), make(chan struct{})
	out := &syncBuffer{}
	nd.mu.Lock()
	nd.cmd, nd.exited, nd.out = cmd, exited, out
	nd.mu.Unlock()
	go func() { // ends when the process's output closes
		sc := bufio.NewScanner(pr)
		var once sync.Once
		for sc.Scan() {
			out.add(sc.Text())
			if strings.Contains(sc.Text(), "beacon server ready") {
				once.Do(func() { close(ready) })
			}
		}
	}()
	go func() {
		cmd.Wait()
		pw.Close()
		close(exited)
	}()
	t.Cleanup(func() { cmd.Process.Signal(syscall.SIGKILL); <-exited })
	return ready
}

// Kill sends SIGKILL and waits for the process to end.
func (nd *Node) Kill() {
	nd.mu.Lock()
	cmd, exited := nd.cmd, nd.exited
	nd.mu.Unlock()
	cmd.Process.Signal(syscall.SIGKILL)
	<-exited
}

// Signal sends sig to the node's process and returns a channel that
// closes when the process has exited.
func (nd *Node) Signal(sig os.Signal) <-chan struct{} {
	nd.mu.Lock()
	cmd, exited := nd.cmd, nd.exited
	nd.mu.Unlock()
	cmd.Process.Signal(sig)
	return exited
}

// Freeze stops the node's process (SIGSTOP) and returns once the kernel
// reports every one of its threads stopped. Signal alone returns before
// that: a thread busy in a system call finishes it first, so a request
// sent just after Signal may still be answered by the "frozen" node.
func (nd *Node) Freeze(t testing.TB) {
	t.Helper()
	nd.mu.Lock()
	cmd := nd.cmd
	nd.mu.Unlock()
	cmd.Process.Signal(syscall.SIGSTOP)
	Eventually(t, 30*time.Second, "every thread of "+nd.Name+" stopped", func() bool {
		return AllThreadsStopped(cmd.Process.Pid)
	})
}

// AllThreadsStopped reports whether every thread of process pid is in
// the stopped state (T) according to /proc.
func AllThreadsStopped(pid int) bool {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	tasks, err := os.ReadDir(dir)
	if err != nil || len(tasks) == 0 {
		return false
	}
	for _, task := range tasks {
		stat, err := os.ReadFile(filepath.Join(dir, task.Name(), "stat"))
		if err != nil {
			return false
		}
		// The state follows the command name, which is in parentheses
		// and may itself contain spaces or parentheses.
		i := strings.LastIndexByte(string(stat), ')')
		if i < 0 || i+2 >= len(stat) || stat[i+2] != 'T' {
			return false
		}
	}
	return true
}

// Output returns what the node printed.
func (nd *Node) Output() string {
	nd.mu.Lock()
	defer nd.mu.Unlock()
	if nd.out == nil {
		return ""
	}
	return nd.out.String()
}

// APIs returns the nodes' API addresses starting with the rotate-th.
func APIs(ns []*Node, rotate int) []string {
	var out []string
	for i := range ns {
		out = append(out, ns[(i+rotate)%len(ns)].API)
	}
	return out
}

type syncBuffer struct {
	mu    sync.Mutex
	lines []string
}

func (b *syncBuffer) add(l string) {
	b.mu.Lock()
	b.lines = append(b.lines, l)
	b.mu.Unlock()
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.Join(b.lines, "\n")
}

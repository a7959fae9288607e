package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/store"
)

func newLockCmd(g *globals) *cobra.Command {
	var (
		ttl   time.Duration
		grace time.Duration
		try   bool
	)
	cmd := &cobra.Command{
		Use:   "lock NAME -- COMMAND [ARGS...]",
		Short: "Run a command while holding a lock; stop it if the lock is lost (docs/locks.md)",
		Long: `Takes the lock NAME (waiting in line, or with --try not at all), runs the
command with BEACON_LOCK, BEACON_LOCK_SESSION and BEACON_LOCK_TOKEN (the
fencing token) in its environment, and releases the lock when it exits.
If the lock may be lost (the session could not be renewed in time), the
command gets SIGTERM, then SIGKILL after --grace. The exit code is the
command's.`,
		Example: "  beacon lock nightly-report -- ./report.sh\n  beacon lock --try deploy -- make deploy",
		Args:    cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if cmd.ArgsLenAtDash() != 1 {
				return fmt.Errorf("put -- between the lock name and the command (usage: %s)", cmd.UseLine())
			}
			return holdAndRun(cmd.Context(), g, args[0], args[1:], hold{ttl: ttl, grace: grace, try: try})
		},
	}
	f := cmd.Flags()
	f.DurationVar(&ttl, "ttl", 10*time.Second, "the lock's session TTL: how soon the lock frees after this process dies")
	f.DurationVar(&grace, "grace", 5*time.Second, "after SIGTERM, how long the command has before SIGKILL")
	f.BoolVar(&try, "try", false, "do not wait: fail at once if the lock is held")
	cmd.AddCommand(newLockListCmd(g))
	return cmd
}

// hold says how beacon lock and beacon elect take and keep their lock.
type hold struct {
	ttl, grace time.Duration
	try        bool
	election   bool
	value      []byte
}

// holdAndRun takes the lock (or leads the election) name, runs argv
// while holding it and stops it if the lock may be lost.
func holdAndRun(ctx context.Context, g *globals, name string, argv []string, o hold) error {
	c, err := g.client()
	if err != nil {
		return err
	}
	defer c.Close()
	s, err := c.NewSession(ctx, client.WithTTL(o.ttl), client.WithSessionName("beacon "+map[bool]string{false: "lock ", true: "elect "}[o.election]+name))
	if err != nil {
		return err
	}
	defer s.Close(context.Background())
	var h *client.Held
	switch {
	case o.election:
		h, err = c.Election(s, name, client.InNamespace(g.namespace)).Campaign(ctx, o.value)
	case o.try:
		h, err = c.Mutex(s, name, client.InNamespace(g.namespace)).TryLock(ctx)
	default:
		h, err = c.Mutex(s, name, client.InNamespace(g.namespace)).Lock(ctx)
	}
	if err != nil {
		if interrupted(ctx, err) {
			return nil
		}
		return err
	}
	defer h.Unlock(context.Background())
	session, _ := s.Lease()
	what := "holding lock"
	if o.election {
		what = "leading election"
	}
	fmt.Fprintf(g.stderr, "beacon: %s %s/%s (session %s, fencing token %d)\n", what, g.namespace, name, store.FormatSessionID(session), h.Token())
	child := exec.Command(argv[0], argv[1:]...)
	child.Stdin, child.Stdout, child.Stderr = os.Stdin, g.stdout, g.stderr
	child.Env = append(os.Environ(), "BEACON_LOCK="+name, "BEACON_LOCK_SESSION="+store.FormatSessionID(session), "BEACON_LOCK_TOKEN="+strconv.FormatInt(h.Token(), 10))
	if err := child.Start(); err != nil {
		return err
	}
	exited := make(chan error, 1)
	go func() { exited <- child.Wait() }() // owned here: we wait for it below
	stopChild := func(why string) error {
		fmt.Fprintf(g.stderr, "beacon: %s: stopping the command\n", why)
		child.Process.Signal(syscall.SIGTERM)
		t := time.NewTimer(o.grace)
		defer t.Stop()
		select {
		case err := <-exited:
			return err
		case <-t.C:
			child.Process.Kill()
			return <-exited
		}
	}
	var werr error
	select {
	case werr = <-exited:
	case <-h.Context().Done():
		stopChild(context.Cause(h.Context()).Error())
		return &exitError{code: 1, err: errors.New("the lock was lost")}
	case <-ctx.Done():
		werr = stopChild("interrupted")
	}
	var ee *exec.ExitError
	if errors.As(werr, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return &exitError{code: 128 + int(ws.Signal())} // as a shell reports it
		}
		return &exitError{code: ee.ExitCode()}
	}
	return werr
}

func newElectCmd(g *globals) *cobra.Command {
	var (
		ttl, grace time.Duration
		value      string
	)
	cmd := &cobra.Command{
		Use:   "elect NAME -- COMMAND [ARGS...]",
		Short: "Campaign in an election and run a command while leading; stop it if leadership is lost",
		Long: `Waits until this candidate leads the election NAME (candidates lead in
the order they came), runs the command while leading (with BEACON_LOCK,
BEACON_LOCK_SESSION and BEACON_LOCK_TOKEN in its environment), and resigns
when it exits. --value is what others see as the leader (beacon leader NAME).`,
		Example: "  beacon elect scheduler --value 10.0.0.5:9000 -- ./scheduler",
		Args:    cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if cmd.ArgsLenAtDash() != 1 {
				return fmt.Errorf("put -- between the election name and the command (usage: %s)", cmd.UseLine())
			}
			v := value
			if v == "" {
				host, _ := os.Hostname()
				v = fmt.Sprintf("%s pid %d", host, os.Getpid())
			}
			return holdAndRun(cmd.Context(), g, args[0], args[1:], hold{ttl: ttl, grace: grace, election: true, value: []byte(v)})
		},
	}
	f := cmd.Flags()
	f.DurationVar(&ttl, "ttl", 10*time.Second, "the candidate's session TTL: how soon leadership passes on after this process dies")
	f.DurationVar(&grace, "grace", 5*time.Second, "after SIGTERM, how long the command has before SIGKILL")
	f.StringVar(&value, "value", "", "the leader's value others see (default: host and pid)")
	return cmd
}

func newLeaderCmd(g *globals) *cobra.Command {
	var watch bool
	cmd := &cobra.Command{
		Use:   "leader NAME",
		Short: "Print the leader of an election (or the holder of a lock); --watch follows it",
		Args:  argsNamed("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			print := func(l client.Leader, ok bool) {
				if !ok {
					fmt.Fprintln(g.stdout, "no leader")
					return
				}
				fmt.Fprintf(g.stdout, "%s (session %s, fencing token %d)\n", l.Value, store.FormatSessionID(l.SessionID), l.Token)
			}
			if !watch {
				return g.call(cmd, func(ctx context.Context, c *client.Client) error {
					l, ok, err := c.Leader(ctx, args[0], client.InNamespace(g.namespace))
					if err == nil {
						print(l, ok)
					}
					return err
				})
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			defer c.Close()
			ctx := cmd.Context()
			w, err := c.ObserveLeader(ctx, args[0], client.InNamespace(g.namespace))
			if err != nil {
				return err
			}
			defer w.Close()
			for {
				l, ok, err := w.Next(ctx)
				if err != nil {
					if interrupted(ctx, err) {
						return nil
					}
					return err
				}
				print(l, ok)
			}
		},
	}
	cmd.Flags().BoolVar(&watch, "watch", false, "print every change of leader until interrupted")
	return cmd
}

func newLockListCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "list [PREFIX]",
		Short: "List locks with their holders and waiters",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := g.checkOutput(); err != nil {
				return err
			}
			prefix := ""
			if len(args) == 1 {
				prefix = args[0]
			}
			return g.call(cmd, func(ctx context.Context, c *client.Client) error {
				locks, err := c.Locks(ctx, prefix, client.InNamespace(g.namespace))
				if err != nil {
					return err
				}
				if g.output == "json" {
					return g.printJSON(&beaconv1.ListLocksResponse{Locks: locks})
				}
				tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "LOCK\tHOLDER SESSION\tFENCING TOKEN\tWAITERS")
				for _, l := range locks {
					fmt.Fprintf(tw, "%s\t%s\t%d\t%d\n", l.GetName(), store.FormatSessionID(l.GetHolder().GetSessionId()), l.GetHolder().GetFencingToken(), len(l.GetWaiters()))
				}
				return tw.Flush()
			})
		},
	}
}

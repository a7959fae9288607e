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
			name, argv := args[0], args[1:]
			if cmd.ArgsLenAtDash() != 1 {
				return fmt.Errorf("put -- between the lock name and the command (usage: %s)", cmd.UseLine())
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			defer c.Close()
			ctx := cmd.Context()
			s, err := c.NewSession(ctx, client.WithTTL(ttl), client.WithSessionName("beacon lock "+name))
			if err != nil {
				return err
			}
			defer s.Close(context.Background())
			m := c.Mutex(s, name, client.InNamespace(g.namespace))
			var h *client.Held
			if try {
				h, err = m.TryLock(ctx)
			} else {
				h, err = m.Lock(ctx)
			}
			if err != nil {
				if interrupted(ctx, err) {
					return nil
				}
				return err
			}
			defer h.Unlock(context.Background())
			session, _ := s.Lease()
			fmt.Fprintf(g.stderr, "beacon: holding lock %s/%s (session %s, fencing token %d)\n", g.namespace, name, store.FormatSessionID(session), h.Token())
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
				select {
				case err := <-exited:
					return err
				case <-time.After(grace):
					child.Process.Kill()
					return <-exited
				}
			}
			var werr error
			select {
			case werr = <-exited:
			case <-h.Context().Done():
				werr = stopChild(context.Cause(h.Context()).Error())
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
		},
	}
	f := cmd.Flags()
	f.DurationVar(&ttl, "ttl", 10*time.Second, "the lock's session TTL: how soon the lock frees after this process dies")
	f.DurationVar(&grace, "grace", 5*time.Second, "after SIGTERM, how long the command has before SIGKILL")
	f.BoolVar(&try, "try", false, "do not wait: fail at once if the lock is held")
	cmd.AddCommand(newLockListCmd(g))
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

package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/wire"
	"beacon.dev/beacon/registry"
)

const callTimeout = 10 * time.Second

func newRegisterCmd(g *globals) *cobra.Command {
	var (
		in         registry.Instance
		meta       []string
		status     string
		ttl        time.Duration
		persistent bool
		chk        checkFlags
	)
	cmd := &cobra.Command{
		Use:   "register",
		Short: "Register an instance (ephemeral: held until interrupted; --persistent: returns at once)",
		Example: `  beacon register --service orders --id orders-1 --address 127.0.0.1 --port 9001
  beacon register --service orders --id orders-2 --address 127.0.0.1 --port 9002 --persistent --tag v2 --meta zone=a
  beacon register --service web --id web-1 --address 127.0.0.1 --port 8080 --persistent --check-http http://127.0.0.1:8080/readyz --check-interval 2s`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			var err error
			if in.Metadata, err = parseMeta(meta); err != nil {
				return err
			}
			if status != "" {
				if in.Status, err = registry.ParseStatus(status); err != nil {
					return err
				}
			}
			if persistent && cmd.Flags().Changed("ttl") {
				return errors.New("invalid --ttl: a --persistent instance has no session TTL")
			}
			if in.Checks, err = chk.checks(); err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			defer c.Close()
			in.Namespace = g.namespace
			if persistent {
				cctx, cancel := context.WithTimeout(ctx, callTimeout)
				defer cancel()
				rev, err := c.Register(cctx, in)
				if err != nil {
					return err
				}
				fmt.Fprintf(g.stdout, "registered %s/%s/%s (persistent) at revision %d\n", g.namespace, in.Service, in.ID, rev)
				return nil
			}
			return holdEphemeral(ctx, g, c, in, ttl)
		},
	}
	f := cmd.Flags()
	f.StringVar(&in.Service, "service", "", "service name (required)")
	f.StringVar(&in.ID, "id", "", "instance id (required)")
	f.StringVar(&in.Address, "address", "", "address callers connect to (required)")
	f.IntVar(&in.Port, "port", 0, "port callers connect to (required)")
	f.IntVar(&in.Weight, "weight", registry.DefaultWeight, "load-balancing weight")
	f.StringVar(&in.Zone, "zone", "", "zone")
	f.StringVar(&in.Version, "version", "", "version")
	f.StringSliceVar(&in.Tags, "tag", nil, "tag (repeatable)")
	f.StringArrayVar(&meta, "meta", nil, "metadata key=value (repeatable)")
	f.StringVar(&status, "status", "", "declared status: STARTING, UP (default), DRAINING, OUT_OF_SERVICE")
	f.DurationVar(&ttl, "ttl", registry.DefaultSessionTTL, "session TTL of an ephemeral instance")
	f.BoolVar(&persistent, "persistent", false, "register a persistent instance and return")
	chk.bind(f)
	for _, name := range []string{"service", "id", "address", "port"} {
		_ = cmd.MarkFlagRequired(name)
	}
	return cmd
}

// checkFlags are register's health-check flags: one check per kind given.
type checkFlags struct {
	http, grpcService       string
	tcp, grpc               bool
	ttl                     time.Duration
	interval, timeout       time.Duration
	failures, successes     int
	deregisterAfter         time.Duration
	expectStatus, bodyMatch string
}

func (c *checkFlags) bind(f *pflag.FlagSet) {
	f.StringVar(&c.http, "check-http", "", "HTTP check: the URL to GET (\"default\": http://ADDRESS:PORT/healthz)")
	f.BoolVar(&c.tcp, "check-tcp", false, "TCP check: connect to ADDRESS:PORT")
	f.DurationVar(&c.ttl, "check-ttl", 0, "TTL check: CRITICAL unless 'beacon check-update' (or the API's UpdateCheck) reports within this long")
	f.BoolVar(&c.grpc, "check-grpc", false, "gRPC check: grpc.health.v1 on ADDRESS:PORT")
	f.StringVar(&c.grpcService, "check-grpc-service", "", "gRPC check: the service name to ask about")
	f.DurationVar(&c.interval, "check-interval", 0, "time between probes (default 10s)")
	f.DurationVar(&c.timeout, "check-timeout", 0, "probe timeout (default min(2s, interval))")
	f.IntVar(&c.failures, "check-failures", 0, "failures in a row before CRITICAL (default 3)")
	f.IntVar(&c.successes, "check-successes", 0, "successes in a row before PASSING again (default 2)")
	f.DurationVar(&c.deregisterAfter, "check-deregister-after", 0, "remove the instance once critical this long (default never)")
	f.StringVar(&c.expectStatus, "check-expect-status", "", "HTTP check: status class or code that passes (default 2xx)")
	f.StringVar(&c.bodyMatch, "check-body-contains", "", "HTTP check: text the response body must contain")
}

func (c *checkFlags) checks() ([]registry.Check, error) {
	base := registry.Check{
		Interval: c.interval, Timeout: c.timeout, FailuresBeforeCritical: c.failures,
		SuccessesBeforePassing: c.successes, DeregisterCriticalAfter: c.deregisterAfter,
	}
	var out []registry.Check
	if c.http != "" {
		h := base
		h.Kind, h.ExpectStatus, h.BodyContains = registry.CheckHTTP, c.expectStatus, c.bodyMatch
		if c.http != "default" {
			h.Target = c.http
		}
		out = append(out, h)
	}
	if c.tcp {
		t := base
		t.Kind = registry.CheckTCP
		out = append(out, t)
	}
	if c.ttl > 0 {
		t := base
		t.Kind, t.Interval = registry.CheckTTL, c.ttl
		out = append(out, t)
	}
	if c.grpc || c.grpcService != "" {
		g := base
		g.Kind, g.GRPCService = registry.CheckGRPC, c.grpcService
		out = append(out, g)
	}
	if len(out) == 0 && (c.interval != 0 || c.timeout != 0 || c.failures != 0 || c.successes != 0) {
		return nil, errors.New("invalid --check-*: give --check-http, --check-tcp, --check-grpc or --check-ttl")
	}
	return out, nil
}

// holdEphemeral registers through a session and keeps it until interrupted,
// printing every session event, then deregisters and ends the session.
func holdEphemeral(ctx context.Context, g *globals, c *client.Client, in registry.Instance, ttl time.Duration) error {
	events := func(ev client.SessionEvent) {
		switch ev.Kind {
		case client.SessionRecovered:
			fmt.Fprintf(g.stdout, "session %d expired; re-registered %d instance(s) under new session %d\n", ev.OldSessionID, ev.Reregistered, ev.SessionID)
		case client.SessionDisconnected:
			fmt.Fprintf(g.stdout, "session %d: registry unreachable: %v\n", ev.SessionID, ev.Err)
		default:
			fmt.Fprintf(g.stdout, "session %d %s\n", ev.SessionID, ev.Kind)
		}
	}
	host, _ := os.Hostname()
	sctx, cancel := context.WithTimeout(ctx, callTimeout)
	sess, err := c.NewSession(sctx, client.WithTTL(ttl), client.WithEvents(events),
		client.WithSessionName(fmt.Sprintf("beacon register %s pid %d", host, os.Getpid())))
	cancel()
	if err != nil {
		return err
	}
	rctx, cancel := context.WithTimeout(ctx, callTimeout)
	rev, err := sess.Register(rctx, in)
	cancel()
	if err != nil {
		_ = sess.Close(context.WithoutCancel(ctx))
		return err
	}
	fmt.Fprintf(g.stdout, "registered %s/%s/%s (session %d, ttl %s) at revision %d; Ctrl-C to deregister\n",
		g.namespace, in.Service, in.ID, sess.ID(), sess.TTL(), rev)
	<-ctx.Done()
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), callTimeout)
	defer cancel()
	if _, err := sess.Deregister(dctx, in.Service, in.ID); err != nil {
		fmt.Fprintf(g.stderr, "beacon: deregistering: %v\n", err)
	}
	if err := sess.Close(dctx); err != nil {
		return err
	}
	fmt.Fprintf(g.stdout, "deregistered %s/%s/%s\n", g.namespace, in.Service, in.ID)
	return nil
}

func newDeregisterCmd(g *globals) *cobra.Command {
	var service, id string
	cmd := &cobra.Command{
		Use:   "deregister",
		Short: "Remove an instance",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.call(cmd, func(ctx context.Context, c *client.Client) error {
				found, err := c.Deregister(ctx, service, id, client.InNamespace(g.namespace))
				if err != nil {
					return err
				}
				if !found {
					return fmt.Errorf("instance %s/%s/%s not found", g.namespace, service, id)
				}
				fmt.Fprintf(g.stdout, "deregistered %s/%s/%s\n", g.namespace, service, id)
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&service, "service", "", "service name (required)")
	cmd.Flags().StringVar(&id, "id", "", "instance id (required)")
	_ = cmd.MarkFlagRequired("service")
	_ = cmd.MarkFlagRequired("id")
	return cmd
}

func newServicesCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "services",
		Short: "List the services of a namespace",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := g.checkOutput(); err != nil {
				return err
			}
			return g.call(cmd, func(ctx context.Context, c *client.Client) error {
				svcs, err := c.Services(ctx, client.InNamespace(g.namespace))
				if err != nil {
					return err
				}
				if g.output == "json" {
					out := &beaconv1.ListServicesResponse{}
					for _, s := range svcs {
						out.Services = append(out.Services, &beaconv1.ServiceSummary{
							Name: s.Name, Instances: int32(s.Instances), Routable: int32(s.Routable), Revision: s.Revision,
						})
					}
					return g.printJSON(out)
				}
				tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "SERVICE\tINSTANCES\tROUTABLE\tREVISION")
				for _, s := range svcs {
					fmt.Fprintf(tw, "%s\t%d\t%d\t%d\n", s.Name, s.Instances, s.Routable, s.Revision)
				}
				return tw.Flush()
			})
		},
	}
}

func newInstancesCmd(g *globals) *cobra.Command {
	var all bool
	cmd := &cobra.Command{
		Use:   "instances SERVICE",
		Short: "List a service's instances (routable only, unless --all)",
		Args:  argsNamed("SERVICE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := g.checkOutput(); err != nil {
				return err
			}
			return g.call(cmd, func(ctx context.Context, c *client.Client) error {
				var opts []client.CallOption
				if all {
					opts = append(opts, client.All())
				}
				if g.output == "json" {
					// The full snapshot, filtered as the server filters:
					// the API's own answer, field for field.
					snap, err := c.Instances(ctx, args[0], client.All())
					if err != nil {
						return err
					}
					return g.printJSON(wire.ListInstancesResponse(snap, all))
				}
				snap, err := c.Instances(ctx, args[0], opts...)
				if err != nil {
					return err
				}
				if len(snap.Instances) == 0 {
					switch {
					case snap.Filtered && snap.Revision == 0: // the answer to a token that may not read it: empty
						fmt.Fprintf(g.stdout, "%s/%s: hidden — the token may not read this service (ACLs filtered the answer)\n", g.namespace, args[0])
					case all:
						fmt.Fprintf(g.stdout, "%s/%s has no instances\n", g.namespace, args[0])
					default:
						fmt.Fprintf(g.stdout, "%s/%s has no routable instances (--all lists every one)\n", g.namespace, args[0])
					}
					return nil
				}
				tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "ID\tADDRESS\tWEIGHT\tZONE\tSTATUS\tHEALTH\tKIND\tTAGS\tREVISION")
				for _, in := range snap.Instances {
					kind := "persistent"
					if in.Ephemeral() {
						kind = "ephemeral"
					}
					fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%d\n", in.ID, in.HostPort(), in.Weight,
						dash(in.Zone), in.Status, in.Health, kind, dash(strings.Join(in.Tags, ",")), in.Revision)
				}
				if err := tw.Flush(); err != nil {
					return err
				}
				if !all {
					for _, in := range snap.Instances {
						if !in.Routable() {
							fmt.Fprintf(g.stdout, "protection engaged (threshold %g): unhealthy instances are listed too\n", snap.ProtectionThreshold)
							break
						}
					}
				}
				printChecks(g, snap)
				return nil
			})
		},
	}
	cmd.Flags().BoolVar(&all, "all", false, "include instances that are not routable")
	return cmd
}

// printChecks lists the checks of the instances that have any.
func printChecks(g *globals, snap *registry.Snapshot) {
	tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
	header := false
	for _, in := range snap.Instances {
		for _, c := range in.Checks {
			if !header {
				fmt.Fprintln(tw, "\nINSTANCE\tCHECK\tKIND\tTARGET\tSTATUS\tSINCE\tOUTPUT")
				header = true
			}
			since := "-"
			if !c.Since.IsZero() {
				since = c.Since.UTC().Format(time.RFC3339)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", in.ID, c.Name, c.Kind, c.ProbeTarget(in), c.Status, since, dash(c.Output))
		}
	}
	tw.Flush()
}

func newCheckUpdateCmd(g *globals) *cobra.Command {
	var check, note string
	cmd := &cobra.Command{
		Use:     "check-update SERVICE ID STATUS",
		Short:   "Report the status (PASSING, WARNING, CRITICAL) of an instance's TTL check and renew its TTL",
		Example: `  beacon check-update batch batch-1 PASSING --note "queue depth 3"`,
		Args:    argsNamed("SERVICE", "ID", "STATUS"),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := registry.ParseHealth(args[2])
			if err != nil {
				return err
			}
			return g.call(cmd, func(ctx context.Context, c *client.Client) error {
				rev, err := c.UpdateCheck(ctx, args[0], args[1], check, st, note, client.InNamespace(g.namespace))
				if err != nil {
					return err
				}
				if rev == 0 {
					fmt.Fprintf(g.stdout, "%s/%s/%s check %s: still %s, TTL renewed\n", g.namespace, args[0], args[1], dash(check), st)
				} else {
					fmt.Fprintf(g.stdout, "%s/%s/%s check %s: now %s (revision %d)\n", g.namespace, args[0], args[1], dash(check), st, rev)
				}
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&check, "check", "", "the TTL check's name (default ttl)")
	// Not --output: that is the global -o/--output (table or json).
	cmd.Flags().StringVar(&note, "note", "", "text shown with the status, as the check's output (at most 256 bytes)")
	return cmd
}

func newProtectCmd(g *globals) *cobra.Command {
	var useDefault bool
	cmd := &cobra.Command{
		Use:   "protect SERVICE [THRESHOLD]",
		Short: "Set a service's protection threshold in [0, 1]: below that share of routable instances, discovery returns the unhealthy ones too (0: off)",
		Example: `  beacon protect orders 0.5
  beacon protect orders --default`,
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			threshold := 0.0
			switch {
			case useDefault && len(args) == 2:
				return errors.New("invalid THRESHOLD: give a threshold or --default, not both")
			case !useDefault && len(args) == 1:
				return errors.New("invalid THRESHOLD: missing (or give --default)")
			case len(args) == 2:
				var err error
				if threshold, err = strconv.ParseFloat(args[1], 64); err != nil {
					return fmt.Errorf("invalid THRESHOLD %q: must be a number between 0 and 1", args[1])
				}
			}
			return g.call(cmd, func(ctx context.Context, c *client.Client) error {
				set := func() (int64, error) {
					return c.SetProtectionThreshold(ctx, args[0], threshold, client.InNamespace(g.namespace))
				}
				if useDefault {
					set = func() (int64, error) {
						return c.ResetProtectionThreshold(ctx, args[0], client.InNamespace(g.namespace))
					}
				}
				rev, err := set()
				if err != nil {
					return err
				}
				if useDefault {
					fmt.Fprintf(g.stdout, "%s/%s uses the server's default protection threshold (revision %d)\n", g.namespace, args[0], rev)
				} else {
					fmt.Fprintf(g.stdout, "%s/%s protection threshold %g (revision %d)\n", g.namespace, args[0], threshold, rev)
				}
				return nil
			})
		},
	}
	cmd.Flags().BoolVar(&useDefault, "default", false, "forget the service's threshold: the server's default applies")
	return cmd
}

func newStatusCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "status SERVICE ID STATUS",
		Short: "Set an instance's status: OUT_OF_SERVICE for maintenance (kept when it re-registers), UP to put it back",
		Example: `  beacon status orders orders-1 OUT_OF_SERVICE
  beacon status orders orders-1 UP`,
		Args: argsNamed("SERVICE", "ID", "STATUS"),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := registry.ParseStatus(args[2])
			if err != nil {
				return err
			}
			return g.call(cmd, func(ctx context.Context, c *client.Client) error {
				in, err := c.SetStatus(ctx, args[0], args[1], st, client.InNamespace(g.namespace))
				if err != nil {
					return err
				}
				fmt.Fprintf(g.stdout, "%s/%s/%s is %s (health %s) at revision %d\n", in.Namespace, in.Service, in.ID, in.Status, in.Health, in.Revision)
				return nil
			})
		},
	}
	return cmd
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func newWatchCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "watch [SERVICE...]",
		Short: "Print a line per change of the named services (all services when none is named)",
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := g.checkOutput(); err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			defer c.Close()
			ctx := cmd.Context()
			w, err := c.Watch(ctx, args)
			if err != nil {
				return err
			}
			defer w.Close()
			out := &lockedWriter{w: g.stdout}
			if g.output == "table" {
				stop := reportWatchState(ctx, w, out)
				defer stop()
			}
			printed := map[string]int64{} // service → revision last printed
			for {
				snaps, err := w.Next(ctx)
				if err != nil {
					if interrupted(ctx, err) {
						return nil
					}
					return err
				}
				// After a resume nothing already printed is printed again.
				fresh := snaps[:0:0]
				for _, s := range snaps {
					if last, ok := printed[s.Service]; !ok || s.Revision > last {
						printed[s.Service] = s.Revision
						fresh = append(fresh, s)
					}
				}
				if len(fresh) == 0 {
					continue
				}
				if g.output == "json" {
					// One compact WatchResponse per line, for jq.
					if err := jsonLine(out, watchResponse(fresh)); err != nil {
						return err
					}
					continue
				}
				for _, s := range fresh {
					fmt.Fprintf(out, "rev=%d %s/%s routable=%d total=%d [%s]\n", s.Revision, s.Namespace, s.Service,
						len(s.Routable()), len(s.Instances), summarize(s))
				}
			}
		},
	}
}

// reportWatchState prints a line when the watch loses its server and when
// it is back, so that silence never hides an unreachable registry. It polls
// the watcher's status until stop is called.
func reportWatchState(ctx context.Context, w *client.Watcher, out io.Writer) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { // owned: ends with stop
		defer close(done)
		tick := time.NewTicker(250 * time.Millisecond)
		defer tick.Stop()
		up := true
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			st := w.Status()
			switch {
			case up && !st.Connected && st.LastErr != nil:
				fmt.Fprintf(out, "watch: registry unreachable (%v); retrying\n", st.LastErr)
				up = false
			case !up && st.Connected:
				fmt.Fprintln(out, "watch: reconnected; changes missed meanwhile follow")
				up = true
			}
		}
	}()
	return func() { cancel(); <-done }
}

// lockedWriter serializes the watch's lines and its state reports.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func watchResponse(snaps []*registry.Snapshot) *beaconv1.WatchResponse {
	resp := &beaconv1.WatchResponse{}
	for _, s := range snaps {
		resp.Snapshots = append(resp.Snapshots, wire.SnapshotToProto(s))
	}
	return resp
}

func summarize(s *registry.Snapshot) string {
	parts := make([]string, 0, len(s.Instances))
	for _, in := range s.Instances {
		p := in.ID + "@" + in.HostPort()
		if !in.Routable() {
			p += "(" + in.Status.String() + "," + in.Health.String() + ")"
		}
		parts = append(parts, p)
	}
	return strings.Join(parts, " ")
}

package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"beacon.dev/beacon/server"
)

// operatorFlags are the flags of the operator commands, which talk to etcd
// itself (the registry's API may be refusing writes, or be down).
type operatorFlags struct {
	endpoints []string
	timeout   time.Duration
}

func newOperatorCmd(g *globals) *cobra.Command {
	of := &operatorFlags{}
	cmd := &cobra.Command{
		Use:   "operator",
		Short: "Operate the etcd under beacon: database space, alarms, recovery",
		Long: `Operator commands talk to etcd directly, not to a beacon server: with an
embedded etcd, its client address (--etcd-client-addr of 'beacon server');
with an external one, the same --etcd-endpoints the servers use. Every
member in the cluster's member list is asked. See docs/operations.md.`,
	}
	def := os.Getenv("BEACON_ETCD_ENDPOINTS")
	if def == "" {
		def = "http://" + server.DefaultEtcdClientAddr
	}
	pf := cmd.PersistentFlags()
	pf.StringSliceVar(&of.endpoints, "etcd-endpoints", strings.Split(def, ","), "etcd client URL(s), comma-separated (env BEACON_ETCD_ENDPOINTS)")
	pf.DurationVar(&of.timeout, "timeout", 5*time.Minute, "bound on the whole command (a defragmentation rewrites the database)")
	cmd.AddCommand(newSpaceCmd(g, of), newRecoverSpaceCmd(g, of))
	return cmd
}

func newSpaceCmd(g *globals, of *operatorFlags) *cobra.Command {
	var quota int64
	cmd := &cobra.Command{
		Use:   "space",
		Short: "Show each etcd member's database size, the part in use, the quota, and the alarms",
		Example: `  beacon operator space
  beacon operator space --etcd-endpoints http://10.0.0.1:2379,http://10.0.0.2:2379 -o json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := g.checkOutput(); err != nil {
				return err
			}
			return of.withEtcd(cmd, func(ctx context.Context, cli *clientv3.Client) error {
				sp, err := server.ReadSpace(ctx, cli, server.SpaceEndpoints(ctx, cli), quota)
				if err != nil {
					return err
				}
				if g.output == "json" {
					return g.printJSON(sp)
				}
				printSpace(g, sp)
				return nil
			})
		},
	}
	cmd.Flags().Int64Var(&quota, "quota-backend-bytes", 0, "quota to assume for members that do not report theirs (etcd before 3.6; default etcd's 2 GiB)")
	return cmd
}

func newRecoverSpaceCmd(g *globals, of *operatorFlags) *cobra.Command {
	var quota int64
	cmd := &cobra.Command{
		Use:   "recover-space",
		Short: "Compact etcd's history, defragment every member and disarm the NOSPACE alarm",
		Long: `recover-space compacts all of etcd's history up to the current revision
(watchers behind it re-list), defragments every member in turn (each member
blocks while it rewrites its database) and, once every member's database is
under 80% of its quota, disarms the NOSPACE alarm. When the records
themselves fill the quota it stops there: delete records or raise the quota
(--etcd-quota-backend-bytes), then run it again. Running it twice is
harmless.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := g.checkOutput(); err != nil {
				return err
			}
			return of.withEtcd(cmd, func(ctx context.Context, cli *clientv3.Client) error {
				rep, err := server.RecoverSpace(ctx, cli, server.RecoverOptions{Quota: quota})
				if g.output == "json" {
					if jerr := g.printJSON(rep); jerr != nil {
						return jerr
					}
					return err
				}
				printRecovery(g, rep)
				return err
			})
		},
	}
	cmd.Flags().Int64Var(&quota, "quota-backend-bytes", 0, "quota to assume for members that do not report theirs (etcd before 3.6; default etcd's 2 GiB)")
	return cmd
}

// withEtcd runs f with an etcd client and a context bounded by --timeout.
func (of *operatorFlags) withEtcd(cmd *cobra.Command, f func(ctx context.Context, cli *clientv3.Client) error) error {
	if of.timeout <= 0 {
		return fmt.Errorf("invalid --timeout %s: must be positive", of.timeout)
	}
	if len(of.endpoints) == 0 {
		return errors.New("invalid --etcd-endpoints: must list at least one URL")
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   of.endpoints,
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(),
	})
	if err != nil {
		return fmt.Errorf("connecting to etcd %v: %w", of.endpoints, err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(cmd.Context(), of.timeout)
	defer cancel()
	return f(ctx, cli)
}

func printSpace(g *globals, sp *server.Space) {
	tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "MEMBER\tENDPOINT\tDB SIZE\tIN USE\tQUOTA\tOF QUOTA")
	for _, m := range sp.Members {
		if m.Err != "" {
			fmt.Fprintf(tw, "-\t%s\terror: %s\t\t\t\n", m.Endpoint, m.Err)
			continue
		}
		fmt.Fprintf(tw, "%x\t%s\t%s\t%s\t%s\t%.0f%%\n", m.MemberID, m.Endpoint, formatBytes(m.DBSize), formatBytes(m.DBSizeInUse), formatBytes(m.Quota), 100*float64(m.DBSize)/float64(m.Quota))
	}
	tw.Flush()
	fmt.Fprintf(g.stdout, "revision %d\n", sp.Revision)
	if len(sp.Alarms) == 0 {
		fmt.Fprintln(g.stdout, "alarms: none")
		return
	}
	for _, a := range sp.Alarms {
		fmt.Fprintf(g.stdout, "alarm: %s on member %x\n", a.Type, a.MemberID)
	}
	if sp.Has("NOSPACE") {
		fmt.Fprintln(g.stdout, "etcd refuses writes (NOSPACE): run 'beacon operator recover-space'; see docs/operations.md")
	}
}

func printRecovery(g *globals, rep *server.RecoverReport) {
	if rep.CompactedTo > 0 {
		fmt.Fprintf(g.stdout, "compacted history up to revision %d\n", rep.CompactedTo)
	}
	before := map[string]server.MemberSpace{}
	for _, m := range rep.Before {
		before[m.Endpoint] = m
	}
	for _, m := range rep.After {
		b := before[m.Endpoint]
		fmt.Fprintf(g.stdout, "defragmented %s: %s -> %s (quota %s)\n", m.Endpoint, formatBytes(b.DBSize), formatBytes(m.DBSize), formatBytes(m.Quota))
	}
	for _, a := range rep.Disarmed {
		fmt.Fprintf(g.stdout, "disarmed %s on member %x\n", a.Type, a.MemberID)
	}
	if len(rep.After) > 0 && len(rep.Disarmed) == 0 {
		fmt.Fprintln(g.stdout, "no NOSPACE alarm to disarm")
	}
}

// formatBytes prints n in the largest binary unit that keeps it above 1.
func formatBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTP"[exp])
}

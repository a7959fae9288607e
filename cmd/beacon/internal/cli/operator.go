package cli

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"beacon.dev/beacon/server"
)

// operatorFlags are the flags of the operator commands, which talk to etcd
// itself (the registry's API may be refusing writes, or be down).
type operatorFlags struct {
	endpoints                 []string
	dataDir                   string
	caFile, certFile, keyFile string
	timeout                   time.Duration
}

func newOperatorCmd(g *globals) *cobra.Command {
	of := &operatorFlags{}
	cmd := &cobra.Command{
		Use:   "operator",
		Short: "Operate the etcd under beacon: database space, alarms, recovery",
		Long: `Operator commands talk to etcd directly, not to a beacon server. By default
they use the embedded etcd's socket in --data-dir (the server's, run on its
machine as its user); otherwise --etcd-endpoints: a TCP client listener of
the embedded etcd (--etcd-client-addr of 'beacon server'), or the same
endpoints the servers use with an external etcd, with --etcd-cacert,
--etcd-cert and --etcd-key for TLS. Through a socket they see the one member
behind it; through endpoints, every member in the cluster's member list.
See docs/operations.md.`,
	}
	var def []string
	if env := os.Getenv("BEACON_ETCD_ENDPOINTS"); env != "" {
		def = strings.Split(env, ",")
	}
	pf := cmd.PersistentFlags()
	pf.StringSliceVar(&of.endpoints, "etcd-endpoints", def, "etcd client URL(s), comma-separated (env BEACON_ETCD_ENDPOINTS; default: the socket in --data-dir)")
	pf.StringVar(&of.dataDir, "data-dir", server.DefaultDataDir, "data directory of the 'beacon server' whose embedded etcd to use, through its socket")
	pf.StringVar(&of.caFile, "etcd-cacert", "", "trust these CAs for --etcd-endpoints (PEM; default: the system's)")
	pf.StringVar(&of.certFile, "etcd-cert", "", "present this client certificate to --etcd-endpoints (PEM)")
	pf.StringVar(&of.keyFile, "etcd-key", "", "the --etcd-cert's private key (PEM)")
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
	endpoints := of.endpoints
	if len(endpoints) == 0 {
		socket, err := embeddedSocket(of.dataDir)
		if err != nil {
			return err
		}
		endpoints = []string{"unix://" + socket}
	}
	if (of.certFile == "") != (of.keyFile == "") {
		return errors.New("invalid --etcd-cert / --etcd-key: give both or neither")
	}
	var tlsCfg *tls.Config
	if of.caFile != "" || of.certFile != "" {
		var err error
		tlsCfg, err = transport.TLSInfo{TrustedCAFile: of.caFile, CertFile: of.certFile, KeyFile: of.keyFile}.ClientConfig()
		if err != nil {
			return fmt.Errorf("TLS for --etcd-endpoints: %w", err)
		}
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   endpoints,
		TLS:         tlsCfg,
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(),
	})
	if err != nil {
		return fmt.Errorf("connecting to etcd %v: %w", endpoints, err)
	}
	defer cli.Close()
	ctx, cancel := context.WithTimeout(cmd.Context(), of.timeout)
	defer cancel()
	return f(ctx, cli)
}

// embeddedSocket returns the embedded etcd's socket in dataDir once it
// has checked that this process may connect to it: etcd's client would
// only retry until the timeout, without saying why.
func embeddedSocket(dataDir string) (string, error) {
	socket, err := server.EtcdSocket(dataDir)
	if err != nil {
		return "", err
	}
	c, err := net.DialTimeout("unix", socket, 5*time.Second)
	switch {
	case errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED):
		return "", fmt.Errorf("no embedded etcd at %s: run this where 'beacon server --data-dir %s' runs, or give --data-dir, or --etcd-endpoints", socket, dataDir)
	case errors.Is(err, fs.ErrPermission):
		return "", fmt.Errorf("the embedded etcd's socket %s is the server's user's only: run this as that user (%w)", socket, err)
	case err != nil:
		return "", fmt.Errorf("the embedded etcd's socket %s: %w", socket, err)
	}
	c.Close()
	return socket, nil
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

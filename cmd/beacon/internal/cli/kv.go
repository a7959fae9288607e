package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/timestamppb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/internal/store"
)

func newKVCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "kv",
		Short: "The KV config store: get, put, delete, list, watch, history, diff, rollback (docs/kv.md)",
	}
	cmd.AddCommand(newKVGetCmd(g), newKVPutCmd(g), newKVDeleteCmd(g), newKVListCmd(g), newKVWatchCmd(g), newKVHistoryCmd(g), newKVDiffCmd(g), newKVRollbackCmd(g), newKVRolloutCmd(g))
	return cmd
}

func kvProto(kv client.KeyValue) *beaconv1.KeyValue {
	return &beaconv1.KeyValue{Key: kv.Key, Value: kv.Value, CreateRevision: kv.CreateRevision, ModRevision: kv.ModRevision, Version: kv.Version}
}

func newKVGetCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:     "get KEY",
		Short:   "Print a key's value (-o json: with its revisions)",
		Example: "  beacon kv get shop/pricing\n  beacon kv get shop/pricing -o json",
		Args:    argsNamed("KEY"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := g.checkOutput(); err != nil {
				return err
			}
			return g.call(cmd, func(ctx context.Context, c *client.Client) error {
				kv, err := c.KV().Get(ctx, args[0], client.InNamespace(g.namespace))
				if err != nil {
					return err
				}
				if g.output == "json" {
					return g.printJSON(&beaconv1.KVGetResponse{Kv: kvProto(kv)})
				}
				_, err = g.stdout.Write(kv.Value)
				return err
			})
		},
	}
}

// casFlag is --cas: compare against a revision (0: the key must not exist).
type casFlag struct {
	rev int64
	set bool
}

func (f *casFlag) bind(cmd *cobra.Command, what string) {
	cmd.Flags().Int64Var(&f.rev, "cas", 0, what+" only if the key's revision is this (0: only if it does not exist)")
}

func (f *casFlag) read(cmd *cobra.Command) { f.set = cmd.Flags().Changed("cas") }

func newKVPutCmd(g *globals) *cobra.Command {
	var (
		file string
		cas  casFlag
	)
	cmd := &cobra.Command{
		Use:   "put KEY [VALUE]",
		Short: "Write a key (the value from the argument, --file, or standard input with --file -)",
		Example: `  beacon kv put shop/pricing '{"discount":0.1}'
  beacon kv put shop/pricing --file pricing.json --cas 42`,
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			cas.read(cmd)
			value, err := valueOf(args, file, cmd)
			if err != nil {
				return err
			}
			return g.call(cmd, func(ctx context.Context, c *client.Client) error {
				var rev int64
				var err error
				if cas.set {
					rev, err = c.KV().CompareAndSwap(ctx, args[0], value, cas.rev, client.InNamespace(g.namespace))
				} else {
					rev, err = c.KV().Put(ctx, args[0], value, client.InNamespace(g.namespace))
				}
				if err != nil {
					return err
				}
				fmt.Fprintf(g.stdout, "put %s/%s at revision %d\n", g.namespace, args[0], rev)
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&file, "file", "", "read the value from this file (- : standard input)")
	cas.bind(cmd, "write")
	return cmd
}

func newKVDeleteCmd(g *globals) *cobra.Command {
	var cas casFlag
	cmd := &cobra.Command{
		Use:   "delete KEY",
		Short: "Delete a key (its history stays: kv history, kv rollback)",
		Args:  argsNamed("KEY"),
		RunE: func(cmd *cobra.Command, args []string) error {
			cas.read(cmd)
			return g.call(cmd, func(ctx context.Context, c *client.Client) error {
				if cas.set {
					rev, err := c.KV().CompareAndDelete(ctx, args[0], cas.rev, client.InNamespace(g.namespace))
					if err != nil {
						return err
					}
					fmt.Fprintf(g.stdout, "deleted %s/%s at revision %d\n", g.namespace, args[0], rev)
					return nil
				}
				found, rev, err := c.KV().Delete(ctx, args[0], client.InNamespace(g.namespace))
				if err != nil {
					return err
				}
				if !found {
					fmt.Fprintf(g.stdout, "%s/%s: no such key\n", g.namespace, args[0])
					return nil
				}
				fmt.Fprintf(g.stdout, "deleted %s/%s at revision %d\n", g.namespace, args[0], rev)
				return nil
			})
		},
	}
	cas.bind(cmd, "delete")
	return cmd
}

func newKVListCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "list [PREFIX]",
		Short: "List the keys starting with PREFIX, with their revisions and sizes",
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
				kvs, rev, err := c.KV().List(ctx, prefix, client.InNamespace(g.namespace))
				if err != nil {
					return err
				}
				if g.output == "json" {
					out := &beaconv1.KVListResponse{Revision: rev}
					for _, kv := range kvs {
						out.Kvs = append(out.Kvs, kvProto(kv))
					}
					return g.printJSON(out)
				}
				tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "KEY\tREVISION\tVERSION\tBYTES")
				for _, kv := range kvs {
					fmt.Fprintf(tw, "%s\t%d\t%d\t%d\n", kv.Key, kv.ModRevision, kv.Version, len(kv.Value))
				}
				return tw.Flush()
			})
		},
	}
}

func newKVWatchCmd(g *globals) *cobra.Command {
	var prefix bool
	cmd := &cobra.Command{
		Use:   "watch KEY",
		Short: "Print a key's (or with --prefix, every matching key's) changes until interrupted",
		Args:  argsNamed("KEY"),
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
			w, err := c.KV().Watch(ctx, args[0], prefix, client.InNamespace(g.namespace))
			if err != nil {
				return err
			}
			defer w.Close()
			var last map[string]client.KeyValue
			for {
				st, err := w.Next(ctx)
				if err != nil {
					if interrupted(ctx, err) {
						return nil
					}
					return err
				}
				if err := printKVChanges(g, last, st); err != nil {
					return err
				}
				last = st.Values
			}
		},
	}
	cmd.Flags().BoolVar(&prefix, "prefix", false, "watch every key starting with KEY")
	return cmd
}

// printKVChanges prints what changed from last to st: a line per key in
// the table form, a KVWatchResponse per state with -o json.
func printKVChanges(g *globals, last map[string]client.KeyValue, st client.KVState) error {
	resp := &beaconv1.KVWatchResponse{Revision: st.Revision, FullState: last == nil}
	for key, kv := range st.Values {
		if old, ok := last[key]; last == nil || !ok || old.ModRevision != kv.ModRevision {
			resp.Events = append(resp.Events, &beaconv1.KVEvent{Kv: kvProto(kv)})
		}
	}
	for key := range last {
		if _, ok := st.Values[key]; !ok {
			resp.Events = append(resp.Events, &beaconv1.KVEvent{Kv: &beaconv1.KeyValue{Key: key}, Deleted: true})
		}
	}
	if g.output == "json" {
		return jsonLine(g.stdout, resp)
	}
	if last == nil {
		fmt.Fprintf(g.stdout, "revision %d: %d keys\n", st.Revision, len(st.Values))
	}
	for _, ev := range resp.GetEvents() {
		if ev.GetDeleted() {
			fmt.Fprintf(g.stdout, "revision %d: deleted %s\n", st.Revision, ev.GetKv().GetKey())
		} else {
			fmt.Fprintf(g.stdout, "revision %d: %s = %s\n", ev.GetKv().GetModRevision(), ev.GetKv().GetKey(), oneLine(ev.GetKv().GetValue()))
		}
	}
	return nil
}

// oneLine shows a value on one line, shortened.
func oneLine(v []byte) string {
	s := strconv.Quote(string(v))
	if len(s) > 80 {
		s = s[:77] + "…\""
	}
	return s
}

func kvHistory(ctx context.Context, g *globals, c *client.Client, key string) ([]client.KeyVersion, error) {
	return c.KV().History(ctx, key, client.InNamespace(g.namespace))
}

func newKVHistoryCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "history KEY",
		Short: "List the kept versions of a key, oldest first (the server keeps --kv-history of them)",
		Args:  argsNamed("KEY"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := g.checkOutput(); err != nil {
				return err
			}
			return g.call(cmd, func(ctx context.Context, c *client.Client) error {
				vs, err := kvHistory(ctx, g, c, args[0])
				if err != nil {
					return err
				}
				if g.output == "json" {
					out := &beaconv1.KVHistoryResponse{}
					for _, v := range vs {
						out.Versions = append(out.Versions, &beaconv1.KVVersion{Revision: v.Revision, Value: v.Value, Deleted: v.Deleted, Time: timestamppb.New(v.Time), Accessor: v.Accessor, RollbackOf: v.RollbackOf})
					}
					return g.printJSON(out)
				}
				tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "REVISION\tTIME\tBY\tVALUE")
				for _, v := range vs {
					value := oneLine(v.Value)
					switch {
					case v.Deleted:
						value = "(deleted)"
					case v.RollbackOf != 0:
						value += fmt.Sprintf(" (rollback to %d)", v.RollbackOf)
					}
					by := v.Accessor
					if by == "" {
						by = "-"
					}
					fmt.Fprintf(tw, "%d\t%s\t%s\t%s\n", v.Revision, v.Time.Local().Format(time.DateTime), by, value)
				}
				return tw.Flush()
			})
		},
	}
}

func newKVDiffCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:     "diff KEY REV [REV2]",
		Short:   "Show how a key's version REV differs from REV2 (default: the current version), line by line",
		Example: "  beacon kv history shop/pricing\n  beacon kv diff shop/pricing 41",
		Args:    cobra.RangeArgs(2, 3),
		RunE: func(cmd *cobra.Command, args []string) error {
			var revs []int64
			for _, a := range args[1:] {
				r, err := strconv.ParseInt(a, 10, 64)
				if err != nil || r <= 0 {
					return fmt.Errorf("invalid revision %q: want a revision from kv history", a)
				}
				revs = append(revs, r)
			}
			return g.call(cmd, func(ctx context.Context, c *client.Client) error {
				vs, err := kvHistory(ctx, g, c, args[0])
				if err != nil {
					return err
				}
				if len(vs) == 0 {
					return fmt.Errorf("%s/%s has no history", g.namespace, args[0])
				}
				find := func(rev int64) (client.KeyVersion, error) {
					for _, v := range vs {
						if v.Revision == rev {
							return v, nil
						}
					}
					return client.KeyVersion{}, fmt.Errorf("%s/%s has no version at revision %d (see kv history)", g.namespace, args[0], rev)
				}
				from, err := find(revs[0])
				if err != nil {
					return err
				}
				to := vs[len(vs)-1]
				if len(revs) == 2 {
					if to, err = find(revs[1]); err != nil {
						return err
					}
				}
				fmt.Fprintf(g.stdout, "--- %s@%d\n+++ %s@%d\n", args[0], from.Revision, args[0], to.Revision)
				return writeLineDiff(g.stdout, string(from.Value), string(to.Value))
			})
		},
	}
}

// maxDiffLines bounds each side of a diff: the table is lines × lines.
const maxDiffLines = 4000

// writeLineDiff prints b against a: unchanged lines with "  ", removed
// with "- ", added with "+ " (a longest-common-subsequence diff).
func writeLineDiff(w io.Writer, a, b string) error {
	x, y := splitLines(a), splitLines(b)
	if len(x) > maxDiffLines || len(y) > maxDiffLines {
		return fmt.Errorf("the versions have %d and %d lines, more than the %d this diff compares; use kv get and a diff tool", len(x), len(y), maxDiffLines)
	}
	// lcs[i][j]: the longest common subsequence of x[i:] and y[j:].
	lcs := make([][]int32, len(x)+1)
	for i := range lcs {
		lcs[i] = make([]int32, len(y)+1)
	}
	for i := len(x) - 1; i >= 0; i-- {
		for j := len(y) - 1; j >= 0; j-- {
			if x[i] == y[j] {
				lcs[i][j] = lcs[i+1][j+1] + 1
			} else {
				lcs[i][j] = max(lcs[i+1][j], lcs[i][j+1])
			}
		}
	}
	line := func(mark, s string) {
		fmt.Fprintf(w, "%s%s", mark, s)
		if !strings.HasSuffix(s, "\n") {
			fmt.Fprintln(w)
		}
	}
	i, j := 0, 0
	for i < len(x) || j < len(y) {
		switch {
		case i < len(x) && j < len(y) && x[i] == y[j]:
			line("  ", x[i])
			i, j = i+1, j+1
		case i < len(x) && (j == len(y) || lcs[i+1][j] >= lcs[i][j+1]):
			line("- ", x[i])
			i++
		default:
			line("+ ", y[j])
			j++
		}
	}
	return nil
}

// splitLines splits s after each newline, without the empty tail a final
// newline leaves.
func splitLines(s string) []string {
	lines := strings.SplitAfter(s, "\n")
	if lines[len(lines)-1] == "" {
		lines = lines[:len(lines)-1]
	}
	return lines
}

func newKVRollbackCmd(g *globals) *cobra.Command {
	var to int64
	cmd := &cobra.Command{
		Use:     "rollback KEY --to REV",
		Short:   "Write a key's version REV (from kv history) again, as its newest version",
		Example: "  beacon kv rollback shop/pricing --to 41",
		Args:    argsNamed("KEY"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if to <= 0 {
				return errors.New("missing --to REV: the revision of the version to write again (see kv history)")
			}
			return g.call(cmd, func(ctx context.Context, c *client.Client) error {
				rev, err := c.KV().Rollback(ctx, args[0], to, client.InNamespace(g.namespace))
				if err != nil {
					return err
				}
				fmt.Fprintf(g.stdout, "rolled %s/%s back to revision %d's version, now at revision %d\n", g.namespace, args[0], to, rev)
				return nil
			})
		},
	}
	cmd.Flags().Int64Var(&to, "to", 0, "the revision of the version to write again")
	return cmd
}

func newKVRolloutCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "rollout",
		Short: "Staged rollout of a key: start, status, promote, abort (docs/kv.md)",
	}
	var (
		labels  []string
		percent int32
		file    string
	)
	start := &cobra.Command{
		Use:   "start KEY [VALUE]",
		Short: "Publish a new value to the readers the selector picks (--labels, --percent)",
		Example: `  beacon kv rollout start shop/pricing '{"discount":0.2}' --labels zone=eu-1
  beacon kv rollout start shop/pricing --file pricing.json --percent 10`,
		Args: cobra.RangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			value, err := valueOf(args, file, cmd)
			if err != nil {
				return err
			}
			sel, err := parseMeta(labels)
			if err != nil {
				return err
			}
			return g.call(cmd, func(ctx context.Context, c *client.Client) error {
				rev, err := c.KV().StartRollout(ctx, args[0], value, sel, percent, client.InNamespace(g.namespace))
				if err != nil {
					return err
				}
				fmt.Fprintf(g.stdout, "rollout of %s/%s started at revision %d\n", g.namespace, args[0], rev)
				return nil
			})
		},
	}
	start.Flags().StringSliceVar(&labels, "labels", nil, "select readers with these labels, k=v (all must match)")
	start.Flags().Int32Var(&percent, "percent", 0, "select this share of the readers (by a stable hash; 0: all the labels select)")
	start.Flags().StringVar(&file, "file", "", "read the value from this file (- : standard input)")
	end := func(use, short string, promote bool) *cobra.Command {
		return &cobra.Command{
			Use: use + " KEY", Short: short, Args: argsNamed("KEY"),
			RunE: func(cmd *cobra.Command, args []string) error {
				return g.call(cmd, func(ctx context.Context, c *client.Client) error {
					rev, err := c.KV().EndRollout(ctx, args[0], promote, client.InNamespace(g.namespace))
					if err != nil {
						return err
					}
					fmt.Fprintf(g.stdout, "rollout of %s/%s %sd at revision %d\n", g.namespace, args[0], use, rev)
					return nil
				})
			},
		}
	}
	status := &cobra.Command{
		Use:   "status KEY",
		Short: "The key's value, its rollout and which instance applied which revision",
		Args:  argsNamed("KEY"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := g.checkOutput(); err != nil {
				return err
			}
			return g.call(cmd, func(ctx context.Context, c *client.Client) error {
				st, err := c.KV().RolloutStatus(ctx, args[0], client.InNamespace(g.namespace))
				if err != nil {
					return err
				}
				if g.output == "json" {
					return g.printJSON(st)
				}
				cur, plan := int64(0), int64(0)
				if st.Current != nil {
					cur = st.Current.ModRevision
					fmt.Fprintf(g.stdout, "value: revision %d\n", cur)
				} else {
					fmt.Fprintln(g.stdout, "value: none (the key does not exist)")
				}
				if st.Rollout != nil {
					plan = st.Rollout.Revision
					fmt.Fprintf(g.stdout, "rollout: revision %d, labels %v, percent %d\n", plan, st.Rollout.Labels, st.Rollout.Percent)
				} else {
					fmt.Fprintln(g.stdout, "rollout: none")
				}
				tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "INSTANCE\tSESSION\tAPPLIED\tWHICH\tERROR")
				for _, r := range st.Reports {
					which := "old"
					switch {
					case r.Error != "":
						which = "refused"
					case r.Revision == cur:
						which = "value"
					case r.Revision == plan:
						which = "rollout"
					}
					label := r.Label
					if label == "" {
						label = "-"
					}
					fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", label, store.FormatSessionID(r.SessionID), r.Revision, which, r.Error)
				}
				return tw.Flush()
			})
		},
	}
	cmd.AddCommand(start, status, end("promote", "Write the rollout's value as the key's, for everyone", true), end("abort", "End the rollout: its readers go back to the key's value", false))
	return cmd
}

// valueOf reads a value from the second argument or --file (- : stdin).
func valueOf(args []string, file string, cmd *cobra.Command) ([]byte, error) {
	switch {
	case len(args) == 2 && file != "":
		return nil, errors.New("give the value as an argument or with --file, not both")
	case len(args) == 2:
		return []byte(args[1]), nil
	case file == "-":
		return io.ReadAll(io.LimitReader(os.Stdin, 1<<20+1))
	case file != "":
		return os.ReadFile(file)
	}
	return nil, fmt.Errorf("missing VALUE (or --file) (usage: %s)", cmd.UseLine())
}

package cli

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/saga"
)

func newSagaCmd(g *globals) *cobra.Command {
	var prefix string
	cmd := &cobra.Command{
		Use:   "saga",
		Short: "List, show and retry the sagas kept in beacon KV (docs/sagas.md)",
	}
	cmd.PersistentFlags().StringVar(&prefix, "prefix", saga.DefaultPrefix, "the KV prefix the sagas are kept under (the orchestrators' Config.Prefix)")
	withStore := func(cmd *cobra.Command, f func(ctx context.Context, s *saga.Store) error) error {
		return g.call(cmd, func(ctx context.Context, c *client.Client) error {
			s, err := saga.NewStore(c.KV(), prefix, client.InNamespace(g.namespace))
			if err != nil {
				return err
			}
			return f(ctx, s)
		})
	}
	var status string
	list := &cobra.Command{
		Use:   "list [SAGA]",
		Short: "List the sagas (of SAGA), oldest first",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := g.checkOutput(); err != nil {
				return err
			}
			if status != "" && !slices.Contains([]saga.Status{saga.Running, saga.Compensating, saga.Done, saga.Compensated, saga.Stuck}, saga.Status(status)) {
				return fmt.Errorf("--status %q: want running, compensating, done, compensated or stuck", status)
			}
			name := ""
			if len(args) == 1 {
				name = args[0]
			}
			return withStore(cmd, func(ctx context.Context, s *saga.Store) error {
				all, err := s.List(ctx, name)
				if err != nil {
					return err
				}
				sts := make([]saga.State, 0, len(all))
				for _, st := range all {
					if status == "" || st.Status == saga.Status(status) {
						sts = append(sts, st)
					}
				}
				if g.output == "json" {
					return g.printJSON(sts)
				}
				tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "SAGA\tID\tSTATUS\tSTEP\tAGE\tERROR")
				for _, st := range sts {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", st.Saga, st.ID, st.Status, dash(st.StepName()), time.Since(st.Created).Round(time.Second), dash(oneLine([]byte(st.Error))))
				}
				return tw.Flush()
			})
		},
	}
	list.Flags().StringVar(&status, "status", "", "only the sagas with this status (running, compensating, done, compensated, stuck)")
	show := &cobra.Command{
		Use:   "show SAGA ID",
		Short: "Show one saga: its status, steps, outputs and history",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := g.checkOutput(); err != nil {
				return err
			}
			return withStore(cmd, func(ctx context.Context, s *saga.Store) error {
				st, err := s.Get(ctx, args[0], args[1])
				if err != nil {
					return err
				}
				if g.output == "json" {
					return g.printJSON(st)
				}
				printSaga(g, st)
				return nil
			})
		},
	}
	retry := &cobra.Command{
		Use:   "retry SAGA ID",
		Short: "Send a stuck saga back to compensating, with fresh attempts",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return withStore(cmd, func(ctx context.Context, s *saga.Store) error {
				st, err := s.Retry(ctx, args[0], args[1])
				if err != nil {
					return err
				}
				fmt.Fprintf(g.stdout, "saga %s/%s is compensating again from step %s (retry %d)\n", st.Saga, st.ID, dash(st.StepName()), st.Retries)
				return nil
			})
		},
	}
	cmd.AddCommand(list, show, retry)
	return cmd
}

func printSaga(g *globals, st saga.State) {
	w := g.stdout
	fmt.Fprintf(w, "saga:     %s/%s\nstatus:   %s\n", st.Saga, st.ID, st.Status)
	steps := make([]string, len(st.Steps))
	for i, s := range st.Steps {
		steps[i] = s
		if i == st.Step && (!st.Status.Finished() || st.Status == saga.Stuck) {
			steps[i] = "[" + s + "]"
		}
	}
	fmt.Fprintf(w, "steps:    %s\n", strings.Join(steps, " → "))
	if st.Error != "" {
		fmt.Fprintf(w, "error:    %s\n", st.Error)
	}
	fmt.Fprintf(w, "created:  %s\ndeadline: %s\nupdated:  %s\n", st.Created.Format(time.RFC3339Nano), st.Deadline.Format(time.RFC3339Nano), st.Updated.Format(time.RFC3339Nano))
	if st.Retries > 0 {
		fmt.Fprintf(w, "retries:  %d\n", st.Retries)
	}
	if len(st.Input) > 0 {
		fmt.Fprintf(w, "input:    %s\n", oneLine(st.Input))
	}
	for _, s := range st.Steps {
		if out, ok := st.Outputs[s]; ok {
			fmt.Fprintf(w, "output %s: %s\n", s, oneLine(out))
		}
	}
	fmt.Fprintln(w, "history:")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, h := range st.History {
		att := ""
		if h.Attempts > 1 {
			att = fmt.Sprintf("%d attempts", h.Attempts)
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\n", h.Time.Format(time.RFC3339Nano), dash(h.Step), h.What, att, strings.ReplaceAll(h.Error, "\n", " "))
	}
	tw.Flush()
}

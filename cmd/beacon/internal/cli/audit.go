package cli

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"beacon.dev/beacon/server/audit"
)

func newAuditCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "audit",
		Short: "Work with the server's audit log",
	}
	hideClientFlags(cmd, "output")
	cmd.AddCommand(newAuditVerifyCmd(g))
	return cmd
}

func newAuditVerifyCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "verify FILE [FILE...]",
		Short: "Check an audit log's hash chain: no line edited, removed, reordered or inserted",
		Long: `verify reads an audit log and checks that every line is an audit record,
numbered one after the other, and carries the SHA-256 of the line before.
Given one FILE it also reads the rotated files beside it, FILE.N … FILE.1,
oldest first; given several, it reads them in the order given.

It prints the last line's seq and hash: keep them elsewhere, since the
chain alone cannot tell that lines were cut from the end. It exits 1 at
the first line that does not verify, naming the file and the line.
See docs/security.md, "Audit log".`,
		Example: `  beacon audit verify /var/lib/beacon/audit.log
  beacon audit verify audit.log.2 audit.log.1 audit.log -o json`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return fmt.Errorf("missing FILE (usage: %s)", cmd.UseLine())
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := g.checkOutput(); err != nil {
				return err
			}
			rep, err := audit.VerifyFiles(args...)
			if g.output == "json" {
				if jerr := g.printJSON(rep); jerr != nil {
					return jerr
				}
				return err
			}
			if err != nil {
				var le *audit.LineError
				if errors.As(err, &le) && rep.Lines > 0 {
					fmt.Fprintf(g.stdout, "verified before it: %s, seq %d..%d\n", plural(rep.Lines, "line"), rep.FirstSeq, rep.LastSeq)
				}
				return err
			}
			printAuditReport(g, rep)
			return nil
		},
	}
}

func printAuditReport(g *globals, rep audit.Report) {
	files := plural(len(rep.Files), "file")
	if rep.Lines == 0 {
		fmt.Fprintf(g.stdout, "ok: no lines in %s\n", files)
		return
	}
	fmt.Fprintf(g.stdout, "ok: %s, seq %d..%d, chain intact across %s\n", plural(rep.Lines, "line"), rep.FirstSeq, rep.LastSeq, files)
	if !rep.FromStart {
		fmt.Fprintf(g.stdout, "the first line (seq %d) is not the start of the chain: older files were rotated away, and the log verifies from there on\n", rep.FirstSeq)
	}
	fmt.Fprintf(g.stdout, "last line: seq %d, sha256 %s\n", rep.LastSeq, rep.LastHash)
}

// plural is "1 line", "2 lines".
func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}

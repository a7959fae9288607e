package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"beacon.dev/beacon/client"
	"beacon.dev/beacon/registry"
)

// globals are the flags every command shares.
type globals struct {
	servers   []string
	namespace string
	output    string
	stdout    io.Writer
	stderr    io.Writer
}

// Main runs the command line and returns the process exit code.
func Main(args []string, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	root := newRoot(stdout, stderr)
	root.SetArgs(args)
	if err := root.ExecuteContext(ctx); err != nil {
		fmt.Fprintln(stderr, "beacon:", err)
		return 1
	}
	return 0
}

func newRoot(stdout, stderr io.Writer) *cobra.Command {
	g := &globals{stdout: stdout, stderr: stderr}
	root := &cobra.Command{
		Use:           "beacon",
		Short:         "Service registry and discovery for Go services, on etcd",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	defServer := os.Getenv("BEACON_ADDR")
	if defServer == "" {
		defServer = "127.0.0.1:8970"
	}
	pf := root.PersistentFlags()
	pf.StringSliceVar(&g.servers, "server", []string{defServer}, "beacon server address(es), comma-separated (env BEACON_ADDR)")
	pf.StringVarP(&g.namespace, "namespace", "n", registry.DefaultNamespace, "namespace")
	pf.StringVarP(&g.output, "output", "o", "table", "output format of reads: table or json")
	root.AddCommand(
		newServerCmd(g),
		newRegisterCmd(g),
		newDeregisterCmd(g),
		newStatusCmd(g),
		newProtectCmd(g),
		newCheckUpdateCmd(g),
		newServicesCmd(g),
		newInstancesCmd(g),
		newWatchCmd(g),
		newOperatorCmd(g),
	)
	return root
}

func (g *globals) client() (*client.Client, error) {
	return client.New(g.servers, client.WithNamespace(g.namespace))
}

// call runs f with a client and a context bounded by callTimeout.
func (g *globals) call(cmd *cobra.Command, f func(ctx context.Context, c *client.Client) error) error {
	c, err := g.client()
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(cmd.Context(), callTimeout)
	defer cancel()
	return f(ctx, c)
}

func (g *globals) checkOutput() error {
	if g.output != "table" && g.output != "json" {
		return fmt.Errorf("invalid --output %q: must be table or json", g.output)
	}
	return nil
}

// printJSON writes v indented: an API message in the API's own JSON
// (protojson, as the server answers curl), anything else with
// encoding/json.
func (g *globals) printJSON(v any) error {
	if m, ok := v.(proto.Message); ok {
		b, err := protojson.MarshalOptions{Multiline: true, Indent: "  "}.Marshal(m)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(g.stdout, "%s\n", b)
		return err
	}
	enc := json.NewEncoder(g.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// parseMeta turns ["k=v", ...] into a map, naming the bad entry.
func parseMeta(kvs []string) (map[string]string, error) {
	if len(kvs) == 0 {
		return nil, nil
	}
	m := make(map[string]string, len(kvs))
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, fmt.Errorf("invalid --meta %q: want key=value", kv)
		}
		m[k] = v
	}
	return m, nil
}

// interrupted reports whether err is only the user's Ctrl-C.
func interrupted(ctx context.Context, err error) bool {
	return ctx.Err() != nil && (errors.Is(err, context.Canceled) || errors.Is(err, client.ErrClosed))
}

// jsonLine writes an API message as one compact line of the API's JSON.
func jsonLine(w io.Writer, m proto.Message) error {
	b, err := protojson.Marshal(m)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}

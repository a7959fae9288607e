package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"runtime/debug"
	"slices"
	"strings"
	"syscall"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
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
	// TLS to the servers: CA certificate, client certificate and key.
	caCert, clientCert, clientKey string
	// The ACL token: --token, or --token-file, read by secret.
	token, tokenFile string
	tokenFrom        string // where secret found the token, for the hints
	flags            *pflag.FlagSet
	stdout           io.Writer
	stderr           io.Writer
}

// Main runs the command line and returns the process exit code; SIGINT
// and SIGTERM end a long-running command (server, register, watch).
func Main(args []string, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return MainContext(ctx, args, stdout, stderr)
}

// MainContext is Main with the context that ends long-running commands.
func MainContext(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	root, g := newRoot(stdout, stderr)
	root.SetArgs(args)
	if err := root.ExecuteContext(ctx); err != nil {
		var ee *exitError
		if errors.As(err, &ee) {
			if ee.err != nil {
				fmt.Fprintln(stderr, errorLine(ee.err, g))
			}
			return ee.code
		}
		fmt.Fprintln(stderr, errorLine(err, g))
		return 1
	}
	return 0
}

// exitError ends the command with an exit code (a child's, for `beacon
// lock`), printing err if there is one.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string {
	if e.err != nil {
		return e.err.Error()
	}
	return fmt.Sprintf("exit status %d", e.code)
}

// errorLine is how a failed command reports: one "beacon:" prefix (the
// SDK's errors carry their own), and a hint when no server answered.
func errorLine(err error, g *globals) string {
	msg := err.Error()
	if !strings.HasPrefix(msg, "beacon: ") {
		msg = "beacon: " + msg
	}
	switch {
	case errors.Is(err, client.ErrUnavailable):
		msg += fmt.Sprintf("\nno beacon server answered at %s: start one with `beacon server`, or point --server (or BEACON_ADDR) at a running one",
			strings.Join(g.serverAddrs(), ","))
	case errors.Is(err, client.ErrUnauthenticated) && g.tokenFrom != "":
		msg += "\nthe token is from " + g.tokenFrom
	case errors.Is(err, client.ErrPermissionDenied) && strings.Contains(msg, "(token anonymous)") && g.tokenFrom == "":
		msg += "\nno token was given, so the call ran as the anonymous token: pass --token or --token-file (or set BEACON_TOKEN or BEACON_TOKEN_FILE)"
	}
	return msg
}

// clientOnlyFlags are the global flags of the client commands.
var clientOnlyFlags = []string{"server", "namespace", "output", "ca-cert", "client-cert", "client-key", "token", "token-file"}

// hideClientFlags keeps the client commands' global flags, but those
// named in keep, out of the help of cmd and its subcommands, which do not
// talk to a server.
func hideClientFlags(cmd *cobra.Command, keep ...string) {
	cmd.SetHelpFunc(func(c *cobra.Command, args []string) {
		for _, name := range clientOnlyFlags {
			if f := c.Root().PersistentFlags().Lookup(name); f != nil && !slices.Contains(keep, name) {
				f.Hidden = true
			}
		}
		c.Root().HelpFunc()(c, args)
	})
}

// version is the main module's version and the VCS revision, time and
// state it was built from, as the Go toolchain recorded them.
func version() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "(unknown: built without module support)"
	}
	v := bi.Main.Version
	if v == "" {
		v = "(devel)"
	}
	settings := map[string]string{}
	for _, s := range bi.Settings {
		settings[s.Key] = s.Value
	}
	if rev := settings["vcs.revision"]; rev != "" {
		v += " revision " + rev
		if t := settings["vcs.time"]; t != "" {
			v += " " + t
		}
		if settings["vcs.modified"] == "true" {
			v += " (modified)"
		}
	}
	return v + " " + bi.GoVersion
}

// defaultPort is the server's (--addr 127.0.0.1:8970): --server HOST
// without a port means it, not HTTP's 80.
const defaultPort = "8970"

// serverAddrs is --server with the default port added where none is given.
func (g *globals) serverAddrs() []string {
	out := make([]string, len(g.servers))
	for i, s := range g.servers {
		out[i] = s
		if _, _, err := net.SplitHostPort(s); err != nil && !strings.Contains(s, "/") {
			out[i] = net.JoinHostPort(strings.Trim(s, "[]"), defaultPort)
		}
	}
	return out
}

func newRoot(stdout, stderr io.Writer) (*cobra.Command, *globals) {
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
	root.Version = version()
	root.SetVersionTemplate("beacon {{.Version}}\n")
	pf := root.PersistentFlags()
	pf.StringSliceVar(&g.servers, "server", strings.Split(defServer, ","), "beacon server address(es), comma-separated (env BEACON_ADDR, also comma-separated)")
	pf.StringVarP(&g.namespace, "namespace", "n", registry.DefaultNamespace, "namespace")
	pf.StringVarP(&g.output, "output", "o", "table", "output format of reads: table or json")
	pf.StringVar(&g.caCert, "ca-cert", os.Getenv("BEACON_CACERT"), "talk to the servers over TLS, trusting this CA certificate (PEM; env BEACON_CACERT)")
	pf.StringVar(&g.clientCert, "client-cert", os.Getenv("BEACON_CLIENT_CERT"), "client certificate for servers that require one (PEM; env BEACON_CLIENT_CERT)")
	pf.StringVar(&g.clientKey, "client-key", os.Getenv("BEACON_CLIENT_KEY"), "the --client-cert's key (PEM; env BEACON_CLIENT_KEY)")
	// Not defaulted from the environment like the others: help would
	// print the secret.
	pf.StringVar(&g.token, "token", "", "ACL token secret for every call (env BEACON_TOKEN; default: none, the server's anonymous token)")
	pf.StringVar(&g.tokenFile, "token-file", "", "read the ACL token secret from this file (env BEACON_TOKEN_FILE)")
	g.flags = pf
	root.AddCommand(
		newServerCmd(g),
		newRegisterCmd(g),
		newDeregisterCmd(g),
		newStatusCmd(g),
		newProtectCmd(g),
		newServiceConfigCmd(g),
		newCheckUpdateCmd(g),
		newServicesCmd(g),
		newInstancesCmd(g),
		newWatchCmd(g),
		newOperatorCmd(g),
		newAuditCmd(g),
		newDevCmd(g),
		newACLCmd(g),
		newKVCmd(g),
		newLockCmd(g),
		newElectCmd(g),
		newLeaderCmd(g),
		newSagaCmd(g),
		newXDSCmd(g),
		newProxyCmd(g),
		&cobra.Command{
			Use:   "version",
			Short: "Print the version: the module version and the VCS revision it was built from",
			Args:  cobra.NoArgs,
			Run:   func(*cobra.Command, []string) { fmt.Fprintf(stdout, "beacon %s\n", version()) },
		},
	)
	return root, g
}

func (g *globals) client() (*client.Client, error) {
	opts := []client.Option{client.WithNamespace(g.namespace)}
	secret, err := g.secret()
	if err != nil {
		return nil, err
	}
	if secret != "" {
		opts = append(opts, client.WithToken(secret))
	}
	if g.caCert != "" || g.clientCert != "" || g.clientKey != "" {
		cfg, err := client.TLSFromFiles(g.caCert, g.clientCert, g.clientKey)
		if err != nil {
			return nil, err
		}
		opts = append(opts, client.WithTLS(cfg))
	}
	return client.New(g.serverAddrs(), opts...)
}

// secret is the ACL token the calls send: --token or --token-file, else
// BEACON_TOKEN or BEACON_TOKEN_FILE (a flag given overrides both
// variables); "" is no token. A file's token is trimmed of whitespace.
func (g *globals) secret() (string, error) {
	tok, file := g.token, g.tokenFile
	tokName, fileName := "--token", "--token-file"
	tokSet, fileSet := g.flags.Changed("token"), g.flags.Changed("token-file")
	if !tokSet && !fileSet {
		tok, file = os.Getenv("BEACON_TOKEN"), os.Getenv("BEACON_TOKEN_FILE")
		tokName, fileName = "BEACON_TOKEN", "BEACON_TOKEN_FILE"
		tokSet, fileSet = tok != "", file != ""
	}
	switch {
	case tokSet && fileSet:
		return "", fmt.Errorf("invalid %s: give %s or %s, not both", fileName, tokName, fileName)
	case fileSet:
		b, err := os.ReadFile(file)
		if err != nil {
			return "", fmt.Errorf("invalid %s: %w", fileName, err)
		}
		s := strings.TrimSpace(string(b))
		if s == "" {
			return "", fmt.Errorf("invalid %s: %s holds no token", fileName, file)
		}
		g.tokenFrom = fileName + " " + file
		return s, checkSecret(g.tokenFrom, s)
	case tokSet:
		g.tokenFrom = tokName
		s := strings.TrimSpace(tok)
		return s, checkSecret(g.tokenFrom, s)
	}
	return "", nil
}

// checkSecret refuses what cannot be a token's secret (printable ASCII
// without spaces): sent anyway, the HTTP client refuses the header and the
// error reads as if no server answered.
func checkSecret(from, s string) error {
	if i := strings.IndexFunc(s, func(r rune) bool { return r <= ' ' || r > '~' }); i >= 0 {
		return fmt.Errorf("invalid %s: a space or control character at byte %d: a token secret is one word (was more than the secret copied?)", from, i)
	}
	return nil
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

// argsNamed accepts exactly the named positional arguments and names the
// first one missing ("missing SERVICE"), rather than cobra's "accepts 1
// arg(s), received 0".
func argsNamed(names ...string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) < len(names) {
			return fmt.Errorf("missing %s (usage: %s)", names[len(args)], cmd.UseLine())
		}
		if len(args) > len(names) {
			return fmt.Errorf("too many arguments: %q (usage: %s)", args[len(names):], cmd.UseLine())
		}
		return nil
	}
}

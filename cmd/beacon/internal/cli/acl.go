package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/api/beacon/v1/beaconv1connect"
	"beacon.dev/beacon/client"
	"beacon.dev/beacon/registry"
)

func newACLCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "acl",
		Short: "Manage ACL tokens, policies and roles of servers started with --acl",
		Long: `The ACL commands manage who may do what on servers started with --acl
(docs/security.md). Every call, these included, is made with the token of
--token or --token-file (or BEACON_TOKEN, BEACON_TOKEN_FILE); without one,
with the server's anonymous token. 'beacon acl bootstrap' makes the first
management token.`,
	}
	cmd.AddCommand(newACLBootstrapCmd(g), newACLTokenCmd(g), newACLPolicyCmd(g), newACLRoleCmd(g), newACLWhoAmICmd(g))
	return cmd
}

// aclCall runs f with the ACL API and a context bounded by callTimeout.
func (g *globals) aclCall(cmd *cobra.Command, f func(ctx context.Context, acl beaconv1connect.AclServiceClient) error) error {
	if err := g.checkOutput(); err != nil {
		return err
	}
	return g.call(cmd, func(ctx context.Context, c *client.Client) error { return f(ctx, c.ACL()) })
}

func newACLBootstrapCmd(g *globals) *cobra.Command {
	var breakGlass string
	cmd := &cobra.Command{
		Use:   "bootstrap",
		Short: "Make the first management token (once), or a new one with the server's break-glass key",
		Long: `bootstrap makes the first management token, which may do everything, and
prints it; it works once per cluster. Keep its SecretID safe.

A lost management token is replaced with --break-glass FILE: FILE is the
one-time key the server writes at every start into
<data-dir>/acl-break-glass.key (or its --acl-break-glass-file), readable only
by the server's user. A key works once; the server then writes the next.`,
		Example: `  beacon acl bootstrap
  beacon acl bootstrap -o json | jq -r .secretId
  sudo -u beacon beacon acl bootstrap --break-glass /var/lib/beacon/acl-break-glass.key`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			req := &beaconv1.BootstrapRequest{}
			if cmd.Flags().Changed("break-glass") {
				b, err := os.ReadFile(breakGlass)
				if err != nil {
					return fmt.Errorf("invalid --break-glass: %w", err)
				}
				if req.BreakGlassKey = strings.TrimSpace(string(b)); req.BreakGlassKey == "" {
					return fmt.Errorf("invalid --break-glass: %s is empty", breakGlass)
				}
			}
			return g.aclCall(cmd, func(ctx context.Context, acl beaconv1connect.AclServiceClient) error {
				resp, err := acl.Bootstrap(ctx, connect.NewRequest(req))
				if connect.CodeOf(err) == connect.CodeFailedPrecondition && req.BreakGlassKey == "" && strings.Contains(err.Error(), "already bootstrapped") {
					return fmt.Errorf("%w\nFILE is the key the server wrote at its start: <data-dir>/acl-break-glass.key, or its --acl-break-glass-file", err)
				}
				if err != nil {
					return err
				}
				tok := resp.Msg.GetToken()
				if g.output == "json" {
					return g.printJSON(tok)
				}
				printToken(g.stdout, tok)
				// Not "SecretID" again: grep SecretID finds the one line.
				fmt.Fprintln(g.stdout, "\nKeep the secret safe: this management token may do everything, and its secret is not shown again.")
				fmt.Fprintln(g.stdout, "Give it to the other commands with --token, --token-file or BEACON_TOKEN.")
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&breakGlass, "break-glass", "", "make a new management token with the server's break-glass key, read from this file (<data-dir>/acl-break-glass.key)")
	return cmd
}

// refFlags are the flags that name what a token or role grants.
type refFlags struct {
	description          string
	policies, identities []string
	roles                []string // tokens only
}

func (r *refFlags) bind(f *pflag.FlagSet, roles bool) {
	f.StringVar(&r.description, "description", "", "description")
	f.StringSliceVar(&r.policies, "policy", nil, "policy name (repeatable)")
	if roles {
		f.StringSliceVar(&r.roles, "role", nil, "role name (repeatable)")
	}
	f.StringSliceVar(&r.identities, "service-identity", nil, "service identity NAMESPACE/SERVICE, or SERVICE in namespace default (repeatable): may register that service and read its namespace")
}

// parseIdentities reads --service-identity values.
func parseIdentities(vals []string) ([]*beaconv1.AclServiceIdentity, error) {
	var out []*beaconv1.AclServiceIdentity
	for _, v := range vals {
		ns, svc, ok := strings.Cut(v, "/")
		if !ok {
			ns, svc = registry.DefaultNamespace, v
		}
		if ns == "" || svc == "" || strings.Contains(svc, "/") {
			return nil, fmt.Errorf("invalid --service-identity %q: want NAMESPACE/SERVICE or SERVICE", v)
		}
		out = append(out, &beaconv1.AclServiceIdentity{Namespace: ns, Service: svc})
	}
	return out, nil
}

func newACLTokenCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "token", Short: "Create, list, read, update and delete ACL tokens"}
	cmd.AddCommand(newTokenCreateCmd(g), newTokenListCmd(g), newTokenReadCmd(g), newTokenUpdateCmd(g), newTokenDeleteCmd(g))
	return cmd
}

func newTokenCreateCmd(g *globals) *cobra.Command {
	var (
		refs refFlags
		ttl  time.Duration
	)
	cmd := &cobra.Command{
		Use:   "create",
		Short: "Make a token from policies, roles and service identities; prints its SecretID, which is not shown again",
		Example: `  beacon acl token create --description "orders service" --service-identity orders
  beacon acl token create --description "read-only dashboard" --policy read-all --ttl 720h`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ids, err := parseIdentities(refs.identities)
			if err != nil {
				return err
			}
			req := &beaconv1.CreateTokenRequest{Token: &beaconv1.AclToken{
				Description: refs.description, Policies: refs.policies, Roles: refs.roles, ServiceIdentities: ids,
			}}
			if cmd.Flags().Changed("ttl") {
				if ttl <= 0 {
					return fmt.Errorf("invalid --ttl %s: must be positive", ttl)
				}
				req.Ttl = durationpb.New(ttl)
			}
			return g.aclCall(cmd, func(ctx context.Context, acl beaconv1connect.AclServiceClient) error {
				resp, err := acl.CreateToken(ctx, connect.NewRequest(req))
				if err != nil {
					return err
				}
				if g.output == "json" {
					return g.printJSON(resp.Msg.GetToken())
				}
				printToken(g.stdout, resp.Msg.GetToken())
				return nil
			})
		},
	}
	refs.bind(cmd.Flags(), true)
	cmd.Flags().DurationVar(&ttl, "ttl", 0, "time to live: the token expires this long from now (default never)")
	return cmd
}

func newTokenListCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List the tokens (without their secrets)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.aclCall(cmd, func(ctx context.Context, acl beaconv1connect.AclServiceClient) error {
				resp, err := acl.ListTokens(ctx, connect.NewRequest(&beaconv1.ListTokensRequest{}))
				if err != nil {
					return err
				}
				if g.output == "json" {
					return g.printJSON(resp.Msg)
				}
				tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "ACCESSOR ID\tDESCRIPTION\tPOLICIES\tROLES\tSERVICE IDENTITIES\tEXPIRES")
				for _, t := range resp.Msg.GetTokens() {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", t.GetAccessorId(), dash(t.GetDescription()), list(t.GetPolicies()),
						list(t.GetRoles()), identities(t.GetServiceIdentities()), expires(t.GetExpiresAt()))
				}
				return tw.Flush()
			})
		},
	}
}

func newTokenReadCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "read ACCESSOR",
		Short: "Show a token (without its secret); ACCESSOR anonymous is the token of calls without one",
		Args:  argsNamed("ACCESSOR"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.aclCall(cmd, func(ctx context.Context, acl beaconv1connect.AclServiceClient) error {
				resp, err := acl.ReadToken(ctx, connect.NewRequest(&beaconv1.ReadTokenRequest{AccessorId: args[0]}))
				if err != nil {
					return err
				}
				if g.output == "json" {
					return g.printJSON(resp.Msg.GetToken())
				}
				printToken(g.stdout, resp.Msg.GetToken())
				return nil
			})
		},
	}
}

func newTokenUpdateCmd(g *globals) *cobra.Command {
	var refs refFlags
	cmd := &cobra.Command{
		Use:   "update ACCESSOR",
		Short: "Change a token's description, policies, roles or service identities; its secret stays",
		Long: `update changes the fields whose flags are given and keeps the others: a
flag given replaces that field's list (--policy "" empties it). ACCESSOR
anonymous is the token of calls without one. The token is read, changed and
written back: two updates of one token at once may lose one of them.`,
		Example: `  beacon acl token update anonymous --policy read-all
  beacon acl token update 3f0c…e1 --role ops --description "on-call"`,
		Args: argsNamed("ACCESSOR"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ids, err := parseIdentities(refs.identities)
			if err != nil {
				return err
			}
			f := cmd.Flags()
			if !f.Changed("description") && !f.Changed("policy") && !f.Changed("role") && !f.Changed("service-identity") {
				return errors.New("nothing to update: give --description, --policy, --role or --service-identity")
			}
			return g.aclCall(cmd, func(ctx context.Context, acl beaconv1connect.AclServiceClient) error {
				read, err := acl.ReadToken(ctx, connect.NewRequest(&beaconv1.ReadTokenRequest{AccessorId: args[0]}))
				if err != nil {
					return readForUpdate(err)
				}
				t := read.Msg.GetToken()
				t.SecretId = ""
				if f.Changed("description") {
					t.Description = refs.description
				}
				if f.Changed("policy") {
					t.Policies = refs.policies
				}
				if f.Changed("role") {
					t.Roles = refs.roles
				}
				if f.Changed("service-identity") {
					t.ServiceIdentities = ids
				}
				resp, err := acl.UpdateToken(ctx, connect.NewRequest(&beaconv1.UpdateTokenRequest{Token: t}))
				if err != nil {
					return err
				}
				if g.output == "json" {
					return g.printJSON(resp.Msg.GetToken())
				}
				printToken(g.stdout, resp.Msg.GetToken())
				return nil
			})
		},
	}
	refs.bind(cmd.Flags(), true)
	return cmd
}

func newTokenDeleteCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "delete ACCESSOR",
		Short: "Delete a token: calls with it are refused from then on, and the session credentials it made stop working",
		Args:  argsNamed("ACCESSOR"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.aclCall(cmd, func(ctx context.Context, acl beaconv1connect.AclServiceClient) error {
				if _, err := acl.DeleteToken(ctx, connect.NewRequest(&beaconv1.DeleteTokenRequest{AccessorId: args[0]})); err != nil {
					return err
				}
				fmt.Fprintf(g.stdout, "deleted token %s\n", args[0])
				return nil
			})
		},
	}
}

// readForUpdate is the error of an update's first step, the read: denied,
// it is the write the command needs.
func readForUpdate(err error) error {
	if errors.Is(err, client.ErrPermissionDenied) {
		return fmt.Errorf("%w; an update reads, then writes: it needs acl:write", err)
	}
	return err
}

// rulesFlags are --rules and --rules-file.
type rulesFlags struct {
	text []string
	file string
}

func (r *rulesFlags) bind(f *pflag.FlagSet) {
	f.StringArrayVar(&r.text, "rules", nil, "rules, one per line: ACCESS RESOURCE [PATTERN], e.g. \"write service prod/web\" (repeatable: a line each)")
	f.StringVar(&r.file, "rules-file", "", "read the rules from this file (- for stdin)")
}

func (r *rulesFlags) given(f *pflag.FlagSet) bool {
	return f.Changed("rules") || f.Changed("rules-file")
}

// read returns the rules the flags give.
func (r *rulesFlags) read(cmd *cobra.Command) (string, error) {
	f := cmd.Flags()
	switch {
	case f.Changed("rules") && f.Changed("rules-file"):
		return "", errors.New("invalid --rules-file: give --rules or --rules-file, not both")
	case f.Changed("rules-file"):
		var b []byte
		var err error
		if r.file == "-" {
			b, err = io.ReadAll(cmd.InOrStdin())
		} else {
			b, err = os.ReadFile(r.file)
		}
		if err != nil {
			return "", fmt.Errorf("invalid --rules-file: %w", err)
		}
		return string(b), nil
	}
	return strings.Join(r.text, "\n"), nil
}

func newACLPolicyCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "policy",
		Short: "Create, list, read, update and delete ACL policies",
		Long: `A policy is a named list of rules, one per line:

  read  service *            # every service of every namespace
  write service prod/web     # one service (write implies read)
  write service prod/api-*   # a prefix of names
  deny  service prod/secret-*
  read  namespace staging    # services and keys of one namespace
  read  key     prod/config/*
  write session              # any session: keep alive, close, see ids
  read  operator
  write acl                  # tokens, policies, roles

The most specific pattern decides; at equal specificity deny beats write
and write beats read. What no rule grants is denied.`,
	}
	cmd.AddCommand(newPolicyCreateCmd(g), newPolicyUpdateCmd(g), newPolicyListCmd(g), newPolicyReadCmd(g), newPolicyDeleteCmd(g))
	return cmd
}

func newPolicyCreateCmd(g *globals) *cobra.Command {
	var (
		p     beaconv1.AclPolicy
		rules rulesFlags
	)
	cmd := &cobra.Command{
		Use:   "create",
		Short: "Create a policy (refused if one of that name exists: see update)",
		Example: `  beacon acl policy create --name orders-register --rules "write service default/orders"
  beacon acl policy create --name read-all --description "dashboards" --rules "read service *"
  beacon acl policy create --name ops --rules-file ops.rules`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !rules.given(cmd.Flags()) {
				return errors.New("missing --rules or --rules-file")
			}
			var err error
			if p.Rules, err = rules.read(cmd); err != nil {
				return err
			}
			return g.aclCall(cmd, func(ctx context.Context, acl beaconv1connect.AclServiceClient) error {
				// PutPolicy replaces: look first, so that create does not
				// overwrite a policy by mistake.
				_, err := acl.ReadPolicy(ctx, connect.NewRequest(&beaconv1.ReadPolicyRequest{Name: p.Name}))
				// Denied: the put is denied too (acl:write implies acl:read)
				// and its error names the permission the command needs.
				switch {
				case err == nil:
					return fmt.Errorf("policy %q exists: change it with 'beacon acl policy update %s'", p.Name, p.Name)
				case !errors.Is(err, client.ErrNotFound) && !errors.Is(err, client.ErrPermissionDenied):
					return err
				}
				if _, err := acl.PutPolicy(ctx, connect.NewRequest(&beaconv1.PutPolicyRequest{Policy: &p})); err != nil {
					return err
				}
				if g.output == "json" {
					return g.printJSON(&p)
				}
				fmt.Fprintf(g.stdout, "created policy %s\n", p.Name)
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&p.Name, "name", "", "policy name (required)")
	cmd.Flags().StringVar(&p.Description, "description", "", "description")
	rules.bind(cmd.Flags())
	_ = cmd.MarkFlagRequired("name")
	return cmd
}

func newPolicyUpdateCmd(g *globals) *cobra.Command {
	var (
		description string
		rules       rulesFlags
	)
	cmd := &cobra.Command{
		Use:   "update NAME",
		Short: "Change a policy's rules or description; the tokens and roles naming it change with it",
		Example: `  beacon acl policy update orders-register --rules "write service default/orders" --rules "read service default/*"
  beacon acl policy update ops --rules-file ops.rules`,
		Args: argsNamed("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			f := cmd.Flags()
			if !f.Changed("description") && !rules.given(f) {
				return errors.New("nothing to update: give --description, --rules or --rules-file")
			}
			text, err := rules.read(cmd)
			if err != nil {
				return err
			}
			return g.aclCall(cmd, func(ctx context.Context, acl beaconv1connect.AclServiceClient) error {
				read, err := acl.ReadPolicy(ctx, connect.NewRequest(&beaconv1.ReadPolicyRequest{Name: args[0]}))
				if err != nil {
					return readForUpdate(err)
				}
				p := read.Msg.GetPolicy()
				if f.Changed("description") {
					p.Description = description
				}
				if rules.given(f) {
					p.Rules = text
				}
				if _, err := acl.PutPolicy(ctx, connect.NewRequest(&beaconv1.PutPolicyRequest{Policy: p})); err != nil {
					return err
				}
				if g.output == "json" {
					return g.printJSON(p)
				}
				fmt.Fprintf(g.stdout, "updated policy %s\n", p.GetName())
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&description, "description", "", "description")
	rules.bind(cmd.Flags())
	return cmd
}

func newPolicyListCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List the policies and their rules",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.aclCall(cmd, func(ctx context.Context, acl beaconv1connect.AclServiceClient) error {
				resp, err := acl.ListPolicies(ctx, connect.NewRequest(&beaconv1.ListPoliciesRequest{}))
				if err != nil {
					return err
				}
				if g.output == "json" {
					return g.printJSON(resp.Msg)
				}
				tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "NAME\tDESCRIPTION\tRULES")
				for _, p := range resp.Msg.GetPolicies() {
					fmt.Fprintf(tw, "%s\t%s\t%s\n", p.GetName(), dash(p.GetDescription()), dash(strings.Join(ruleLines(p.GetRules()), "; ")))
				}
				return tw.Flush()
			})
		},
	}
}

// ruleLines are a policy's rules without blank lines and comments.
func ruleLines(rules string) []string {
	var out []string
	for _, l := range strings.Split(rules, "\n") {
		l, _, _ = strings.Cut(l, "#")
		if l = strings.Join(strings.Fields(l), " "); l != "" {
			out = append(out, l)
		}
	}
	return out
}

func newPolicyReadCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "read NAME",
		Short: "Show a policy",
		Args:  argsNamed("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.aclCall(cmd, func(ctx context.Context, acl beaconv1connect.AclServiceClient) error {
				resp, err := acl.ReadPolicy(ctx, connect.NewRequest(&beaconv1.ReadPolicyRequest{Name: args[0]}))
				if err != nil {
					return err
				}
				p := resp.Msg.GetPolicy()
				if g.output == "json" {
					return g.printJSON(p)
				}
				tw := keyValues(g.stdout)
				fmt.Fprintf(tw, "Name:\t%s\n", p.GetName())
				fmt.Fprintf(tw, "Description:\t%s\n", dash(p.GetDescription()))
				tw.Flush()
				printRules(g.stdout, "Rules:", p.GetRules())
				return nil
			})
		},
	}
}

// printRules prints rules indented under a heading, as they were written.
func printRules(w io.Writer, heading, rules string) {
	fmt.Fprintln(w, heading)
	for _, l := range strings.Split(strings.TrimRight(rules, "\n"), "\n") {
		fmt.Fprintf(w, "  %s\n", l)
	}
}

func newPolicyDeleteCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete a policy: the tokens and roles naming it lose what it granted",
		Args:  argsNamed("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.aclCall(cmd, func(ctx context.Context, acl beaconv1connect.AclServiceClient) error {
				if _, err := acl.DeletePolicy(ctx, connect.NewRequest(&beaconv1.DeletePolicyRequest{Name: args[0]})); err != nil {
					return err
				}
				fmt.Fprintf(g.stdout, "deleted policy %s\n", args[0])
				return nil
			})
		},
	}
}

func newACLRoleCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "role",
		Short: "Create, list, read, update and delete ACL roles: named sets of policies and service identities that tokens share",
	}
	cmd.AddCommand(newRoleCreateCmd(g), newRoleUpdateCmd(g), newRoleListCmd(g), newRoleReadCmd(g), newRoleDeleteCmd(g))
	return cmd
}

func newRoleCreateCmd(g *globals) *cobra.Command {
	var (
		name string
		refs refFlags
	)
	cmd := &cobra.Command{
		Use:     "create",
		Short:   "Create a role (refused if one of that name exists: see update)",
		Example: `  beacon acl role create --name ops --policy read-all --policy ops-write`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ids, err := parseIdentities(refs.identities)
			if err != nil {
				return err
			}
			r := &beaconv1.AclRole{Name: name, Description: refs.description, Policies: refs.policies, ServiceIdentities: ids}
			return g.aclCall(cmd, func(ctx context.Context, acl beaconv1connect.AclServiceClient) error {
				_, err := acl.ReadRole(ctx, connect.NewRequest(&beaconv1.ReadRoleRequest{Name: name}))
				// Denied: the put is denied too (acl:write implies acl:read)
				// and its error names the permission the command needs.
				switch {
				case err == nil:
					return fmt.Errorf("role %q exists: change it with 'beacon acl role update %s'", name, name)
				case !errors.Is(err, client.ErrNotFound) && !errors.Is(err, client.ErrPermissionDenied):
					return err
				}
				if _, err := acl.PutRole(ctx, connect.NewRequest(&beaconv1.PutRoleRequest{Role: r})); err != nil {
					return err
				}
				if g.output == "json" {
					return g.printJSON(r)
				}
				fmt.Fprintf(g.stdout, "created role %s\n", name)
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&name, "name", "", "role name (required)")
	refs.bind(cmd.Flags(), false)
	_ = cmd.MarkFlagRequired("name")
	return cmd
}

func newRoleUpdateCmd(g *globals) *cobra.Command {
	var refs refFlags
	cmd := &cobra.Command{
		Use:   "update NAME",
		Short: "Change a role's description, policies or service identities; a flag given replaces that field",
		Args:  argsNamed("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			ids, err := parseIdentities(refs.identities)
			if err != nil {
				return err
			}
			f := cmd.Flags()
			if !f.Changed("description") && !f.Changed("policy") && !f.Changed("service-identity") {
				return errors.New("nothing to update: give --description, --policy or --service-identity")
			}
			return g.aclCall(cmd, func(ctx context.Context, acl beaconv1connect.AclServiceClient) error {
				read, err := acl.ReadRole(ctx, connect.NewRequest(&beaconv1.ReadRoleRequest{Name: args[0]}))
				if err != nil {
					return readForUpdate(err)
				}
				r := read.Msg.GetRole()
				if f.Changed("description") {
					r.Description = refs.description
				}
				if f.Changed("policy") {
					r.Policies = refs.policies
				}
				if f.Changed("service-identity") {
					r.ServiceIdentities = ids
				}
				if _, err := acl.PutRole(ctx, connect.NewRequest(&beaconv1.PutRoleRequest{Role: r})); err != nil {
					return err
				}
				if g.output == "json" {
					return g.printJSON(r)
				}
				fmt.Fprintf(g.stdout, "updated role %s\n", r.GetName())
				return nil
			})
		},
	}
	refs.bind(cmd.Flags(), false)
	return cmd
}

func newRoleListCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List the roles",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.aclCall(cmd, func(ctx context.Context, acl beaconv1connect.AclServiceClient) error {
				resp, err := acl.ListRoles(ctx, connect.NewRequest(&beaconv1.ListRolesRequest{}))
				if err != nil {
					return err
				}
				if g.output == "json" {
					return g.printJSON(resp.Msg)
				}
				tw := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(tw, "NAME\tDESCRIPTION\tPOLICIES\tSERVICE IDENTITIES")
				for _, r := range resp.Msg.GetRoles() {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", r.GetName(), dash(r.GetDescription()), list(r.GetPolicies()), identities(r.GetServiceIdentities()))
				}
				return tw.Flush()
			})
		},
	}
}

func newRoleReadCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "read NAME",
		Short: "Show a role",
		Args:  argsNamed("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.aclCall(cmd, func(ctx context.Context, acl beaconv1connect.AclServiceClient) error {
				resp, err := acl.ReadRole(ctx, connect.NewRequest(&beaconv1.ReadRoleRequest{Name: args[0]}))
				if err != nil {
					return err
				}
				r := resp.Msg.GetRole()
				if g.output == "json" {
					return g.printJSON(r)
				}
				tw := keyValues(g.stdout)
				fmt.Fprintf(tw, "Name:\t%s\n", r.GetName())
				fmt.Fprintf(tw, "Description:\t%s\n", dash(r.GetDescription()))
				fmt.Fprintf(tw, "Policies:\t%s\n", list(r.GetPolicies()))
				fmt.Fprintf(tw, "Service identities:\t%s\n", identities(r.GetServiceIdentities()))
				return tw.Flush()
			})
		},
	}
}

func newRoleDeleteCmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "delete NAME",
		Short: "Delete a role: the tokens naming it lose what it granted",
		Args:  argsNamed("NAME"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.aclCall(cmd, func(ctx context.Context, acl beaconv1connect.AclServiceClient) error {
				if _, err := acl.DeleteRole(ctx, connect.NewRequest(&beaconv1.DeleteRoleRequest{Name: args[0]})); err != nil {
					return err
				}
				fmt.Fprintf(g.stdout, "deleted role %s\n", args[0])
				return nil
			})
		},
	}
}

func newACLWhoAmICmd(g *globals) *cobra.Command {
	return &cobra.Command{
		Use:   "whoami",
		Short: "Show the token the calls are made with and the rules in force for it",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.aclCall(cmd, func(ctx context.Context, acl beaconv1connect.AclServiceClient) error {
				resp, err := acl.WhoAmI(ctx, connect.NewRequest(&beaconv1.WhoAmIRequest{}))
				if err != nil {
					return err
				}
				if g.output == "json" {
					return g.printJSON(resp.Msg)
				}
				if !resp.Msg.GetAclEnabled() {
					fmt.Fprintln(g.stdout, "ACLs are off on this server: every call may do everything (start it with --acl)")
					return nil
				}
				tw := keyValues(g.stdout)
				tokenLines(tw, resp.Msg.GetToken())
				if s := resp.Msg.GetSessionId(); s != 0 {
					fmt.Fprintf(tw, "Session:\t%d (a session credential: it acts only on that session)\n", s)
				}
				tw.Flush()
				rules := resp.Msg.GetEffectiveRules()
				if strings.TrimSpace(rules) == "" {
					rules = "(none: every call is denied)"
				}
				printRules(g.stdout, "Rules in force:", rules)
				return nil
			})
		},
	}
}

// keyValues aligns "key:\tvalue" lines.
func keyValues(w io.Writer) *tabwriter.Writer { return tabwriter.NewWriter(w, 0, 4, 1, ' ', 0) }

// printToken prints a token as "key: value" lines.
func printToken(w io.Writer, t *beaconv1.AclToken) {
	tw := keyValues(w)
	tokenLines(tw, t)
	tw.Flush()
}

// tokenLines writes a token's "key:\tvalue" lines; the SecretID only when
// the answer carries it (the one that made the token).
func tokenLines(tw io.Writer, t *beaconv1.AclToken) {
	fmt.Fprintf(tw, "AccessorID:\t%s\n", t.GetAccessorId())
	if s := t.GetSecretId(); s != "" {
		fmt.Fprintf(tw, "SecretID:\t%s\n", s)
	}
	fmt.Fprintf(tw, "Description:\t%s\n", dash(t.GetDescription()))
	fmt.Fprintf(tw, "Policies:\t%s\n", list(t.GetPolicies()))
	fmt.Fprintf(tw, "Roles:\t%s\n", list(t.GetRoles()))
	fmt.Fprintf(tw, "Service identities:\t%s\n", identities(t.GetServiceIdentities()))
	if c := t.GetCreatedAt(); c != nil {
		fmt.Fprintf(tw, "Created:\t%s\n", c.AsTime().UTC().Format(time.RFC3339))
	}
	fmt.Fprintf(tw, "Expires:\t%s\n", expires(t.GetExpiresAt()))
}

func list(names []string) string { return dash(strings.Join(names, ",")) }

func identities(ids []*beaconv1.AclServiceIdentity) string {
	parts := make([]string, len(ids))
	for i, id := range ids {
		parts[i] = id.GetNamespace() + "/" + id.GetService()
	}
	return list(parts)
}

func expires(ts *timestamppb.Timestamp) string {
	if ts == nil {
		return "never"
	}
	return ts.AsTime().UTC().Format(time.RFC3339)
}

package cli_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protojson"

	beaconv1 "beacon.dev/beacon/api/beacon/v1"
	"beacon.dev/beacon/server/servertest"
)

// field is the value of a "Key: value" line of out.
func field(out, key string) string {
	for _, l := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(l, key+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// The ACL commands end to end, on a server with ACLs on: bootstrap and
// break-glass, policies, tokens with service identities, whoami, denials
// that name the permission, BEACON_TOKEN and --token-file, and a deleted
// token refused.
func TestACLCommands(t *testing.T) {
	cfg := servertest.Config(t, "")
	cfg.ACL = true
	srv := servertest.Start(t, cfg)
	s := "--server=" + srv.Addr()
	dir := t.TempDir()

	code, out, errs := run(s, "acl", "bootstrap")
	mgmt := field(out, "SecretID")
	if code != 0 || mgmt == "" || field(out, "AccessorID") == "" || !strings.Contains(out, "Keep the secret safe") || field(out, "Policies") != "global-management" {
		t.Fatalf("acl bootstrap = %d %q %q, want the management token and a line to keep it safe", code, out, errs)
	}
	if strings.Count(out, "SecretID") != 1 {
		t.Errorf("acl bootstrap names SecretID more than once (grep SecretID must find one line):\n%s", out)
	}
	code, out, errs = run(s, "--token", mgmt, "acl", "whoami")
	if code != 0 || field(out, "Policies") != "global-management" || !strings.Contains(out, "write acl") {
		t.Errorf("acl whoami with the bootstrap token = %d %q %q", code, out, errs)
	}
	code, _, errs = run(s, "acl", "bootstrap")
	if code != 1 || !strings.Contains(errs, "already bootstrapped") || !strings.Contains(errs, "--break-glass FILE") || !strings.Contains(errs, "acl-break-glass.key") {
		t.Errorf("second acl bootstrap = %d %q, want 1 pointing to --break-glass and the key file", code, errs)
	}

	// Break-glass, from the key file in the data dir; -o json is the token.
	key := filepath.Join(cfg.DataDir, "acl-break-glass.key")
	code, out, errs = run(s, "acl", "bootstrap", "--break-glass", key, "-o", "json")
	var glass beaconv1.AclToken
	if code != 0 || protojson.Unmarshal([]byte(out), &glass) != nil || glass.GetSecretId() == "" {
		t.Fatalf("acl bootstrap --break-glass -o json = %d %q %q", code, out, errs)
	}
	if code, out, errs := run(s, "--token", glass.GetSecretId(), "acl", "token", "list"); code != 0 || !strings.Contains(out, glass.GetAccessorId()) {
		t.Errorf("acl token list with the break-glass token = %d %q %q", code, out, errs)
	}
	if code, _, errs := run(s, "acl", "bootstrap", "--break-glass", filepath.Join(dir, "nope")); code != 1 || !strings.Contains(errs, "invalid --break-glass") {
		t.Errorf("acl bootstrap --break-glass MISSING = %d %q", code, errs)
	}

	// A policy from a file, one from --rules, a token of both.
	rules := filepath.Join(dir, "orders.rules")
	if err := os.WriteFile(rules, []byte("write service default/orders   # register\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	m := "--token=" + mgmt
	if code, out, errs := run(s, m, "acl", "policy", "create", "--name", "orders", "--description", "orders service", "--rules-file", rules); code != 0 || !strings.Contains(out, "created policy orders") {
		t.Fatalf("acl policy create --rules-file = %d %q %q", code, out, errs)
	}
	if code, out, errs := run(s, m, "acl", "policy", "create", "--name", "read-all", "--rules", "read service *"); code != 0 {
		t.Fatalf("acl policy create --rules = %d %q %q", code, out, errs)
	}
	if code, _, errs := run(s, m, "acl", "policy", "create", "--name", "read-all", "--rules", "write service *"); code != 1 || !strings.Contains(errs, "exists") || !strings.Contains(errs, "policy update read-all") {
		t.Errorf("acl policy create of an existing name = %d %q, want it refused pointing to update", code, errs)
	}
	if code, _, errs := run(s, m, "acl", "policy", "create", "--name", "bad", "--rules", "read service *", "--rules", "write everything"); code != 1 || !strings.Contains(errs, "line 2") {
		t.Errorf("acl policy create with a bad rule = %d %q, want 1 naming line 2", code, errs)
	}
	code, out, errs = run(s, m, "acl", "policy", "read", "orders")
	if code != 0 || field(out, "Description") != "orders service" || !strings.Contains(out, "  write service default/orders") {
		t.Errorf("acl policy read orders = %d %q %q", code, out, errs)
	}
	code, out, errs = run(s, m, "acl", "policy", "list", "-o", "json")
	var policies beaconv1.ListPoliciesResponse
	if code != 0 || protojson.Unmarshal([]byte(out), &policies) != nil || len(policies.GetPolicies()) != 3 {
		t.Errorf("acl policy list -o json = %d %q %q, want global-management, orders and read-all", code, out, errs)
	}

	code, out, errs = run(s, m, "acl", "token", "create", "--description", "orders", "--policy", "read-all", "--service-identity", "orders", "--service-identity", "staging/orders")
	secret, accessor := field(out, "SecretID"), field(out, "AccessorID")
	if code != 0 || secret == "" || accessor == "" || field(out, "Service identities") != "default/orders,staging/orders" {
		t.Fatalf("acl token create = %d %q %q", code, out, errs)
	}
	code, out, errs = run(s, m, "acl", "token", "create", "--policy", "read-all", "--ttl", "24h", "-o", "json")
	var ro beaconv1.AclToken
	if code != 0 || protojson.Unmarshal([]byte(out), &ro) != nil || ro.GetSecretId() == "" || ro.GetExpiresAt() == nil {
		t.Fatalf("acl token create --ttl -o json = %d %q %q", code, out, errs)
	}

	// list and read show no secret.
	code, out, errs = run(s, m, "acl", "token", "list")
	if code != 0 || !strings.Contains(out, accessor) || !strings.Contains(out, "default/orders") || strings.Contains(out, "bct_") {
		t.Errorf("acl token list = %d %q %q, want the new token and no secret", code, out, errs)
	}
	code, out, errs = run(s, m, "acl", "token", "read", accessor)
	if code != 0 || field(out, "Policies") != "read-all" || field(out, "Description") != "orders" || strings.Contains(out, "SecretID") || strings.Contains(out, "bct_") {
		t.Errorf("acl token read = %d %q %q, want its fields and no secret", code, out, errs)
	}
	code, out, errs = run(s, m, "acl", "token", "list", "-o", "json")
	var tokens beaconv1.ListTokensResponse
	if code != 0 || protojson.Unmarshal([]byte(out), &tokens) != nil || len(tokens.GetTokens()) < 4 || strings.Contains(out, "bct_") {
		t.Errorf("acl token list -o json = %d %q %q", code, out, errs)
	}

	// whoami with the new token: its rules, from its policy and identities.
	code, out, errs = run(s, "--token", secret, "acl", "whoami")
	if code != 0 || field(out, "AccessorID") != accessor || !strings.Contains(out, "write service default/orders") || !strings.Contains(out, "read service */*") {
		t.Errorf("acl whoami with the orders token = %d %q %q, want its accessor and rules", code, out, errs)
	}

	// A read-only token that writes: refused, naming the permission, once.
	r := "--token=" + ro.GetSecretId()
	code, _, errs = run(s, r, "register", "--persistent", "--service", "web", "--id", "w-1", "--address", "127.0.0.1", "--port", "8080")
	if code != 1 || !strings.Contains(errs, `needs service:write on "default/web"`) || strings.Count(errs, "permission denied") != 1 {
		t.Errorf("register with a read-only token = %d %q, want 1 naming service:write on default/web", code, errs)
	}
	code, _, errs = run(s, r, "acl", "policy", "create", "--name", "mine", "--rules", "write service *")
	if code != 1 || !strings.Contains(errs, "needs acl:write") {
		t.Errorf("acl policy create with a read-only token = %d %q, want 1 naming acl:write", code, errs)
	}
	code, _, errs = run(s, r, "acl", "token", "update", "anonymous", "--policy", "read-all")
	if code != 1 || !strings.Contains(errs, "needs acl:") || !strings.Contains(errs, "it needs acl:write") {
		t.Errorf("acl token update with a read-only token = %d %q, want 1 saying it needs acl:write", code, errs)
	}
	code, _, errs = run(s, "acl", "token", "list")
	if code != 1 || !strings.Contains(errs, "needs acl:read") || !strings.Contains(errs, "no token was given") {
		t.Errorf("acl token list without a token = %d %q, want 1 naming acl:read and hinting at --token", code, errs)
	}

	// The anonymous token, updated: calls without a token may read.
	code, out, errs = run(s, m, "acl", "token", "update", "anonymous", "--policy", "read-all")
	if code != 0 || field(out, "AccessorID") != "anonymous" || field(out, "Policies") != "read-all" {
		t.Errorf("acl token update anonymous = %d %q %q", code, out, errs)
	}
	if code, out, errs := run(s, "acl", "whoami"); code != 0 || field(out, "AccessorID") != "anonymous" || !strings.Contains(out, "read service */*") {
		t.Errorf("acl whoami without a token = %d %q %q, want anonymous reading services", code, out, errs)
	}

	// An update keeps the fields whose flags are not given.
	code, out, errs = run(s, m, "acl", "token", "update", accessor, "--description", "orders, v2")
	if code != 0 || field(out, "Description") != "orders, v2" || field(out, "Policies") != "read-all" || field(out, "Service identities") != "default/orders,staging/orders" {
		t.Errorf("acl token update --description = %d %q %q, want only the description changed", code, out, errs)
	}

	// Roles.
	if code, out, errs := run(s, m, "acl", "role", "create", "--name", "ops", "--policy", "read-all", "--service-identity", "prod/web"); code != 0 {
		t.Fatalf("acl role create = %d %q %q", code, out, errs)
	}
	if code, out, errs := run(s, m, "acl", "role", "update", "ops", "--description", "on call"); code != 0 {
		t.Errorf("acl role update = %d %q %q", code, out, errs)
	}
	code, out, errs = run(s, m, "acl", "role", "read", "ops")
	if code != 0 || field(out, "Description") != "on call" || field(out, "Policies") != "read-all" || field(out, "Service identities") != "prod/web" {
		t.Errorf("acl role read = %d %q %q", code, out, errs)
	}
	if code, out, errs := run(s, m, "acl", "role", "list"); code != 0 || !strings.Contains(out, "ops") {
		t.Errorf("acl role list = %d %q %q", code, out, errs)
	}
	if code, out, errs := run(s, m, "acl", "role", "delete", "ops"); code != 0 || !strings.Contains(out, "deleted role ops") {
		t.Errorf("acl role delete = %d %q %q", code, out, errs)
	}

	// Policy update and delete.
	if code, out, errs := run(s, m, "acl", "policy", "update", "orders", "--rules", "write service default/orders", "--rules", "read service default/*"); code != 0 {
		t.Errorf("acl policy update = %d %q %q", code, out, errs)
	}
	if code, out, _ := run(s, m, "acl", "policy", "read", "orders"); !strings.Contains(out, "read service default/*") || field(out, "Description") != "orders service" {
		t.Errorf("acl policy read after update = %d %q, want the new rules and the old description", code, out)
	}
	if code, out, errs := run(s, m, "acl", "policy", "delete", "orders"); code != 0 || !strings.Contains(out, "deleted policy orders") {
		t.Errorf("acl policy delete = %d %q %q", code, out, errs)
	}
	if code, _, errs := run(s, m, "acl", "policy", "read", "orders"); code != 1 || !strings.Contains(errs, "not found") {
		t.Errorf("acl policy read of a deleted policy = %d %q", code, errs)
	}

	// BEACON_TOKEN, and BEACON_TOKEN_FILE with the line end a file has.
	t.Setenv("BEACON_TOKEN", mgmt)
	if code, out, errs := run(s, "acl", "whoami"); code != 0 || field(out, "Policies") != "global-management" {
		t.Errorf("acl whoami with BEACON_TOKEN = %d %q %q", code, out, errs)
	}
	tokFile := filepath.Join(dir, "orders.token")
	if err := os.WriteFile(tokFile, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if code, out, errs := run(s, "--token-file", tokFile, "acl", "whoami"); code != 0 || field(out, "AccessorID") != accessor {
		t.Errorf("acl whoami --token-file (a flag beats BEACON_TOKEN) = %d %q %q", code, out, errs)
	}
	t.Setenv("BEACON_TOKEN", "")
	t.Setenv("BEACON_TOKEN_FILE", tokFile)
	if code, out, errs := run(s, "acl", "whoami"); code != 0 || field(out, "AccessorID") != accessor {
		t.Errorf("acl whoami with BEACON_TOKEN_FILE = %d %q %q", code, out, errs)
	}
	t.Setenv("BEACON_TOKEN_FILE", "")

	// Deleted, the token is refused.
	if code, out, errs := run(s, m, "acl", "token", "delete", accessor); code != 0 || !strings.Contains(out, "deleted token "+accessor) {
		t.Fatalf("acl token delete = %d %q %q", code, out, errs)
	}
	code, _, errs = run(s, "--token-file", tokFile, "services")
	if code != 1 || !strings.Contains(errs, "beacon: unauthenticated") || !strings.Contains(errs, "the token is from --token-file "+tokFile) {
		t.Errorf("services with a deleted token = %d %q, want 1, unauthenticated, naming where the token came from", code, errs)
	}
}

// The token and ACL flags are checked before any call.
func TestACLFlagsAreChecked(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--token", "x", "--token-file", empty, "services"}, "give --token or --token-file, not both"},
		{[]string{"--token-file", empty, "services"}, "holds no token"},
		{[]string{"--token-file", filepath.Join(dir, "nope"), "services"}, "invalid --token-file"},
		{[]string{"--token", "bct_x\nKeep the secret safe", "services"}, "invalid --token: a space or control character"},
		{[]string{"acl", "token", "create", "--service-identity", "a/b/c"}, `invalid --service-identity "a/b/c"`},
		{[]string{"acl", "token", "create", "--service-identity", "prod/"}, `invalid --service-identity "prod/"`},
		{[]string{"acl", "token", "create", "--ttl", "-1h"}, "invalid --ttl -1h0m0s"},
		{[]string{"acl", "token", "update", "anonymous"}, "nothing to update"},
		{[]string{"acl", "token", "read"}, "missing ACCESSOR"},
		{[]string{"acl", "policy", "create", "--name", "p"}, "missing --rules or --rules-file"},
		{[]string{"acl", "policy", "create", "--name", "p", "--rules", "read service *", "--rules-file", empty}, "not both"},
		{[]string{"acl", "policy", "update", "p"}, "nothing to update"},
		{[]string{"acl", "role", "update", "r"}, "nothing to update"},
		{[]string{"acl", "whoami", "-o", "yaml"}, "invalid --output"},
	} {
		if code, _, errs := run(tc.args...); code != 1 || !strings.Contains(errs, tc.want) {
			t.Errorf("beacon %q = %d %q, want 1 with %q", tc.args, code, errs, tc.want)
		}
	}
	// The secret never shows in help, whatever BEACON_TOKEN holds.
	t.Setenv("BEACON_TOKEN", "bct_sekrit")
	if _, out, _ := run("acl", "whoami", "--help"); !strings.Contains(out, "--token") || strings.Contains(out, "sekrit") {
		t.Errorf("acl whoami --help shows BEACON_TOKEN's value or lacks --token:\n%s", out)
	}
}

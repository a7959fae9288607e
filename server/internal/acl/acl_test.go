package acl

import (
	"errors"
	"hash/crc32"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestParseRules(t *testing.T) {
	good := `
# comment
read  service *
write service prod/web   # trailing comment
deny  service prod/secret-*
read  namespace staging
read  key prod/config/*
write session
read operator
write acl
`
	rules, err := ParseRules(good)
	if err != nil {
		t.Fatalf("ParseRules() = %v", err)
	}
	want := []string{
		"read service */*", "write service prod/web", "deny service prod/secret-*",
		"read service staging/*", "read key staging/*", "read key prod/config/*",
		"write session", "read operator", "write acl",
	}
	if got := strings.Split(strings.TrimSpace(FormatRules(rules)), "\n"); strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("FormatRules(ParseRules()) = %q, want %q", got, want)
	}
	// What FormatRules writes parses back to the same rules.
	again, err := ParseRules(FormatRules(rules))
	if err != nil || FormatRules(again) != FormatRules(rules) {
		t.Errorf("round trip: %v, %q", err, FormatRules(again))
	}

	for _, tc := range []struct{ in, want string }{
		{"grant service *", `line 1: "grant": a rule starts with read, write or deny`},
		{"read", "line 1: read what?"},
		{"\nread service", "line 2: service needs a pattern"},
		{"read service web", `pattern "web": want NAMESPACE/NAME`},
		{"read service prod/w*b", "* may only end a pattern"},
		{"read service Prod/web", `character 'P' not allowed`},
		{"read service prod/", "empty service"},
		{"read session x", "session takes no pattern"},
		{"read service a/b c", "too many words"},
		{"read bucket x", `"bucket": unknown resource`},
		{"read namespace a/b", "a namespace has no '/'"},
		{"read service prod/" + strings.Repeat("a", 64), "at most 63"},
		{strings.Repeat("read session\n", MaxRules+1), "more than 512 rules"},
		{strings.Repeat("#", MaxRulesBytes+1), "at most 32768"},
	} {
		_, err := ParseRules(tc.in)
		var re *RuleError
		if !errors.As(err, &re) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseRules(%.30q) = %v, want a RuleError containing %q", tc.in, err, tc.want)
		}
	}
}

func TestAuthorizer(t *testing.T) {
	rules, err := ParseRules(`
read  service *
write service prod/web
write service prod/api-*
deny  service prod/api-secret*
read  service */pay
deny  service staging/*
write key prod/config/*
read operator
write session
deny session
`)
	if err != nil {
		t.Fatal(err)
	}
	a := Compile(rules)
	for _, tc := range []struct {
		ns, svc string
		want    Access
	}{
		{"prod", "web", Write},
		{"prod", "web2", Read},
		{"prod", "api-x", Write},
		{"prod", "api-secret-1", None},
		{"prod", "pay", Read},
		{"staging", "web", None},
		{"staging", "pay", None}, // the namespace part decides first
		{"dev", "anything", Read},
	} {
		if got := a.Service(tc.ns, tc.svc); got != tc.want {
			t.Errorf("Service(%s, %s) = %v, want %v", tc.ns, tc.svc, got, tc.want)
		}
	}
	if got := a.Key("prod", "config/db"); got != Write {
		t.Errorf("Key(prod, config/db) = %v, want write", got)
	}
	if got := a.Key("prod", "other"); got != None {
		t.Errorf("Key(prod, other) = %v, want none", got)
	}
	if got := a.Global(Operator); got != Read {
		t.Errorf("Global(operator) = %v, want read", got)
	}
	if got := a.Global(Session); got != None {
		t.Errorf("Global(session) = %v, want none: a deny wins over write", got)
	}
	if got := a.Global(ACL); got != None {
		t.Errorf("Global(acl) = %v, want none", got)
	}
	if a.MayCreateSessions() {
		t.Error("MayCreateSessions() = true for a token whose rules deny sessions")
	}
	if w, _ := ParseRules("write service prod/web"); !Compile(w).MayCreateSessions() {
		t.Error("MayCreateSessions() = false for a token that writes a service")
	}
	if ro := Compile([]Rule{{Access: Read, Resource: Service, Pattern: Pattern{NSPrefix: true, NamePrefix: true}}}); ro.MayCreateSessions() {
		t.Error("MayCreateSessions() = true for a read-only token")
	}
	// Equal specificity: deny beats write beats read, whatever the order.
	tie, _ := ParseRules("read service a/b\ndeny service a/b\nwrite service a/b")
	if got := Compile(tie).Service("a", "b"); got != None {
		t.Errorf("tie: Service(a, b) = %v, want none", got)
	}
	// An empty authorizer denies everything.
	if e := Compile(); e.Service("default", "x") != None || e.Global(ACL) != None || e.MayCreateSessions() {
		t.Error("the empty authorizer grants something")
	}
	if All.Service("x", "y") != Write || All.Global(ACL) != Write {
		t.Error("All does not grant everything")
	}
}

func TestServiceIdentity(t *testing.T) {
	a := Compile(ServiceIdentity{Namespace: "prod", Service: "web"}.Rules())
	if a.Service("prod", "web") != Write || a.Service("prod", "db") != Read || a.Service("dev", "web") != None {
		t.Errorf("service identity: web %v, db %v, dev/web %v", a.Service("prod", "web"), a.Service("prod", "db"), a.Service("dev", "web"))
	}
	if a.Global(Session) != None || a.Global(Operator) != None || !a.MayCreateSessions() {
		t.Error("a service identity may create sessions and nothing global")
	}
}

func TestSecrets(t *testing.T) {
	s, h := NewSecret(TokenPrefix)
	if len(s) != SecretLen || !strings.HasPrefix(s, TokenPrefix) {
		t.Fatalf("NewSecret() = %q", s)
	}
	prefix, got, err := ParseSecret(s)
	if err != nil || prefix != TokenPrefix || got != h {
		t.Fatalf("ParseSecret(NewSecret()) = %q, %v, %v", prefix, got, err)
	}
	s2, _ := NewSecret(TokenPrefix)
	if s2 == s {
		t.Fatal("two secrets are equal")
	}
	flip := []byte(s)
	flip[10] ^= 1 // still base64url, wrong checksum
	if flip[10] == '-' || flip[10] == '_' {
		flip[10] = 'A'
	}
	for _, bad := range []string{"", s[:SecretLen-1], "xyz_" + s[4:], string(flip), SessionPrefix + s[4:], s[:20] + "!" + s[21:]} {
		if _, _, err := ParseSecret(bad); !errors.Is(err, ErrMalformed) {
			t.Errorf("ParseSecret(%q) = %v, want ErrMalformed", bad, err)
		}
	}
	if got, want := checksum("bct_", []byte("abc")), crc32.ChecksumIEEE([]byte("bct_abc")); got != want {
		t.Errorf("checksum = %x, want CRC-32 %x", got, want)
	}
	if a := NewAccessor(); len(a) != 36 || a == NewAccessor() {
		t.Errorf("NewAccessor() = %q", a)
	}
	if hh, err := ParseHash(h.String()); err != nil || hh != h {
		t.Errorf("ParseHash(h.String()) = %v, %v", hh, err)
	}
}

func FuzzParseRules(f *testing.F) {
	for _, s := range []string{"read service *", "write service prod/web-*\ndeny key a/b*", "read namespace x*", "write acl # c", "deny session\n\n"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, text string) {
		rules, err := ParseRules(text)
		if err != nil {
			return
		}
		// Whatever parses formats to text that parses to the same rules.
		again, err := ParseRules(FormatRules(rules))
		if err != nil {
			t.Fatalf("FormatRules output does not parse: %v\n%s", err, FormatRules(rules))
		}
		if FormatRules(again) != FormatRules(rules) {
			t.Fatalf("round trip changed the rules:\n%s\n%s", FormatRules(rules), FormatRules(again))
		}
		a := Compile(rules)
		_ = a.Service("default", "web")
		_ = a.Key("default", "k")
	})
}

func FuzzParseSecret(f *testing.F) {
	s, _ := NewSecret(TokenPrefix)
	c, _ := NewSecret(SessionPrefix)
	for _, seed := range []string{s, c, "", "bct_", s[:51] + "=", "Bearer " + s} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, in string) {
		prefix, h, err := ParseSecret(in)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("ParseSecret(%q) = %v, not ErrMalformed", in, err)
			}
			return
		}
		if prefix != TokenPrefix && prefix != SessionPrefix || len(in) != SecretLen || h != HashSecret(in) {
			t.Fatalf("ParseSecret(%q) accepted: %q %v", in, prefix, h)
		}
	})
}

func BenchmarkDecision(b *testing.B) {
	// A token as a service would hold one: a service identity and a
	// policy of a few dozen rules.
	var text strings.Builder
	for i := range 40 {
		text.WriteString("read service team" + string(rune('a'+i%26)) + "/svc-*\n")
	}
	text.WriteString("write service prod/web\ndeny service prod/secret*\nread key prod/config/*\n")
	rules, err := ParseRules(text.String())
	if err != nil {
		b.Fatal(err)
	}
	a := Compile(rules, ServiceIdentity{Namespace: "prod", Service: "orders"}.Rules())
	secret, h := NewSecret(TokenPrefix)
	byHash := map[Hash]*Authorizer{h: a}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		_, hh, err := ParseSecret(secret)
		if err != nil {
			b.Fatal(err)
		}
		if byHash[hh].Service("prod", "orders") != Write {
			b.Fatal("denied")
		}
	}
}

func BenchmarkCheck(b *testing.B) {
	rules, _ := ParseRules("read service *\nwrite service prod/web\ndeny service prod/secret*")
	a := Compile(rules)
	b.ReportAllocs()
	for b.Loop() {
		if a.Service("prod", "web") != Write {
			b.Fatal("denied")
		}
	}
}

// BenchmarkDecisionVsBcrypt: the anchor is what etcd's auth pays to check
// a password (bcrypt at its default cost 10), in the same run.
func BenchmarkDecisionVsBcrypt(b *testing.B) {
	rules, _ := ParseRules("read service *\nwrite service prod/web")
	a := Compile(rules)
	secret, h := NewSecret(TokenPrefix)
	byHash := map[Hash]*Authorizer{h: a}
	hashed, err := bcrypt.GenerateFromPassword([]byte(secret), bcrypt.DefaultCost)
	if err != nil {
		b.Fatal(err)
	}
	per := func(n int, f func()) time.Duration {
		start := time.Now()
		for range n {
			f()
		}
		return time.Since(start) / time.Duration(n)
	}
	ours := per(100000, func() {
		_, hh, _ := ParseSecret(secret)
		if byHash[hh].Service("prod", "web") != Write {
			b.Fatal("denied")
		}
	})
	anchor := per(5, func() {
		if bcrypt.CompareHashAndPassword(hashed, []byte(secret)) != nil {
			b.Fatal("bcrypt refused")
		}
	})
	for b.Loop() {
	}
	b.ReportMetric(float64(ours.Nanoseconds()), "beacon-ns/decision")
	b.ReportMetric(float64(anchor.Nanoseconds()), "etcd-bcrypt-ns/check")
	b.ReportMetric(float64(anchor)/float64(ours), "bcrypt/beacon")
}

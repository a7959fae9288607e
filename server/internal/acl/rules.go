// Package acl is beacon's access control: the rule language, tokens and
// their secrets, the compiled authorizer the API consults on every call,
// and the in-memory replica of the ACL records kept in etcd.
//
// A policy is a list of rules, one per line:
//
//	read  service *            # every service of every namespace
//	write service prod/web     # one service
//	write service prod/api-*   # a prefix of names
//	deny  service prod/secret-*
//	read  namespace staging    # services and keys of one namespace
//	read  key     prod/config/*
//	write session              # any session: keep alive, close, see ids
//	read  operator
//	write acl                  # tokens, policies, roles
//
// Rules over names match the most specific pattern first: the namespace
// part decides before the name part, an exact name before a prefix, a
// longer prefix before a shorter one; at equal specificity deny beats
// write and write beats read. write implies read. What no rule grants is
// denied.
package acl

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
)

// Access is what a rule grants.
type Access uint8

// Accesses, weakest first; Deny overrides at equal specificity.
const (
	None Access = iota
	Read
	Write
	Deny
)

func (a Access) String() string {
	switch a {
	case Read:
		return "read"
	case Write:
		return "write"
	case Deny:
		return "deny"
	}
	return "none"
}

// Resource is what a rule is about.
type Resource uint8

// Resources.
const (
	Service Resource = iota + 1
	Key
	Session
	Operator
	ACL
)

func (r Resource) String() string {
	switch r {
	case Service:
		return "service"
	case Key:
		return "key"
	case Session:
		return "session"
	case Operator:
		return "operator"
	case ACL:
		return "acl"
	}
	return "unknown"
}

// Limits of one policy's rules.
const (
	MaxRulesBytes  = 32 << 10
	MaxRules       = 512
	MaxKeyPattern  = 512
	maxNamePattern = 63
)

// Pattern matches a namespace and a name (a service or a key): each part is
// a literal, or a prefix when its Prefix flag is set ("*" is the empty
// prefix).
type Pattern struct {
	NS         string
	NSPrefix   bool
	Name       string
	NamePrefix bool
}

// Matches reports whether the pattern covers ns/name.
func (p Pattern) Matches(ns, name string) bool {
	if p.NSPrefix {
		if !strings.HasPrefix(ns, p.NS) {
			return false
		}
	} else if ns != p.NS {
		return false
	}
	if p.NamePrefix {
		return strings.HasPrefix(name, p.Name)
	}
	return name == p.Name
}

func (p Pattern) String() string {
	part := func(s string, prefix bool) string {
		if prefix {
			return s + "*"
		}
		return s
	}
	return part(p.NS, p.NSPrefix) + "/" + part(p.Name, p.NamePrefix)
}

// specificity orders patterns: the namespace part first, exact before
// prefix, longer before shorter.
func (p Pattern) specificity(q Pattern) int {
	score := func(s string, prefix bool) int {
		if prefix {
			return 2 * len(s)
		}
		return 2*len(s) + 1 // an exact name beats a prefix of the same length
	}
	if c := cmp.Compare(score(p.NS, p.NSPrefix), score(q.NS, q.NSPrefix)); c != 0 {
		return c
	}
	return cmp.Compare(score(p.Name, p.NamePrefix), score(q.Name, q.NamePrefix))
}

// Rule is one line of a policy.
type Rule struct {
	Access   Access
	Resource Resource
	Pattern  Pattern // Service and Key only
}

func (r Rule) String() string {
	if r.Resource == Service || r.Resource == Key {
		return fmt.Sprintf("%s %s %s", r.Access, r.Resource, r.Pattern)
	}
	return fmt.Sprintf("%s %s", r.Access, r.Resource)
}

// RuleError says which line of a policy is wrong and why.
type RuleError struct {
	Line   int
	Reason string
}

func (e *RuleError) Error() string { return fmt.Sprintf("acl: rules line %d: %s", e.Line, e.Reason) }

// ParseRules parses a policy's rules (the package comment has the
// language). A namespace rule expands to a service and a key rule.
func ParseRules(text string) ([]Rule, error) {
	if len(text) > MaxRulesBytes {
		return nil, &RuleError{Line: 0, Reason: fmt.Sprintf("the rules are %d bytes, at most %d", len(text), MaxRulesBytes)}
	}
	var rules []Rule
	for n, line := range strings.Split(text, "\n") {
		n++
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		bad := func(format string, args ...any) ([]Rule, error) {
			return nil, &RuleError{Line: n, Reason: fmt.Sprintf(format, args...)}
		}
		var access Access
		switch f[0] {
		case "read":
			access = Read
		case "write":
			access = Write
		case "deny":
			access = Deny
		default:
			return bad("%q: a rule starts with read, write or deny", clip(f[0]))
		}
		if len(f) < 2 {
			return bad("%s what? (service, key, namespace, session, operator or acl)", f[0])
		}
		if len(f) > 3 {
			return bad("%q: too many words; a rule is ACCESS RESOURCE [PATTERN]", clip(strings.Join(f[3:], " ")))
		}
		arg := ""
		if len(f) == 3 {
			arg = f[2]
		}
		switch res := f[1]; res {
		case "service", "key":
			if arg == "" {
				return bad("%s needs a pattern NAMESPACE/NAME (either part may end with *; * alone is everything)", res)
			}
			kind := Service
			if res == "key" {
				kind = Key
			}
			p, err := parsePattern(arg, kind)
			if err != nil {
				return bad("%s", err)
			}
			rules = append(rules, Rule{Access: access, Resource: kind, Pattern: p})
		case "namespace":
			if arg == "" {
				return bad("namespace needs a name (or a prefix ending with *)")
			}
			if strings.Contains(arg, "/") {
				return bad("namespace %q: a namespace has no '/'", clip(arg))
			}
			p, err := parsePattern(arg+"/*", Service)
			if err != nil {
				return bad("%s", err)
			}
			rules = append(rules, Rule{Access: access, Resource: Service, Pattern: p}, Rule{Access: access, Resource: Key, Pattern: p})
		case "session", "operator", "acl":
			if arg != "" {
				return bad("%s takes no pattern (got %q)", res, clip(arg))
			}
			kind := map[string]Resource{"session": Session, "operator": Operator, "acl": ACL}[res]
			rules = append(rules, Rule{Access: access, Resource: kind})
		default:
			return bad("%q: unknown resource (service, key, namespace, session, operator or acl)", clip(res))
		}
		if len(rules) > MaxRules {
			return bad("more than %d rules", MaxRules)
		}
	}
	return rules, nil
}

// FormatRules writes rules back in the language ParseRules reads.
func FormatRules(rules []Rule) string {
	var b strings.Builder
	for _, r := range rules {
		b.WriteString(r.String())
		b.WriteByte('\n')
	}
	return b.String()
}

func parsePattern(s string, kind Resource) (Pattern, error) {
	if s == "*" {
		return Pattern{NSPrefix: true, NamePrefix: true}, nil
	}
	ns, name, ok := strings.Cut(s, "/")
	if !ok {
		return Pattern{}, fmt.Errorf("pattern %q: want NAMESPACE/NAME (or *)", clip(s))
	}
	var p Pattern
	var err error
	if p.NS, p.NSPrefix, err = patternPart(ns, "namespace", maxNamePattern, nameChar); err != nil {
		return Pattern{}, err
	}
	if kind == Key {
		p.Name, p.NamePrefix, err = patternPart(name, "key", MaxKeyPattern, keyChar)
	} else {
		p.Name, p.NamePrefix, err = patternPart(name, "service", maxNamePattern, nameChar)
	}
	return p, err
}

func patternPart(s, what string, maxLen int, ok func(byte) bool) (string, bool, error) {
	lit, prefix := strings.CutSuffix(s, "*")
	if !prefix && lit == "" {
		return "", false, fmt.Errorf("empty %s: name one, or use * for all", what)
	}
	if len(lit) > maxLen {
		return "", false, fmt.Errorf("%s pattern is %d characters, at most %d", what, len(lit), maxLen)
	}
	for i := 0; i < len(lit); i++ {
		if !ok(lit[i]) {
			if lit[i] == '*' {
				return "", false, fmt.Errorf("%s pattern %q: * may only end a pattern", what, clip(s))
			}
			return "", false, fmt.Errorf("%s pattern %q: character %q not allowed", what, clip(s), lit[i])
		}
	}
	return lit, prefix, nil
}

func nameChar(c byte) bool { return c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' }

func keyChar(c byte) bool { return c > ' ' && c < 0x7f && c != '*' }

func clip(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}

// sortRules orders name rules for first-match lookup: most specific first,
// deny before write before read at equal specificity.
func sortRules(rules []Rule) {
	slices.SortStableFunc(rules, func(a, b Rule) int {
		if c := b.Pattern.specificity(a.Pattern); c != 0 {
			return c
		}
		return cmp.Compare(b.Access, a.Access)
	})
}

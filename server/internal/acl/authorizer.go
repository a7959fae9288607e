package acl

import "fmt"

// Authorizer answers what one identity may do. It is compiled once per
// token (and rebuilt when the token's policies, roles or the token change)
// and never written after: lookups neither lock nor allocate.
type Authorizer struct {
	services []Rule // most specific first (sortRules)
	keys     []Rule
	global   [ACL + 1]Access // Session, Operator, ACL: the strongest grant, Deny if any rule denies
	writer   bool            // some rule grants write on a service, or sessions
}

// Compile builds an authorizer from rules.
func Compile(rules ...[]Rule) *Authorizer {
	a := &Authorizer{}
	for _, rs := range rules {
		for _, r := range rs {
			switch r.Resource {
			case Service:
				a.services = append(a.services, r)
				a.writer = a.writer || r.Access == Write
			case Key:
				a.keys = append(a.keys, r)
			case Session, Operator, ACL:
				if g := &a.global[r.Resource]; *g != Deny && (r.Access == Deny || r.Access > *g) {
					*g = r.Access
				}
				a.writer = a.writer || r.Resource == Session && r.Access == Write
			}
		}
	}
	sortRules(a.services)
	sortRules(a.keys)
	return a
}

// All is the authorizer of a server without ACLs, and of management
// tokens.
var All = Compile(ManagementRules)

// ManagementRules grant everything: the builtin global-management policy.
var ManagementRules = []Rule{
	{Access: Write, Resource: Service, Pattern: Pattern{NSPrefix: true, NamePrefix: true}},
	{Access: Write, Resource: Key, Pattern: Pattern{NSPrefix: true, NamePrefix: true}},
	{Access: Write, Resource: Session},
	{Access: Write, Resource: Operator},
	{Access: Write, Resource: ACL},
}

func firstMatch(rules []Rule, ns, name string) Access {
	for i := range rules {
		if rules[i].Pattern.Matches(ns, name) {
			if rules[i].Access == Deny {
				return None
			}
			return rules[i].Access
		}
	}
	return None
}

// Service is the access to a service's instances.
func (a *Authorizer) Service(ns, svc string) Access { return firstMatch(a.services, ns, svc) }

// Key is the access to a KV key.
func (a *Authorizer) Key(ns, key string) Access { return firstMatch(a.keys, ns, key) }

// Global is the access to sessions, operator actions or the ACL system.
func (a *Authorizer) Global(r Resource) Access {
	if r < Session || r > ACL || a.global[r] == Deny {
		return None
	}
	return a.global[r]
}

// MayCreateSessions: a session is worth its lease only to an identity that
// can register into it, or to one that may act on any session.
func (a *Authorizer) MayCreateSessions() bool { return a.writer && a.global[Session] != Deny }

// Rules lists the compiled rules (for whoami).
func (a *Authorizer) Rules() []Rule {
	var out []Rule
	out = append(out, a.services...)
	out = append(out, a.keys...)
	for r := Session; r <= ACL; r++ {
		if a.global[r] != None {
			out = append(out, Rule{Access: a.global[r], Resource: r})
		}
	}
	return out
}

// DeniedError says which permission a call lacked; the API answers it as
// PermissionDenied (HTTP 403).
type DeniedError struct {
	Permission string // e.g. "service:write"
	On         string // e.g. "prod/web"; empty for global permissions
	Accessor   string // the token's accessor id ("anonymous" when none)
	Why        string // more, when the permission alone does not say it
}

func (e *DeniedError) Error() string {
	s := "permission denied: needs " + e.Permission
	if e.On != "" {
		s += fmt.Sprintf(" on %q", e.On)
	}
	s += " (token " + e.Accessor + ")"
	if e.Why != "" {
		s += ": " + e.Why
	}
	return s
}

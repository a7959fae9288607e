package acl

import (
	"bytes"
	"encoding/json"
	"fmt"
	"time"

	"beacon.dev/beacon/registry"
)

// ServiceIdentity names a service its holder runs: write on that service's
// instances, read on the services of its namespace (for discovery).
type ServiceIdentity struct {
	Namespace string `json:"namespace"`
	Service   string `json:"service"`
}

// Rules of a service identity.
func (s ServiceIdentity) Rules() []Rule {
	return []Rule{
		{Access: Write, Resource: Service, Pattern: Pattern{NS: s.Namespace, Name: s.Service}},
		{Access: Read, Resource: Service, Pattern: Pattern{NS: s.Namespace, NamePrefix: true}},
	}
}

// Token is a stored token: its secret only as a hash.
type Token struct {
	Accessor          string            `json:"accessor_id"`
	SecretHash        string            `json:"secret_hash"`
	Description       string            `json:"description,omitempty"`
	Policies          []string          `json:"policies,omitempty"`
	Roles             []string          `json:"roles,omitempty"`
	ServiceIdentities []ServiceIdentity `json:"service_identities,omitempty"`
	CreatedAt         time.Time         `json:"created_at"`
	ExpiresAt         time.Time         `json:"expires_at,omitzero"`
}

// Policy is a named set of rules.
type Policy struct {
	Name        string `json:"name"`
	Description string `json:"description,omitempty"`
	Rules       string `json:"rules"`
}

// Role groups policies and service identities under a name tokens refer to.
type Role struct {
	Name              string            `json:"name"`
	Description       string            `json:"description,omitempty"`
	Policies          []string          `json:"policies,omitempty"`
	ServiceIdentities []ServiceIdentity `json:"service_identities,omitempty"`
}

// SessionCredential binds a secret to one session: it lives on the
// session's lease and may act only on that session and its instances,
// within what its parent token may do.
type SessionCredential struct {
	SecretHash string `json:"secret_hash"`
	Parent     string `json:"parent_accessor"` // the token that created the session
}

// Names of the builtin policy and the anonymous token's accessor.
const (
	ManagementPolicy  = "global-management"
	AnonymousAccessor = "anonymous"
)

// Limits of the ACL records.
const (
	MaxDescription = 256
	MaxRefs        = 32 // policies, roles or service identities of a token or role
)

func validateRefs(field string, names []string) error {
	if len(names) > MaxRefs {
		return &registry.FieldError{Field: field, Reason: fmt.Sprintf("has %d entries, at most %d", len(names), MaxRefs)}
	}
	for i, n := range names {
		if err := registry.ValidateName(fmt.Sprintf("%s[%d]", field, i), n); err != nil {
			return err
		}
	}
	return nil
}

func validateIdentities(ids []ServiceIdentity) error {
	if len(ids) > MaxRefs {
		return &registry.FieldError{Field: "service_identities", Reason: fmt.Sprintf("has %d entries, at most %d", len(ids), MaxRefs)}
	}
	for i, s := range ids {
		if err := registry.ValidateNamespace(s.Namespace); err != nil {
			return &registry.FieldError{Field: fmt.Sprintf("service_identities[%d].namespace", i), Reason: err.Error()}
		}
		if err := registry.ValidateName(fmt.Sprintf("service_identities[%d].service", i), s.Service); err != nil {
			return err
		}
	}
	return nil
}

func validateDescription(d string) error {
	if len(d) > MaxDescription {
		return &registry.FieldError{Field: "description", Reason: fmt.Sprintf("is %d bytes, at most %d", len(d), MaxDescription)}
	}
	return nil
}

// Validate checks a token's fields (not that its policies exist: a
// missing policy grants nothing).
func (t *Token) Validate() error {
	if err := validateDescription(t.Description); err != nil {
		return err
	}
	if err := validateRefs("policies", t.Policies); err != nil {
		return err
	}
	if err := validateRefs("roles", t.Roles); err != nil {
		return err
	}
	return validateIdentities(t.ServiceIdentities)
}

// Validate checks a policy's name and rules.
func (p *Policy) Validate() error {
	if err := registry.ValidateName("name", p.Name); err != nil {
		return err
	}
	if p.Name == ManagementPolicy {
		return &registry.FieldError{Field: "name", Reason: "is the builtin policy, which cannot be changed", Value: p.Name}
	}
	if err := validateDescription(p.Description); err != nil {
		return err
	}
	if _, err := ParseRules(p.Rules); err != nil {
		return &registry.FieldError{Field: "rules", Reason: err.Error()}
	}
	return nil
}

// Validate checks a role's fields.
func (r *Role) Validate() error {
	if err := registry.ValidateName("name", r.Name); err != nil {
		return err
	}
	if err := validateDescription(r.Description); err != nil {
		return err
	}
	if err := validateRefs("policies", r.Policies); err != nil {
		return err
	}
	return validateIdentities(r.ServiceIdentities)
}

// decode reads a stored record, refusing fields it does not know (a record
// written by a newer beacon is reported, not half-read).
func decode(b []byte, v any) error {
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	return d.Decode(v)
}

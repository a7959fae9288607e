package registry

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// Limits on what can be stored. They keep one instance record small (well
// under etcd's request limit) and every name usable as a DNS label.
const (
	MaxNameLen          = 63  // namespace, service, zone
	MaxIDLen            = 128 // instance id
	MaxAddressLen       = 253 // a DNS name
	MaxVersionLen       = 64
	MaxTags             = 32
	MaxTagLen           = 128
	MaxMetadataEntries  = 64
	MaxMetadataKeyLen   = 128
	MaxMetadataValueLen = 512
	MaxMetadataBytes    = 4096 // keys and values together
	MaxWeight           = 10000
	MinPort, MaxPort    = 1, 65535
	MinSessionTTL       = 2 * time.Second
	MaxSessionTTL       = time.Hour
	DefaultSessionTTL   = 10 * time.Second
	MaxSessionNameLen   = 256
)

// ErrInvalid is matched (errors.Is) by every validation error.
var ErrInvalid = errors.New("invalid argument")

// FieldError says which field is wrong and what the limit is.
type FieldError struct {
	Field  string // e.g. "port", "metadata[\"k\"]"
	Reason string // e.g. "must be between 1 and 65535"
	Value  string // the offending value, shortened; may be empty
}

func (e *FieldError) Error() string {
	if e.Value == "" {
		return fmt.Sprintf("invalid %s: %s", e.Field, e.Reason)
	}
	return fmt.Sprintf("invalid %s: %s (got %q)", e.Field, e.Reason, e.Value)
}

// Is makes errors.Is(err, ErrInvalid) true.
func (e *FieldError) Is(target error) bool { return target == ErrInvalid }

func fieldErr(field, value, format string, args ...any) *FieldError {
	if len(value) > 64 {
		value = value[:64] + "…"
	}
	if !utf8.ValidString(value) {
		value = strings.ToValidUTF8(value, "?")
	}
	return &FieldError{Field: field, Reason: fmt.Sprintf(format, args...), Value: value}
}

// ValidateName checks a DNS-label-like name: 1 to 63 characters, lowercase
// letters, digits and '-', starting and ending with a letter or digit.
func ValidateName(field, s string) error {
	if s == "" {
		return fieldErr(field, s, "must not be empty")
	}
	if len(s) > MaxNameLen {
		return fieldErr(field, s, "must be at most %d characters, has %d", MaxNameLen, len(s))
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		alnum := c >= 'a' && c <= 'z' || c >= '0' && c <= '9'
		if alnum || c == '-' && i > 0 && i < len(s)-1 {
			continue
		}
		return fieldErr(field, s, "must be lowercase letters, digits and '-' (not first or last)")
	}
	return nil
}

// ValidateID checks an instance id: 1 to 128 characters of letters, digits
// and ". _ - :".
func ValidateID(field, s string) error {
	if s == "" {
		return fieldErr(field, s, "must not be empty")
	}
	if len(s) > MaxIDLen {
		return fieldErr(field, s, "must be at most %d characters, has %d", MaxIDLen, len(s))
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
			c == '.' || c == '_' || c == '-' || c == ':' {
			continue
		}
		return fieldErr(field, s, "must be letters, digits and '.', '_', '-', ':'")
	}
	if s == "." || s == ".." {
		// The id is a path segment of etcd keys, HTTP paths and file names.
		return fieldErr(field, s, "must not be \".\" or \"..\"")
	}
	return nil
}

// ValidateNamespace checks a namespace; empty means the default one.
func ValidateNamespace(ns string) error {
	if ns == "" {
		return nil
	}
	return ValidateName("namespace", ns)
}

// validateAddress accepts an IP address or a host name. IPv4 must be a
// strict dotted quad and IPv6 must carry no zone (a zone names an interface
// of one host; the registry is read by many). A host name has RFC 1123
// labels: 1 to 63 letters, digits, '-' (not first or last) and, as Go's
// resolver allows, '_'; at most 253 characters without the optional final
// dot. Its last label must not look like a number (all digits, or 0x and
// hex digits): "999.1.1.1", "1.2.3" or "10.0.0.0x1" are broken IPv4
// addresses, not names, and resolvers disagree on what they mean (WHATWG
// URL's "ends in a number" rule).
func validateAddress(s string) error {
	if s == "" {
		return fieldErr("address", s, "must not be empty")
	}
	if len(s) > MaxAddressLen+1 { // +1: the final dot of a fully qualified name
		return fieldErr("address", s, "must be at most %d characters, has %d", MaxAddressLen, len(s))
	}
	if a, err := netip.ParseAddr(s); err == nil {
		if a.Zone() != "" {
			return fieldErr("address", s, "must be an IP address without a zone")
		}
		return nil
	}
	name := strings.TrimSuffix(s, ".")
	if len(name) > MaxAddressLen {
		return fieldErr("address", s, "must be at most %d characters, has %d", MaxAddressLen, len(name))
	}
	labels := strings.Split(name, ".")
	for _, label := range labels {
		if label == "" || len(label) > 63 {
			return fieldErr("address", s, "must be an IP address or a DNS name with labels of 1 to 63 characters")
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' ||
				c == '-' && i > 0 && i < len(label)-1 {
				continue
			}
			return fieldErr("address", s, "must be an IP address or a DNS name (labels of letters, digits, '_' and '-', not starting or ending with '-')")
		}
	}
	if numeric(labels[len(labels)-1]) {
		return fieldErr("address", s, "must be an IP address (IPv4 as four decimal numbers 0 to 255) or a DNS name whose last label is not a number")
	}
	return nil
}

// numeric reports whether a label reads as a number: all decimal digits,
// or 0x followed by hex digits.
func numeric(label string) bool {
	if len(label) >= 2 && label[0] == '0' && (label[1] == 'x' || label[1] == 'X') {
		for i := 2; i < len(label); i++ {
			if c := label[i]; !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
				return false
			}
		}
		return true
	}
	for i := 0; i < len(label); i++ {
		if label[i] < '0' || label[i] > '9' {
			return false
		}
	}
	return true
}

func validatePrintable(field, s string, max int) error {
	if len(s) > max {
		return fieldErr(field, s, "must be at most %d bytes, has %d", max, len(s))
	}
	if !utf8.ValidString(s) {
		return fieldErr(field, s, "must be valid UTF-8")
	}
	for _, r := range s {
		if r < 0x20 || r == 0x7f {
			return fieldErr(field, s, "must not contain control characters")
		}
	}
	return nil
}

// Validate checks an instance after ApplyDefaults. The error is a
// *FieldError naming the first offending field and its limit.
func (i *Instance) Validate() error {
	if err := ValidateName("namespace", i.Namespace); err != nil {
		return err
	}
	if err := ValidateName("service", i.Service); err != nil {
		return err
	}
	if err := ValidateID("id", i.ID); err != nil {
		return err
	}
	if err := validateAddress(i.Address); err != nil {
		return err
	}
	if i.Port < MinPort || i.Port > MaxPort {
		return fieldErr("port", fmt.Sprint(i.Port), "must be between %d and %d", MinPort, MaxPort)
	}
	if i.Weight < 1 || i.Weight > MaxWeight {
		return fieldErr("weight", fmt.Sprint(i.Weight), "must be between 1 and %d (0 means %d)", MaxWeight, DefaultWeight)
	}
	if i.Zone != "" {
		if err := ValidateName("zone", i.Zone); err != nil {
			return err
		}
	}
	if err := validatePrintable("version", i.Version, MaxVersionLen); err != nil {
		return err
	}
	if len(i.Tags) > MaxTags {
		return fieldErr("tags", "", "must be at most %d tags, has %d", MaxTags, len(i.Tags))
	}
	for n, t := range i.Tags {
		field := fmt.Sprintf("tags[%d]", n)
		if t == "" {
			return fieldErr(field, t, "must not be empty")
		}
		if err := validatePrintable(field, t, MaxTagLen); err != nil {
			return err
		}
	}
	if len(i.Metadata) > MaxMetadataEntries {
		return fieldErr("metadata", "", "must have at most %d entries, has %d", MaxMetadataEntries, len(i.Metadata))
	}
	total := 0
	for k, v := range i.Metadata {
		if k == "" {
			return fieldErr("metadata key", k, "must not be empty")
		}
		if err := validatePrintable("metadata key", k, MaxMetadataKeyLen); err != nil {
			return err
		}
		if err := validatePrintable(fmt.Sprintf("metadata[%q]", k), v, MaxMetadataValueLen); err != nil {
			return err
		}
		total += len(k) + len(v)
	}
	if total > MaxMetadataBytes {
		return fieldErr("metadata", "", "must total at most %d bytes of keys and values, has %d", MaxMetadataBytes, total)
	}
	if i.Status < StatusStarting || i.Status > StatusOutOfService {
		return fieldErr("status", i.Status.String(), "must be one of STARTING, UP, DRAINING, OUT_OF_SERVICE")
	}
	if i.Health < HealthPassing || i.Health > HealthCritical {
		return fieldErr("health", i.Health.String(), "must be one of PASSING, WARNING, CRITICAL")
	}
	if err := i.validateChecks(); err != nil {
		return err
	}
	return nil
}

// ValidateSessionTTL checks a session TTL; 0 means DefaultSessionTTL.
func ValidateSessionTTL(ttl time.Duration) error {
	if ttl == 0 {
		return nil
	}
	if ttl < MinSessionTTL || ttl > MaxSessionTTL {
		return fieldErr("ttl", ttl.String(), "must be between %s and %s", MinSessionTTL, MaxSessionTTL)
	}
	if ttl%time.Second != 0 {
		return fieldErr("ttl", ttl.String(), "must be a whole number of seconds")
	}
	return nil
}

// ValidateSessionName checks a session's name, free text shown to
// operators: at most MaxSessionNameLen bytes of printable UTF-8 (letters,
// marks, numbers, punctuation, symbols and the ASCII space). Control and
// format characters (NUL, line breaks, bidirectional overrides, zero-width
// spaces) are refused: they would garble or disguise what an operator reads.
// Empty is allowed.
func ValidateSessionName(name string) error {
	if len(name) > MaxSessionNameLen {
		return fieldErr("name", name, "must be at most %d bytes, has %d", MaxSessionNameLen, len(name))
	}
	if !utf8.ValidString(name) {
		return fieldErr("name", name, "must be valid UTF-8")
	}
	for _, r := range name {
		if !unicode.IsPrint(r) {
			return fieldErr("name", name, "must be printable: no control or format characters (found %U)", r)
		}
	}
	return nil
}

// ValidateProtectionThreshold checks a protection threshold: a share in [0, 1].
func ValidateProtectionThreshold(f float64) error {
	if !(f >= 0 && f <= 1) { // also refuses NaN
		return fieldErr("protection_threshold", fmt.Sprint(f), "must be between 0 (off) and 1")
	}
	return nil
}

// ValidateFloat checks that f is a finite number between lo and hi
// (inclusive). NaN and ±Inf are refused: they pass careless range checks
// (every comparison with NaN is false) and cannot be stored as JSON.
func ValidateFloat(field string, f, lo, hi float64) error {
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return fieldErr(field, fmt.Sprint(f), "must be a finite number between %v and %v", lo, hi)
	}
	if f < lo || f > hi {
		return fieldErr(field, fmt.Sprint(f), "must be between %v and %v", lo, hi)
	}
	return nil
}

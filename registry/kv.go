package registry

// Limits of the KV config store (docs/kv.md). A key is path-like so that
// prefixes (and ACL key rules, "read key prod/app/*") group keys; '@' and
// '*' are kept out because the history layout and the ACL patterns use
// them.
const (
	MaxKeyLen = 512
	// MaxValueBytes is the largest value the store accepts. With the
	// version's history record in the same etcd transaction it stays under
	// etcd's 1.5 MiB request limit; --max-kv-value-bytes may lower it.
	MaxValueBytes = 512 << 10
)

// ValidateKey checks a KV key: 1 to 512 bytes of ASCII letters, digits and
// "-._:/", not starting or ending with '/' and without empty segments.
func ValidateKey(field, s string) error {
	if s == "" {
		return fieldErr(field, s, "must not be empty")
	}
	if len(s) > MaxKeyLen {
		return fieldErr(field, s, "must be at most %d bytes, has %d", MaxKeyLen, len(s))
	}
	if err := validateKeyChars(field, s); err != nil {
		return err
	}
	if s[0] == '/' || s[len(s)-1] == '/' {
		return fieldErr(field, s, "must not start or end with '/'")
	}
	return nil
}

// ValidateKeyPrefix checks a prefix of keys: empty (every key) or what a
// key may start with — a trailing '/' is allowed.
func ValidateKeyPrefix(field, s string) error {
	if s == "" {
		return nil
	}
	if len(s) > MaxKeyLen {
		return fieldErr(field, s, "must be at most %d bytes, has %d", MaxKeyLen, len(s))
	}
	if err := validateKeyChars(field, s); err != nil {
		return err
	}
	if s[0] == '/' {
		return fieldErr(field, s, "must not start with '/'")
	}
	return nil
}

func validateKeyChars(field, s string) error {
	for i := 0; i < len(s); i++ {
		c := s[i]
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
			c == '-' || c == '.' || c == '_' || c == ':' || c == '/'
		if !ok {
			return fieldErr(field, s, "may hold only ASCII letters, digits and -._:/ (byte %d is %q)", i, c)
		}
		if c == '/' && i > 0 && s[i-1] == '/' {
			return fieldErr(field, s, "must not have an empty segment (\"//\")")
		}
	}
	return nil
}

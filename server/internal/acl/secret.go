package acl

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
)

// A secret is what a client presents: a kind prefix, then 32 random bytes
// and a CRC-32 of prefix and bytes, in unpadded base64url:
//
//	bct_<48 characters>   a token's secret
//	bcs_<48 characters>   a session-bound credential
//
// The checksum turns a truncated or mistyped secret into a clear error
// before any lookup. Only SHA-256 hashes of secrets are stored: the
// secrets are random, so a fast hash is as strong as a slow one and costs
// well under a microsecond (etcd hashes passwords with bcrypt, ~100 ms).
const (
	TokenPrefix   = "bct_"
	SessionPrefix = "bcs_"
	secretRandom  = 32
	secretBody    = secretRandom + 4
	SecretLen     = 4 + (secretBody*8+5)/6 // 52
)

// Hash is the stored form of a secret.
type Hash [sha256.Size]byte

func (h Hash) String() string { return hex.EncodeToString(h[:]) }

// ParseHash reads Hash.String's form.
func ParseHash(s string) (Hash, error) {
	var h Hash
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != len(h) {
		return h, fmt.Errorf("acl: bad secret hash %q", clip(s))
	}
	copy(h[:], b)
	return h, nil
}

// NewSecret makes a secret of the kind prefix says (TokenPrefix or
// SessionPrefix) and returns it with its hash.
func NewSecret(prefix string) (string, Hash) {
	var body [secretBody]byte
	rand.Read(body[:secretRandom])
	sum := checksum(prefix, body[:secretRandom])
	body[secretRandom], body[secretRandom+1], body[secretRandom+2], body[secretRandom+3] = byte(sum>>24), byte(sum>>16), byte(sum>>8), byte(sum)
	s := prefix + base64.RawURLEncoding.EncodeToString(body[:])
	return s, HashSecret(s)
}

// ErrMalformed is matched by every error of ParseSecret.
var ErrMalformed = errors.New("acl: malformed token")

// ParseSecret checks a presented secret's form and checksum and returns
// its kind prefix and hash. It does not allocate on success.
func ParseSecret(s string) (prefix string, h Hash, err error) {
	if len(s) != SecretLen {
		return "", h, fmt.Errorf("%w: %d characters, a token has %d (was it copied whole?)", ErrMalformed, len(s), SecretLen)
	}
	switch s[:4] {
	case TokenPrefix:
		prefix = TokenPrefix
	case SessionPrefix:
		prefix = SessionPrefix
	default:
		return "", h, fmt.Errorf("%w: it does not start with %s or %s", ErrMalformed, TokenPrefix, SessionPrefix)
	}
	var body [secretBody]byte
	var src [SecretLen - 4]byte
	copy(src[:], s[4:])
	if n, err := base64.RawURLEncoding.Decode(body[:], src[:]); err != nil || n != secretBody {
		return "", h, fmt.Errorf("%w: not base64url after the prefix", ErrMalformed)
	}
	sum := checksum(prefix, body[:secretRandom])
	if got := uint32(body[secretRandom])<<24 | uint32(body[secretRandom+1])<<16 | uint32(body[secretRandom+2])<<8 | uint32(body[secretRandom+3]); got != sum {
		return "", h, fmt.Errorf("%w: checksum mismatch (was it copied whole?)", ErrMalformed)
	}
	return prefix, HashSecret(s), nil
}

// checksum is the CRC-32 (IEEE) of prefix and b, computed here rather
// than by hash/crc32, whose assembly makes its arguments escape: parsing a
// secret stays free of allocations.
func checksum(prefix string, b []byte) uint32 {
	crc := ^uint32(0)
	for i := 0; i < len(prefix); i++ {
		crc = crc32.IEEETable[byte(crc)^prefix[i]] ^ crc>>8
	}
	for _, c := range b {
		crc = crc32.IEEETable[byte(crc)^c] ^ crc>>8
	}
	return ^crc
}

// HashSecret is the stored form of a secret.
func HashSecret(s string) Hash {
	var buf [SecretLen]byte
	if len(s) != SecretLen {
		return sha256.Sum256([]byte(s))
	}
	copy(buf[:], s)
	return sha256.Sum256(buf[:])
}

// NewAccessor makes a token's public id, UUID-shaped.
func NewAccessor() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

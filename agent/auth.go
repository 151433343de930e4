package agent

import (
	"crypto/sha256"
	"crypto/subtle"
	"strings"
)

// bearerMatcher compares Authorization headers against one token in constant
// time: both sides are hashed first, so neither content nor length leaks.
type bearerMatcher struct {
	want [sha256.Size]byte
}

func newBearerMatcher(token string) bearerMatcher {
	return bearerMatcher{want: sha256.Sum256([]byte(token))}
}

// match reports whether header is "Bearer <token>".
func (m bearerMatcher) match(header string) bool {
	got, ok := strings.CutPrefix(header, "Bearer ")
	if !ok {
		// Still hash something so a missing header costs the same.
		got = "\x00" + header
	}
	sum := sha256.Sum256([]byte(got))
	return subtle.ConstantTimeCompare(sum[:], m.want[:]) == 1 && ok
}

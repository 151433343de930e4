package sandbox

import (
	"strings"
	"testing"
)

// FuzzValidateEnv: an accepted env has names of [A-Za-z_][A-Za-z0-9_]*
// within the entry and byte limits; nothing panics.
func FuzzValidateEnv(f *testing.F) {
	f.Add("PATH", "/bin", "A", "b")
	f.Add("1BAD", "x", "", "")
	f.Add("GOOD_1", strings.Repeat("x", 1<<16), "X", "\x00")
	f.Fuzz(func(t *testing.T, k1, v1, k2, v2 string) {
		env := map[string]string{k1: v1, k2: v2}
		if ValidateEnv("env", env) != nil {
			return
		}
		size := 0
		for k, v := range env {
			size += len(k) + len(v)
			if k == "" || strings.ContainsAny(k, "= \x00-./") || (k[0] >= '0' && k[0] <= '9') {
				t.Errorf("ValidateEnv accepted the name %q", k)
			}
		}
		if size > MaxEnvBytes || len(env) > MaxEnvEntries {
			t.Errorf("ValidateEnv accepted %d bytes in %d entries", size, len(env))
		}
		_ = ValidateLanguage(k1, nil)
	})
}

package artifacts

import (
	"path"
	"strings"
	"testing"
	"unicode/utf8"
)

// FuzzValidate checks the rules that keep an executor-supplied artifact
// path and execution id from naming anything outside the store: whatever
// they accept is a clean relative path without "..", NUL or invalid
// UTF-8, and a safe id token; and they never panic.
func FuzzValidate(f *testing.F) {
	for _, s := range []string{"a.txt", "dir/b.csv", "../etc/passwd", "/abs", "a//b", "a/./b", ".", "..", "a\x00b", "\xff", "x/../y", "ex-1.2_3"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if ValidatePath(s) == nil {
			if s == "" || path.IsAbs(s) || path.Clean(s) != s || strings.IndexByte(s, 0) >= 0 || !utf8.ValidString(s) ||
				s == ".." || strings.HasPrefix(s, "../") || strings.Contains(s, "/../") || strings.HasSuffix(s, "/..") {
				t.Errorf("ValidatePath accepted %q", s)
			}
		}
		if ValidateExecutionID(s) == nil {
			if s == "" || len(s) > MaxIDBytes || s[0] == '.' || strings.ContainsAny(s, "/\\\x00 ") {
				t.Errorf("ValidateExecutionID accepted %q", s)
			}
		}
		_ = ValidateSHA256(s)
	})
}

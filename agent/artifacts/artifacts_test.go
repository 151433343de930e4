package artifacts

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/sandboxhq/sandbox"
)

func sum(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

func newStore(t *testing.T) (*Store, string) {
	t.Helper()
	dir := t.TempDir()
	s, err := New(dir)
	if err != nil {
		t.Fatal(err)
	}
	return s, dir
}

// files lists every regular file under dir, relative to it.
func files(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			rel, _ := filepath.Rel(dir, p)
			out = append(out, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(out)
	return out
}

func TestRoundTrip(t *testing.T) {
	s, dir := newStore(t)
	content := []byte("hello, artifact\n")
	a, err := s.Put("exec-1", "out/report.txt", bytes.NewReader(content), 1<<20, sum(content))
	if err != nil {
		t.Fatal(err)
	}
	want := Artifact{Path: "out/report.txt", SizeBytes: int64(len(content)), SHA256: sum(content)}
	if a != want {
		t.Fatalf("Put = %+v, want %+v", a, want)
	}
	rc, got, err := s.Open("exec-1", "out/report.txt")
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, content) || got != want {
		t.Fatalf("Open = %q %+v, want %q %+v", b, got, content, want)
	}
	list, err := s.List("exec-1")
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0] != want {
		t.Fatalf("List = %+v", list)
	}
	// Only the content-addressed blob and the index exist on disk.
	if f := files(t, dir); strings.Join(f, ",") != filepath.Join("exec-1", sum(content))+","+filepath.Join("exec-1", indexName) {
		t.Fatalf("files on disk: %v", f)
	}

	// Without an expected checksum the content is still hashed.
	if a, err := s.Put("exec-1", "empty", bytes.NewReader(nil), 10, ""); err != nil || a.SHA256 != sum(nil) || a.SizeBytes != 0 {
		t.Fatalf("Put empty = %+v, %v", a, err)
	}
}

func TestReplaceRemovesUnreferencedContent(t *testing.T) {
	s, dir := newStore(t)
	one, two := []byte("one"), []byte("two")
	for _, c := range [][]byte{one, two} {
		if _, err := s.Put("e", "f.txt", bytes.NewReader(c), 100, sum(c)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "e", sum(one))); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("replaced content still on disk: %v", err)
	}
	rc, a, err := s.Open("e", "f.txt")
	if err != nil {
		t.Fatal(err)
	}
	rc.Close()
	if a.SHA256 != sum(two) {
		t.Fatalf("Open after replace = %+v", a)
	}
}

func TestNotFound(t *testing.T) {
	s, _ := newStore(t)
	if _, _, err := s.Open("nope", "a.txt"); !errors.Is(err, ErrNotFound) || !errors.Is(err, sandbox.ErrNotFound) {
		t.Fatalf("Open unknown = %v", err)
	}
	if list, err := s.List("nope"); err != nil || len(list) != 0 {
		t.Fatalf("List unknown = %v, %v", list, err)
	}
}

func TestChecksumMismatch(t *testing.T) {
	s, dir := newStore(t)
	_, err := s.Put("e", "a.txt", strings.NewReader("actual"), 100, sum([]byte("announced")))
	if !errors.Is(err, ErrChecksumMismatch) || !errors.Is(err, sandbox.ErrInvalidArgument) {
		t.Fatalf("Put = %v, want checksum mismatch", err)
	}
	if _, _, err := s.Open("e", "a.txt"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("mismatched artifact is readable: %v", err)
	}
	if f := files(t, dir); len(f) != 0 {
		t.Fatalf("files left behind: %v", f)
	}
}

func TestSizeCap(t *testing.T) {
	s, dir := newStore(t)
	content := bytes.Repeat([]byte("x"), 11)
	if _, err := s.Put("e", "big", bytes.NewReader(content), 10, ""); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("Put over cap = %v, want ErrTooLarge", err)
	}
	if f := files(t, dir); len(f) != 0 {
		t.Fatalf("files left behind: %v", f)
	}
	if _, err := s.Put("e", "exact", bytes.NewReader(content[:10]), 10, ""); err != nil {
		t.Fatalf("Put at cap = %v", err)
	}
}

func TestPathValidation(t *testing.T) {
	tests := []struct {
		path string
		ok   bool
	}{
		{"a.txt", true},
		{"dir/sub/file.csv", true},
		{"..hidden", true},
		{"a..b/c", true},
		{"etc/passwd", true},
		{"with space/ünïcode.txt", true},
		{strings.Repeat("a", MaxPathBytes), true},
		{"", false},
		{".", false},
		{"..", false},
		{"../../etc/passwd", false},
		{"a/../../etc/passwd", false},
		{"a/..", false},
		{"/etc/passwd", false},
		{"./a", false},
		{"a//b", false},
		{"a/", false},
		{"a\x00b", false},
		{"bad\xffutf8", false},
		{strings.Repeat("a", MaxPathBytes+1), false},
	}
	for _, tt := range tests {
		err := ValidatePath(tt.path)
		if (err == nil) != tt.ok {
			t.Errorf("ValidatePath(%q) = %v, want ok=%v", truncate(tt.path), err, tt.ok)
		}
		if err != nil && !errors.Is(err, sandbox.ErrInvalidArgument) {
			t.Errorf("ValidatePath(%q) = %v, not an invalid argument", truncate(tt.path), err)
		}
	}
}

func TestExecutionIDValidation(t *testing.T) {
	tests := []struct {
		id string
		ok bool
	}{
		{"exec-1", true},
		{"01J9Z8X_abc.def", true},
		{"", false},
		{".", false},
		{"..", false},
		{".hidden", false},
		{"a/b", false},
		{"../x", false},
		{"a b", false},
		{"a\x00", false},
		{strings.Repeat("a", MaxIDBytes+1), false},
	}
	for _, tt := range tests {
		if err := ValidateExecutionID(tt.id); (err == nil) != tt.ok {
			t.Errorf("ValidateExecutionID(%q) = %v, want ok=%v", tt.id, err, tt.ok)
		}
	}
}

// TestTraversalStaysInsideStore puts artifacts whose names look like
// traversal attempts: the invalid ones are refused, the valid ones are only
// index keys, and nothing is written outside the store or under the user's name.
func TestTraversalStaysInsideStore(t *testing.T) {
	parent := t.TempDir()
	dir := filepath.Join(parent, "store")
	s, err := New(dir)
	if err != nil {
		t.Fatal(err)
	}
	content := []byte("pwned")
	for _, p := range []string{"../../etc/passwd", "../escape", "/etc/passwd", "a/../../../escape"} {
		if _, err := s.Put("e", p, bytes.NewReader(content), 100, ""); !errors.Is(err, ErrInvalidPath) {
			t.Errorf("Put(%q) = %v, want ErrInvalidPath", p, err)
		}
	}
	for _, id := range []string{"..", "../e", "/tmp"} {
		if _, err := s.Put(id, "a", bytes.NewReader(content), 100, ""); !errors.Is(err, ErrInvalidID) {
			t.Errorf("Put(id %q) = %v, want ErrInvalidID", id, err)
		}
	}
	// Valid but suggestive names are keys only.
	for _, p := range []string{"etc/passwd", "..passwd", "sub/x..y"} {
		if _, err := s.Put("e", p, bytes.NewReader(content), 100, ""); err != nil {
			t.Fatalf("Put(%q) = %v", p, err)
		}
	}
	got := files(t, parent)
	want := []string{filepath.Join("store", "e", sum(content)), filepath.Join("store", "e", indexName)}
	sort.Strings(want)
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("files on disk = %v, want %v", got, want)
	}
	list, err := s.List("e")
	if err != nil || len(list) != 3 {
		t.Fatalf("List = %+v, %v", list, err)
	}
}

package executor

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sandboxhq/sandbox/executor/executorapi"
)

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func paths(s snapshot) []string {
	var out []string
	for p := range s.Files {
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}

// TestScanWorkspaceOnlyRegularFiles fills a workspace with everything user
// code could leave there; only the regular files count.
func TestScanWorkspaceOnlyRegularFiles(t *testing.T) {
	ws := t.TempDir()
	outside := t.TempDir()
	write(t, filepath.Join(outside, "secret"), "secret")
	write(t, filepath.Join(outside, "dir", "inner"), "inner")
	write(t, filepath.Join(ws, "a.txt"), "a")
	write(t, filepath.Join(ws, "sub", "deeper", "b.txt"), "b")
	mustOK(t, os.Symlink(filepath.Join(outside, "secret"), filepath.Join(ws, "link-to-file")))
	mustOK(t, os.Symlink(filepath.Join(outside, "dir"), filepath.Join(ws, "link-to-dir")))
	mustOK(t, os.Symlink("/etc/passwd", filepath.Join(ws, "passwd")))
	mustOK(t, os.Symlink("nowhere", filepath.Join(ws, "dangling")))
	mustOK(t, unix.Mkfifo(filepath.Join(ws, "fifo"), 0o644))
	ln, err := net.Listen("unix", filepath.Join(ws, "sock"))
	mustOK(t, err)
	defer ln.Close()
	if os.Geteuid() == 0 {
		mustOK(t, unix.Mknod(filepath.Join(ws, "null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
	}

	s, err := scanWorkspace(ws)
	mustOK(t, err)
	if got, want := paths(s), []string{"a.txt", "sub/deeper/b.txt"}; !slices.Equal(got, want) {
		t.Errorf("scan found %v, want %v", got, want)
	}
	if s.Incomplete {
		t.Error("scan incomplete")
	}
}

func mustOK(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestChangedFiles(t *testing.T) {
	ws := t.TempDir()
	write(t, filepath.Join(ws, "same"), "same")
	write(t, filepath.Join(ws, "grown"), "1")
	write(t, filepath.Join(ws, "rewritten"), "aaaa")
	write(t, filepath.Join(ws, "replaced"), "xxxx")
	write(t, filepath.Join(ws, "deleted"), "gone")
	before, err := scanWorkspace(ws)
	mustOK(t, err)

	write(t, filepath.Join(ws, "grown"), "12")
	// Same size, mtime set back to what it was: only ctime tells.
	old := time.Unix(0, before.Files["rewritten"].Mtime)
	write(t, filepath.Join(ws, "rewritten"), "bbbb")
	mustOK(t, os.Chtimes(filepath.Join(ws, "rewritten"), old, old))
	// A new inode with the same size and times.
	write(t, filepath.Join(ws, "tmp"), "yyyy")
	oldR := time.Unix(0, before.Files["replaced"].Mtime)
	mustOK(t, os.Chtimes(filepath.Join(ws, "tmp"), oldR, oldR))
	mustOK(t, os.Rename(filepath.Join(ws, "tmp"), filepath.Join(ws, "replaced")))
	mustOK(t, os.Remove(filepath.Join(ws, "deleted")))
	write(t, filepath.Join(ws, "new", "file"), "new")

	after, err := scanWorkspace(ws)
	mustOK(t, err)
	got := changedFiles(before, after)
	want := []string{"grown", "new/file", "replaced", "rewritten"}
	if !slices.Equal(got, want) {
		t.Errorf("changed %v, want %v", got, want)
	}
}

func TestOpenScanned(t *testing.T) {
	ws := t.TempDir()
	write(t, filepath.Join(ws, "dir", "f"), "content")
	write(t, filepath.Join(ws, "other"), "other")
	s, err := scanWorkspace(ws)
	mustOK(t, err)
	f, st, err := openScanned(ws, "dir/f", s.Files["dir/f"])
	mustOK(t, err)
	b, _ := io.ReadAll(f)
	f.Close()
	if string(b) != "content" || st.Size != 7 {
		t.Fatalf("read %q size %d", b, st.Size)
	}

	outside := t.TempDir()
	write(t, filepath.Join(outside, "f"), "secret")
	cases := []struct {
		name  string
		setup func()
		rel   string
		want  fileState
	}{
		// While "other" exists, x cannot have its inode.
		{name: "another file under the name", rel: "x", want: s.Files["other"], setup: func() {
			write(t, filepath.Join(ws, "x"), "other")
		}},
		{name: "final symlink", rel: "dir/f", want: s.Files["dir/f"], setup: func() {
			mustOK(t, os.Remove(filepath.Join(ws, "dir", "f")))
			mustOK(t, os.Symlink(filepath.Join(outside, "f"), filepath.Join(ws, "dir", "f")))
		}},
		{name: "directory swapped for a symlink", rel: "dir/f", want: s.Files["dir/f"], setup: func() {
			mustOK(t, os.RemoveAll(filepath.Join(ws, "dir")))
			mustOK(t, os.Symlink(outside, filepath.Join(ws, "dir")))
		}},
		{name: "fifo swapped in", rel: "other", want: s.Files["other"], setup: func() {
			mustOK(t, os.Remove(filepath.Join(ws, "other")))
			mustOK(t, unix.Mkfifo(filepath.Join(ws, "other"), 0o644))
		}},
		{name: "escaping path", rel: "../etc/passwd", want: s.Files["other"]},
		{name: "absolute path", rel: "/etc/passwd", want: s.Files["other"]},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.setup != nil {
				tc.setup()
			}
			done := make(chan error, 1)
			go func() {
				f, _, err := openScanned(ws, tc.rel, tc.want)
				if f != nil {
					f.Close()
				}
				done <- err
			}()
			select {
			case err := <-done:
				if err == nil {
					t.Fatal("opened; want an error")
				}
			case <-time.After(10 * time.Second):
				t.Fatal("open blocked")
			}
		})
	}
}

func TestPlanArtifacts(t *testing.T) {
	const mib = 1 << 20
	snap := func(sizes map[string]int64) snapshot {
		s := snapshot{Files: map[string]fileState{}}
		for p, n := range sizes {
			s.Files[p] = fileState{Size: n}
		}
		return s
	}
	many := map[string]int64{}
	var manyNames []string
	for i := range executorapi.MaxArtifacts + 3 {
		p := string(rune('a'+i/26)) + string(rune('a'+i%26))
		many[p] = 1
		manyNames = append(manyNames, p)
	}
	slices.Sort(manyNames)
	cases := []struct {
		name        string
		sizes       map[string]int64
		collect     int
		skipped     int
		skippedName string
	}{
		{name: "small", sizes: map[string]int64{"a": 1, "b": 2}, collect: 2},
		{name: "too big", sizes: map[string]int64{"a": 1, "big": executorapi.MaxArtifactBytes + 1}, collect: 1, skipped: 1, skippedName: "big"},
		{name: "total", sizes: map[string]int64{"a": 60 * mib, "b": 60 * mib, "c": 60 * mib, "d": 60 * mib, "e": 60 * mib}, collect: 4, skipped: 1, skippedName: "e"},
		{name: "count", sizes: many, collect: executorapi.MaxArtifacts, skipped: 3, skippedName: manyNames[len(manyNames)-1]},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := snap(tc.sizes)
			plan := planArtifacts(changedFiles(snapshot{}, s), s)
			if len(plan.Collect) != tc.collect || len(plan.Skipped) != tc.skipped {
				t.Fatalf("collect %d skipped %d (%v), want %d %d", len(plan.Collect), len(plan.Skipped), plan.Skipped, tc.collect, tc.skipped)
			}
			if tc.skippedName != "" && !bytes.HasPrefix([]byte(plan.Skipped[len(plan.Skipped)-1]), []byte(tc.skippedName+" (")) {
				t.Errorf("skipped %v, want %s last", plan.Skipped, tc.skippedName)
			}
		})
	}
}

func TestVerifyingReader(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "f")
	write(t, p, "hello")
	f, err := os.Open(p)
	mustOK(t, err)
	defer f.Close()
	sum, err := hashFile(f, 5)
	mustOK(t, err)
	if b, err := io.ReadAll(newVerifyingReader(f, 5, sum)); err != nil || string(b) != "hello" {
		t.Fatalf("read %q, %v", b, err)
	}
	write(t, p, "HELLO") // same size, other bytes
	if _, err := io.ReadAll(newVerifyingReader(f, 5, sum)); !errors.Is(err, errChangedWhileUploading) {
		t.Fatalf("err %v, want errChangedWhileUploading", err)
	}
	if _, err := hashFile(f, 50); err == nil {
		t.Fatal("hashing past the end: want an error")
	}
}

func TestSummarize(t *testing.T) {
	if got := summarize("p: ", nil, 3); got != "" {
		t.Errorf("empty: %q", got)
	}
	if got, want := summarize("p: ", []string{"a", "b", "c", "d"}, 2), "p: a; b; and 2 more"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

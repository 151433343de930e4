package executor

import (
	"context"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// FuzzCollector builds a hostile workspace from the fuzz input (files,
// directories, symlinks to the host, to the root and to parents, FIFOs, and
// files swapped for links or FIFOs after the scan), then runs the
// collector's steps: scan, diff, open each changed file as scanned, hash
// it. Whatever the tree, nothing blocks, nothing panics, every collected
// path is a clean relative path of a regular file reached without a
// symlink, and a file swapped after the scan is refused, never followed.
//
// make test-fuzz runs it (and FuzzValidate...) for longer; go test runs the
// seeds.
func FuzzCollector(f *testing.F) {
	for _, seed := range []string{
		"f a\nd b\nf b/c\nl d /etc/passwd\nl e ..\nl b/f /\np g\n",
		"d x\nd x/y\nf x/y/z\nl x/y/w ../../..\nswap-link x/y/z /etc/shadow\n",
		"f a\nswap-fifo a\nf b\nswap-dir b\n",
		"l a /proc/self/root\nd a2\nl a2/b a\nf real\n",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, script string) {
		ws := t.TempDir()
		before, err := scanWorkspace(ws)
		if err != nil {
			t.Fatal(err)
		}
		var swaps [][3]string
		lines := strings.Split(script, "\n")
		if len(lines) > 200 {
			lines = lines[:200]
		}
		for _, line := range lines {
			op, rest, _ := strings.Cut(line, " ")
			name, arg, _ := strings.Cut(rest, " ")
			if name == "" || len(name) > 200 || strings.ContainsRune(name, 0) || strings.ContainsRune(arg, 0) {
				continue
			}
			p := filepath.Join(ws, filepath.Clean("/"+name)) // always inside ws
			switch op {
			case "f":
				// O_NONBLOCK: where the script made a FIFO, opening it to
				// write would wait for a reader forever.
				if f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|syscall.O_NONBLOCK, 0o644); err == nil {
					_, _ = f.WriteString(name)
					f.Close()
				}
			case "d":
				_ = os.MkdirAll(p, 0o755)
			case "l":
				_ = os.Symlink(arg, p)
			case "p":
				_ = syscall.Mkfifo(p, 0o644)
			case "swap-link", "swap-fifo", "swap-dir":
				swaps = append(swaps, [3]string{op, p, arg})
			}
		}
		after, err := scanWorkspace(ws)
		if err != nil {
			t.Fatal(err)
		}
		// Swaps happen between the scan and the collection, as a process
		// racing the collector would make them.
		for _, s := range swaps {
			// Only below a real directory: removing below a FIFO would open
			// the FIFO and wait for a writer forever.
			if fi, err := os.Lstat(filepath.Dir(s[1])); err != nil || !fi.IsDir() {
				continue
			}
			_ = os.RemoveAll(s[1])
			switch s[0] {
			case "swap-link":
				_ = os.Symlink(s[2], s[1])
			case "swap-fifo":
				_ = syscall.Mkfifo(s[1], 0o644)
			case "swap-dir":
				_ = os.Mkdir(s[1], 0o755)
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done := make(chan struct{})
		go func() {
			defer close(done)
			for _, rel := range changedFiles(before, after) {
				if rel == "" || path.IsAbs(rel) || path.Clean(rel) != rel || strings.HasPrefix(rel, "../") {
					t.Errorf("scanned path %q is not a clean relative path", rel)
					continue
				}
				// Every component but the last is a real directory, the last a
				// regular file: the scan went through no symlink.
				parts := strings.Split(rel, "/")
				for i := range parts {
					fi, err := os.Lstat(filepath.Join(ws, filepath.Join(parts[:i+1]...)))
					if err != nil {
						break // swapped away since the scan
					}
					if fi.Mode()&os.ModeSymlink != 0 && !swapped(swaps, ws, parts[:i+1]) {
						t.Errorf("scanned path %q goes through the symlink %s", rel, filepath.Join(parts[:i+1]...))
					}
				}
				want := after.Files[rel]
				file, st, err := openScanned(ws, rel, want)
				if err != nil {
					continue // refused: gone, swapped, or not the file scanned
				}
				if st.Ino != want.Ino || st.Mode&syscall.S_IFMT != syscall.S_IFREG {
					t.Errorf("%s: opened inode %d mode %o, scanned %d", rel, st.Ino, st.Mode, want.Ino)
				}
				if _, err := hashFile(file, min(want.Size, st.Size)); err != nil {
					t.Errorf("hash %s: %v", rel, err)
				}
				file.Close()
			}
		}()
		select {
		case <-done:
		case <-ctx.Done():
			t.Fatal("the collector blocked")
		}
	})
}

// swapped reports whether parts names a path the script swapped after the scan.
func swapped(swaps [][3]string, ws string, parts []string) bool {
	p := filepath.Join(append([]string{ws}, parts...)...)
	for _, s := range swaps {
		if s[1] == p {
			return true
		}
	}
	return false
}

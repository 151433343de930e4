package executor

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path"
	"slices"
	"strings"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/sandboxhq/sandbox/executor/executorapi"
)

// The workspace belongs to user code, which may fill it with anything
// (symlinks to /etc/passwd, FIFOs, device nodes, millions of files, a
// directory swapped for a symlink mid-walk). Everything here therefore works
// on descriptors: each directory is opened with O_NOFOLLOW relative to its
// parent's descriptor, entries are examined with fstatat(AT_SYMLINK_NOFOLLOW),
// and a file is only read after fstat on its descriptor shows the regular
// file the walk saw (same device and inode). No path is ever resolved
// through a symlink.

// Bounds on one scan of the workspace, so a hostile tree cannot stall the executor.
const (
	maxScanEntries = 200_000
	maxScanDepth   = 64
)

// fileState is what a scan records of one regular file. A file counts as
// changed when any of it differs: size and mtime catch ordinary writes,
// ctime catches a write whose mtime was set back, and the inode catches a
// file replaced by another of the same size and time.
type fileState struct {
	Size  int64
	Mtime int64 // ns
	Ctime int64 // ns
	Dev   uint64
	Ino   uint64
}

func stateOf(st *unix.Stat_t) fileState {
	return fileState{
		Size:  st.Size,
		Mtime: st.Mtim.Nano(),
		Ctime: st.Ctim.Nano(),
		Dev:   st.Dev,
		Ino:   st.Ino,
	}
}

// snapshot maps workspace-relative paths (slash-separated) to regular files.
type snapshot struct {
	Files map[string]fileState
	// Incomplete is set when the scan stopped at a bound.
	Incomplete bool
}

// scanWorkspace records every regular file under root, never following a
// symlink below root. Directories it cannot open are skipped.
func scanWorkspace(root string) (snapshot, error) {
	fd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return snapshot{}, fmt.Errorf("open workspace %s: %w", root, err)
	}
	s := snapshot{Files: map[string]fileState{}}
	budget := maxScanEntries
	scanDir(fd, "", 0, &s, &budget) // closes fd
	return s, nil
}

// scanDir records the regular files below the directory open as dfd (named
// rel) and closes dfd.
func scanDir(dfd int, rel string, depth int, s *snapshot, budget *int) {
	dir := os.NewFile(uintptr(dfd), rel)
	defer dir.Close()
	names, err := dir.Readdirnames(-1)
	if err != nil && len(names) == 0 {
		return
	}
	slices.Sort(names)
	for _, name := range names {
		if *budget <= 0 {
			s.Incomplete = true
			return
		}
		*budget--
		var st unix.Stat_t
		if err := unix.Fstatat(dfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			continue // gone since the listing
		}
		p := path.Join(rel, name)
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			s.Files[p] = stateOf(&st)
		case unix.S_IFDIR:
			if depth+1 >= maxScanDepth {
				s.Incomplete = true
				continue
			}
			sub, err := unix.Openat(dfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
			if err != nil {
				continue // unreadable, or swapped for a symlink since the fstatat
			}
			var sst unix.Stat_t
			if err := unix.Fstat(sub, &sst); err != nil || sst.Dev != st.Dev || sst.Ino != st.Ino {
				unix.Close(sub)
				continue // swapped for another directory since the fstatat
			}
			scanDir(sub, p, depth+1, s, budget)
		default:
			// Symlinks, FIFOs, sockets and devices are never artifacts.
		}
	}
}

// changedFiles lists, sorted, the files of after that are new or differ from before.
func changedFiles(before, after snapshot) []string {
	var out []string
	for p, st := range after.Files {
		if old, ok := before.Files[p]; !ok || old != st {
			out = append(out, p)
		}
	}
	slices.Sort(out)
	return out
}

// errNotSameFile means a path no longer names the regular file a scan saw.
var errNotSameFile = errors.New("no longer the regular file that was scanned")

// openScanned opens the file at rel under root, walking each component with
// O_NOFOLLOW, and checks it is the regular file want describes (same device
// and inode). O_NONBLOCK keeps a FIFO swapped in at the last moment from
// blocking the open; fstat then rejects it.
func openScanned(root, rel string, want fileState) (*os.File, unix.Stat_t, error) {
	var st unix.Stat_t
	if rel == "" || path.IsAbs(rel) || strings.Contains("/"+rel+"/", "/../") {
		return nil, st, fmt.Errorf("artifact path %q is not a plain relative path", rel)
	}
	dfd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, st, fmt.Errorf("open workspace %s: %w", root, err)
	}
	parts := strings.Split(rel, "/")
	for _, part := range parts[:len(parts)-1] {
		next, err := unix.Openat(dfd, part, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		unix.Close(dfd)
		if err != nil {
			return nil, st, fmt.Errorf("open %s: %w", rel, err)
		}
		dfd = next
	}
	fd, err := unix.Openat(dfd, parts[len(parts)-1], unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	unix.Close(dfd)
	if err != nil {
		return nil, st, fmt.Errorf("open %s: %w", rel, err)
	}
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return nil, st, fmt.Errorf("stat %s: %w", rel, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Dev != want.Dev || st.Ino != want.Ino {
		unix.Close(fd)
		return nil, st, fmt.Errorf("%s: %w", rel, errNotSameFile)
	}
	return os.NewFile(uintptr(fd), rel), st, nil
}

// hashFile streams the first size bytes of f through SHA-256; it fails if
// the file is shorter than that now.
func hashFile(f *os.File, size int64) (string, error) {
	h := sha256.New()
	n, err := io.Copy(h, io.NewSectionReader(f, 0, size))
	if err != nil {
		return "", fmt.Errorf("hash %s: %w", f.Name(), err)
	}
	if n != size {
		return "", fmt.Errorf("hash %s: file shrank from %d to %d bytes while being read", f.Name(), size, n)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// errChangedWhileUploading aborts an upload whose bytes no longer hash to
// the announced X-Content-Sha256.
var errChangedWhileUploading = errors.New("file changed while being uploaded")

// verifyingReader streams the first size bytes of a file, hashing them. It
// withholds the last bytes when the whole no longer hashes to the announced
// value, so the receiver gets a short body, never a complete wrong one.
type verifyingReader struct {
	r      io.Reader
	h      hash.Hash
	want   string
	size   int64
	read   int64
	failed atomic.Bool // read by the caller while the transport may still be reading
}

func newVerifyingReader(f *os.File, size int64, sha string) *verifyingReader {
	return &verifyingReader{r: io.NewSectionReader(f, 0, size), h: sha256.New(), want: sha, size: size}
}

func (v *verifyingReader) Read(p []byte) (int, error) {
	if v.failed.Load() {
		return 0, errChangedWhileUploading
	}
	n, err := v.r.Read(p)
	v.h.Write(p[:n])
	v.read += int64(n)
	if (v.read == v.size || err == io.EOF) && hex.EncodeToString(v.h.Sum(nil)) != v.want {
		v.failed.Store(true)
		return 0, errChangedWhileUploading
	}
	return n, err
}

// artifactPlan is the outcome of applying the artifact caps to the changed files.
type artifactPlan struct {
	Collect []string
	// Skipped explains, per file, why it was left out.
	Skipped []string
}

// planArtifacts applies MaxArtifacts, MaxArtifactBytes and
// MaxTotalArtifactBytes, in path order, to the changed files.
func planArtifacts(changed []string, after snapshot) artifactPlan {
	var plan artifactPlan
	var total int64
	for _, p := range changed {
		size := after.Files[p].Size
		switch {
		case len(plan.Collect) >= executorapi.MaxArtifacts:
			plan.Skipped = append(plan.Skipped, fmt.Sprintf("%s (more than %d artifacts)", p, executorapi.MaxArtifacts))
		case size > executorapi.MaxArtifactBytes:
			plan.Skipped = append(plan.Skipped, fmt.Sprintf("%s (%d bytes, over the %d-byte limit per file)", p, size, executorapi.MaxArtifactBytes))
		case total+size > executorapi.MaxTotalArtifactBytes:
			plan.Skipped = append(plan.Skipped, fmt.Sprintf("%s (would pass the %d-byte total limit)", p, executorapi.MaxTotalArtifactBytes))
		default:
			plan.Collect = append(plan.Collect, p)
			total += size
		}
	}
	return plan
}

// summarize joins notes into one line, listing at most max of them.
func summarize(prefix string, notes []string, max int) string {
	if len(notes) == 0 {
		return ""
	}
	shown := notes[:min(len(notes), max)]
	s := prefix + strings.Join(shown, "; ")
	if rest := len(notes) - len(shown); rest > 0 {
		s += fmt.Sprintf("; and %d more", rest)
	}
	return s
}

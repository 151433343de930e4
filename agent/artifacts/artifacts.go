// Package artifacts is the agent's local artifact store: the files an
// execution left in its workspace, uploaded by the executor and later
// downloaded by the servers.
//
// The path a user's code chose is never used as a filesystem path. Bytes are
// stored content-addressed and the user's path is only a key in a small
// per-execution index:
//
//	<dir>/<execution id>/<sha256 hex>   the bytes (temp file, fsync, rename)
//	<dir>/<execution id>/index.json     {"version":1,"artifacts":{"<path>":{"size_bytes":N,"sha256":"..."}}}
//
// Execution ids are checked to be safe tokens before they name a directory.
// Artifacts outlive sessions: nothing in the agent deletes them when a session
// stops.
package artifacts

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"unicode/utf8"

	"github.com/sandboxhq/sandbox"
)

// Errors of the store; each wraps the matching domain error.
var (
	ErrNotFound         = fmt.Errorf("%w: artifact", sandbox.ErrNotFound)
	ErrInvalidPath      = fmt.Errorf("%w: artifact path", sandbox.ErrInvalidArgument)
	ErrInvalidID        = fmt.Errorf("%w: execution id", sandbox.ErrInvalidArgument)
	ErrTooLarge         = fmt.Errorf("%w: artifact too large", sandbox.ErrResourceExhausted)
	ErrChecksumMismatch = fmt.Errorf("%w: artifact sha256 mismatch", sandbox.ErrInvalidArgument)
)

// MaxPathBytes bounds an artifact's path.
const MaxPathBytes = 4096

// MaxIDBytes bounds an execution id.
const MaxIDBytes = 128

const (
	indexName     = "index.json"
	indexVersion  = 1
	tempPrefix    = ".tmp-"
	dirPerm       = 0o700
	filePerm      = 0o600
	sha256HexSize = sha256.Size * 2
)

// Artifact describes one stored file.
type Artifact struct {
	// Path is the artifact's path relative to the workspace, as the executor reported it.
	Path      string
	SizeBytes int64
	// SHA256 is the lower-case hex SHA-256 of the content.
	SHA256 string
}

type indexEntry struct {
	SizeBytes int64  `json:"size_bytes"`
	SHA256    string `json:"sha256"`
}

type indexFile struct {
	Version   int                   `json:"version"`
	Artifacts map[string]indexEntry `json:"artifacts"`
}

// Store keeps artifacts under one directory. It is safe for concurrent use.
type Store struct {
	dir string
	// mu serialises index updates; blob writes run outside it.
	mu sync.Mutex
}

// New opens (creating if needed) a store rooted at dir.
func New(dir string) (*Store, error) {
	if dir == "" {
		return nil, errors.New("artifact store: empty directory")
	}
	if err := os.MkdirAll(dir, dirPerm); err != nil {
		return nil, fmt.Errorf("artifact store: create %s: %w", dir, err)
	}
	return &Store{dir: dir}, nil
}

// ValidateExecutionID checks that id is a safe token: 1-128 bytes of
// [A-Za-z0-9_.-], not starting with a dot.
func ValidateExecutionID(id string) error {
	if id == "" || len(id) > MaxIDBytes {
		return fmt.Errorf("%w %q must be 1-%d characters", ErrInvalidID, truncate(id), MaxIDBytes)
	}
	if id[0] == '.' {
		return fmt.Errorf("%w %q must not start with a dot", ErrInvalidID, id)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_', c == '.':
		default:
			return fmt.Errorf("%w %q may only hold letters, digits, '-', '_' and '.'", ErrInvalidID, truncate(id))
		}
	}
	return nil
}

// ValidatePath checks an artifact path: non-empty, at most 4096 bytes, valid
// UTF-8 without NUL, relative, already clean, and without ".." components.
func ValidatePath(p string) error {
	switch {
	case p == "":
		return fmt.Errorf("%w must not be empty", ErrInvalidPath)
	case len(p) > MaxPathBytes:
		return fmt.Errorf("%w is %d bytes, at most %d are allowed", ErrInvalidPath, len(p), MaxPathBytes)
	case strings.IndexByte(p, 0) >= 0:
		return fmt.Errorf("%w %q contains NUL", ErrInvalidPath, truncate(p))
	case !utf8.ValidString(p):
		return fmt.Errorf("%w %q is not valid UTF-8", ErrInvalidPath, truncate(p))
	case path.IsAbs(p):
		return fmt.Errorf("%w %q must be relative", ErrInvalidPath, truncate(p))
	case path.Clean(p) != p || p == ".":
		return fmt.Errorf("%w %q is not clean", ErrInvalidPath, truncate(p))
	}
	for _, part := range strings.Split(p, "/") {
		if part == ".." {
			return fmt.Errorf("%w %q must not contain '..'", ErrInvalidPath, truncate(p))
		}
	}
	return nil
}

// ValidateSHA256 checks a lower-case hex SHA-256.
func ValidateSHA256(s string) error {
	if len(s) != sha256HexSize {
		return fmt.Errorf("%w: sha256 %q must be %d lower-case hex digits", sandbox.ErrInvalidArgument, truncate(s), sha256HexSize)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return fmt.Errorf("%w: sha256 %q must be %d lower-case hex digits", sandbox.ErrInvalidArgument, truncate(s), sha256HexSize)
		}
	}
	return nil
}

// Put stores the bytes of r as relPath of executionID. It reads at most
// maxBytes (ErrTooLarge beyond) and, when wantSHA256 is set, rejects content
// whose SHA-256 differs (ErrChecksumMismatch). Putting a path again replaces it.
func (s *Store) Put(executionID, relPath string, r io.Reader, maxBytes int64, wantSHA256 string) (Artifact, error) {
	if err := ValidateExecutionID(executionID); err != nil {
		return Artifact{}, err
	}
	if err := ValidatePath(relPath); err != nil {
		return Artifact{}, err
	}
	if wantSHA256 != "" {
		if err := ValidateSHA256(wantSHA256); err != nil {
			return Artifact{}, err
		}
	}
	if maxBytes < 0 {
		return Artifact{}, fmt.Errorf("%w: negative size limit %d", sandbox.ErrInvalidArgument, maxBytes)
	}
	execDir := filepath.Join(s.dir, executionID)
	if err := os.MkdirAll(execDir, dirPerm); err != nil {
		return Artifact{}, fmt.Errorf("artifact %q of execution %s: %w", relPath, executionID, err)
	}

	tmp, err := os.CreateTemp(execDir, tempPrefix+"*")
	if err != nil {
		return Artifact{}, fmt.Errorf("artifact %q of execution %s: %w", relPath, executionID, err)
	}
	tmpName := tmp.Name()
	committed := false
	defer func() {
		if !committed {
			_ = tmp.Close()
			_ = os.Remove(tmpName)
		}
	}()

	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(tmp, h), io.LimitReader(r, maxBytes+1))
	if err != nil {
		return Artifact{}, fmt.Errorf("artifact %q of execution %s: read: %w", relPath, executionID, err)
	}
	if n > maxBytes {
		return Artifact{}, fmt.Errorf("%w: %q of execution %s exceeds %d bytes", ErrTooLarge, relPath, executionID, maxBytes)
	}
	sum := hex.EncodeToString(h.Sum(nil))
	if wantSHA256 != "" && sum != wantSHA256 {
		return Artifact{}, fmt.Errorf("%w: %q of execution %s: announced %s, received %d bytes with %s", ErrChecksumMismatch, relPath, executionID, wantSHA256, n, sum)
	}
	if err := tmp.Sync(); err != nil {
		return Artifact{}, fmt.Errorf("artifact %q of execution %s: fsync: %w", relPath, executionID, err)
	}
	if err := tmp.Close(); err != nil {
		return Artifact{}, fmt.Errorf("artifact %q of execution %s: close: %w", relPath, executionID, err)
	}

	// The rename happens under the lock so that a concurrent replacement
	// cannot remove a blob that is about to be indexed again.
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := os.Rename(tmpName, filepath.Join(execDir, sum)); err != nil {
		return Artifact{}, fmt.Errorf("artifact %q of execution %s: %w", relPath, executionID, err)
	}
	committed = true
	idx, err := s.readIndex(executionID)
	if err != nil {
		return Artifact{}, err
	}
	old, replaced := idx.Artifacts[relPath]
	idx.Artifacts[relPath] = indexEntry{SizeBytes: n, SHA256: sum}
	if err := s.writeIndex(executionID, idx); err != nil {
		return Artifact{}, err
	}
	if replaced && old.SHA256 != sum && !referenced(idx, old.SHA256) {
		// The old content is no longer reachable through any path.
		_ = os.Remove(filepath.Join(execDir, old.SHA256))
	}
	return Artifact{Path: relPath, SizeBytes: n, SHA256: sum}, nil
}

// Stat returns the metadata of relPath of executionID, or ErrNotFound.
func (s *Store) Stat(executionID, relPath string) (Artifact, error) {
	if err := ValidateExecutionID(executionID); err != nil {
		return Artifact{}, err
	}
	if err := ValidatePath(relPath); err != nil {
		return Artifact{}, err
	}
	s.mu.Lock()
	idx, err := s.readIndex(executionID)
	s.mu.Unlock()
	if err != nil {
		return Artifact{}, err
	}
	e, ok := idx.Artifacts[relPath]
	if !ok {
		return Artifact{}, fmt.Errorf("%w: %q of execution %s", ErrNotFound, relPath, executionID)
	}
	return Artifact{Path: relPath, SizeBytes: e.SizeBytes, SHA256: e.SHA256}, nil
}

// Open returns the content of relPath of executionID and its metadata, or
// ErrNotFound. The caller closes the reader.
func (s *Store) Open(executionID, relPath string) (io.ReadCloser, Artifact, error) {
	a, err := s.Stat(executionID, relPath)
	if err != nil {
		return nil, Artifact{}, err
	}
	f, err := os.Open(filepath.Join(s.dir, executionID, a.SHA256))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, Artifact{}, fmt.Errorf("%w: %q of execution %s: content %s is missing", ErrNotFound, relPath, executionID, a.SHA256)
	}
	if err != nil {
		return nil, Artifact{}, fmt.Errorf("artifact %q of execution %s: %w", relPath, executionID, err)
	}
	return f, a, nil
}

// List returns the artifacts of executionID sorted by path; an execution
// without artifacts has an empty list.
func (s *Store) List(executionID string) ([]Artifact, error) {
	if err := ValidateExecutionID(executionID); err != nil {
		return nil, err
	}
	s.mu.Lock()
	idx, err := s.readIndex(executionID)
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	out := make([]Artifact, 0, len(idx.Artifacts))
	for p, e := range idx.Artifacts {
		out = append(out, Artifact{Path: p, SizeBytes: e.SizeBytes, SHA256: e.SHA256})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Path < out[j].Path })
	return out, nil
}

// readIndex loads an execution's index; s.mu must be held.
func (s *Store) readIndex(executionID string) (indexFile, error) {
	idx := indexFile{Version: indexVersion, Artifacts: map[string]indexEntry{}}
	b, err := os.ReadFile(filepath.Join(s.dir, executionID, indexName))
	if errors.Is(err, fs.ErrNotExist) {
		return idx, nil
	}
	if err != nil {
		return idx, fmt.Errorf("artifact index of execution %s: %w", executionID, err)
	}
	if err := json.Unmarshal(b, &idx); err != nil {
		return idx, fmt.Errorf("artifact index of execution %s: %w", executionID, err)
	}
	if idx.Version != indexVersion {
		return idx, fmt.Errorf("artifact index of execution %s: unknown version %d", executionID, idx.Version)
	}
	if idx.Artifacts == nil {
		idx.Artifacts = map[string]indexEntry{}
	}
	return idx, nil
}

// writeIndex replaces an execution's index atomically; s.mu must be held.
func (s *Store) writeIndex(executionID string, idx indexFile) error {
	execDir := filepath.Join(s.dir, executionID)
	b, err := json.Marshal(idx)
	if err != nil {
		return fmt.Errorf("artifact index of execution %s: %w", executionID, err)
	}
	tmp, err := os.CreateTemp(execDir, tempPrefix+"index-*")
	if err != nil {
		return fmt.Errorf("artifact index of execution %s: %w", executionID, err)
	}
	tmpName := tmp.Name()
	_, err = tmp.Write(b)
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmpName, filepath.Join(execDir, indexName))
	}
	if err != nil {
		_ = os.Remove(tmpName)
		return fmt.Errorf("artifact index of execution %s: %w", executionID, err)
	}
	return syncDir(execDir)
}

func referenced(idx indexFile, sum string) bool {
	for _, e := range idx.Artifacts {
		if e.SHA256 == sum {
			return true
		}
	}
	return false
}

// syncDir makes renames in dir durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// truncate keeps error messages about hostile input short.
func truncate(s string) string {
	const max = 80
	if len(s) <= max {
		return s
	}
	return s[:max] + "..."
}

package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"

	"connectrpc.com/connect"

	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
)

func (a *app) cmdArtifactsList(ctx context.Context, args []string) error {
	fs := a.newFlagSet("artifacts list")
	format := outputFlag(fs)
	pos, err := a.parseLeaf(fs, args, "artifacts list EXECUTION_ID", "Lists the files an execution left under /workspace.", 1, 1)
	if err != nil {
		return err
	}
	c, err := a.clients()
	if err != nil {
		return err
	}
	resp, err := c.executions.GetExecution(ctx, connect.NewRequest(&sandboxv1.GetExecutionRequest{ExecutionId: pos[0]}))
	if err != nil {
		return err
	}
	arts := resp.Msg.GetExecution().GetArtifacts()
	if *format == formatJSON {
		return a.printArtifactsJSON(arts)
	}
	t := newTable(a.stdout, "PATH", "SIZE", "SHA256")
	for _, art := range arts {
		t.row(art.GetPath(), formatBytes(art.GetSizeBytes()), art.GetSha256())
	}
	return t.flush()
}

// printArtifactsJSON prints {"artifacts": [...]}, each artifact in protojson,
// like the lists of the other commands.
func (a *app) printArtifactsJSON(arts []*sandboxv1.Artifact) error {
	doc := struct {
		Artifacts []json.RawMessage `json:"artifacts"`
	}{Artifacts: []json.RawMessage{}}
	for _, art := range arts {
		b, err := jsonOptions.Marshal(art)
		if err != nil {
			return fmt.Errorf("encode artifact %s as JSON: %w", art.GetPath(), err)
		}
		doc.Artifacts = append(doc.Artifacts, b)
	}
	b, err := json.Marshal(doc)
	if err != nil {
		return fmt.Errorf("encode artifacts as JSON: %w", err)
	}
	return a.writeJSON(b)
}

func (a *app) cmdArtifactsGet(ctx context.Context, args []string) error {
	fs := a.newFlagSet("artifacts get")
	out := fs.String("o", "", "write to `FILE` ('-': stdout; default: the base name of PATH in the current directory)")
	pos, err := a.parseLeaf(fs, args, "artifacts get EXECUTION_ID PATH [-o FILE|-]",
		"Downloads one artifact and checks its SHA-256; nothing is written under the final name unless it matches.", 2, 2)
	if err != nil {
		return err
	}
	execID, artPath := pos[0], pos[1]
	rel, err := safeRelPath(artPath)
	if err != nil {
		return err
	}
	c, err := a.clients()
	if err != nil {
		return err
	}
	dest := *out
	if dest == "" {
		dest = filepath.Base(rel)
	}
	if dest == "-" {
		return a.downloadToStdout(ctx, c, execID, artPath)
	}
	if dest, err = a.abs(dest); err != nil {
		return err
	}
	return downloadToFile(ctx, c, execID, artPath, dest)
}

// downloadToFile writes an artifact to a temporary file beside dest and
// renames it to dest once its checksum matched.
func downloadToFile(ctx context.Context, c *clients, execID, artPath, dest string) error {
	tmp, err := os.CreateTemp(filepath.Dir(dest), "."+filepath.Base(dest)+".*.tmp")
	if err != nil {
		return fmt.Errorf("artifact %s: %w", artPath, err)
	}
	_, err = fetchArtifact(ctx, c, execID, artPath, tmp)
	if err == nil {
		err = tmp.Chmod(0o644)
	}
	if cerr := tmp.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("artifact %s: %w", artPath, cerr)
	}
	if err == nil {
		if err = os.Rename(tmp.Name(), dest); err != nil {
			err = fmt.Errorf("artifact %s: %w", artPath, err)
		}
	}
	if err != nil {
		os.Remove(tmp.Name())
	}
	return err
}

// downloadToStdout spools an artifact to a temporary file and copies it to
// stdout only once its checksum matched, so that a pipe never gets bytes
// that fail verification.
func (a *app) downloadToStdout(ctx context.Context, c *clients, execID, artPath string) error {
	tmp, err := os.CreateTemp("", "sandboxctl-artifact-*")
	if err != nil {
		return fmt.Errorf("artifact %s: %w", artPath, err)
	}
	defer func() {
		tmp.Close()
		os.Remove(tmp.Name())
	}()
	if _, err := fetchArtifact(ctx, c, execID, artPath, tmp); err != nil {
		return err
	}
	if _, err := tmp.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("artifact %s: %w", artPath, err)
	}
	if _, err := io.Copy(a.stdout, tmp); err != nil {
		return fmt.Errorf("artifact %s: write to stdout: %w", artPath, err)
	}
	return nil
}

// downloadArtifacts writes every artifact of e under dir, keeping their
// relative paths, and returns one error per artifact that failed. Everything
// is written through an os.Root, so that neither a hostile path nor a
// symbolic link can lead outside dir; paths that are absolute or contain
// ".." are refused outright.
func downloadArtifacts(ctx context.Context, c *clients, e *sandboxv1.Execution, dir string) []error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return []error{fmt.Errorf("artifacts directory: %w", err)}
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return []error{fmt.Errorf("artifacts directory: %w", err)}
	}
	defer root.Close()
	var errs []error
	for _, art := range e.GetArtifacts() {
		if err := downloadIntoRoot(ctx, c, root, e.GetId(), art.GetPath()); err != nil {
			errs = append(errs, err)
		}
	}
	return errs
}

func downloadIntoRoot(ctx context.Context, c *clients, root *os.Root, execID, artPath string) error {
	rel, err := safeRelPath(artPath)
	if err != nil {
		return err
	}
	if dir := filepath.Dir(rel); dir != "." {
		if err := root.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("artifact %s: %w", artPath, err)
		}
	}
	tmpName := filepath.Join(filepath.Dir(rel), "."+filepath.Base(rel)+"."+rand.Text()[:10]+".tmp")
	f, err := root.OpenFile(tmpName, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("artifact %s: %w", artPath, err)
	}
	_, err = fetchArtifact(ctx, c, execID, artPath, f)
	if cerr := f.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("artifact %s: %w", artPath, cerr)
	}
	if err == nil {
		if err = root.Rename(tmpName, rel); err != nil {
			err = fmt.Errorf("artifact %s: %w", artPath, err)
		}
	}
	if err != nil {
		root.Remove(tmpName)
	}
	return err
}

// safeRelPath checks that an artifact path is relative and stays below its
// directory, and returns it in the local form.
func safeRelPath(p string) (string, error) {
	bad := func(why string) (string, error) {
		return "", connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("artifact path %q: %s", p, why))
	}
	switch {
	case p == "":
		return bad("empty")
	case strings.ContainsRune(p, 0):
		return bad("contains a NUL byte")
	case strings.HasPrefix(p, "/") || strings.HasPrefix(p, `\`) || filepath.IsAbs(p) || filepath.VolumeName(p) != "":
		return bad("absolute paths are refused")
	}
	for _, part := range strings.FieldsFunc(p, func(r rune) bool { return r == '/' || r == '\\' }) {
		if part == ".." {
			return bad(`".." is refused`)
		}
	}
	clean := path.Clean(p)
	if clean == "." {
		return bad("names no file")
	}
	return filepath.FromSlash(clean), nil
}

// fetchArtifact streams one artifact into w and checks its size and SHA-256
// against the metadata of the stream's first message. A mismatch is
// connect.CodeDataLoss; w then holds bytes that must not be used.
func fetchArtifact(ctx context.Context, c *clients, execID, artPath string, w io.Writer) (*sandboxv1.Artifact, error) {
	stream, err := c.executions.DownloadArtifact(ctx, connect.NewRequest(&sandboxv1.DownloadArtifactRequest{ExecutionId: execID, Path: artPath}))
	if err != nil {
		return nil, fmt.Errorf("artifact %s: %w", artPath, err)
	}
	defer stream.Close()
	var meta *sandboxv1.Artifact
	h := sha256.New()
	var n int64
	dst := io.MultiWriter(w, h)
	for stream.Receive() {
		msg := stream.Msg()
		if meta == nil {
			if msg.GetArtifact() == nil {
				return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("artifact %s: the server sent no metadata first", artPath))
			}
			meta = msg.GetArtifact()
		}
		m, err := dst.Write(msg.GetChunk())
		n += int64(m)
		if err != nil {
			return nil, fmt.Errorf("artifact %s: %w", artPath, err)
		}
	}
	if err := stream.Err(); err != nil {
		return nil, fmt.Errorf("artifact %s: %w", artPath, err)
	}
	if meta == nil {
		return nil, connect.NewError(connect.CodeInternal, fmt.Errorf("artifact %s: the server sent an empty stream", artPath))
	}
	if n != meta.GetSizeBytes() {
		return nil, connect.NewError(connect.CodeDataLoss, fmt.Errorf("artifact %s: received %d bytes, expected %d", artPath, n, meta.GetSizeBytes()))
	}
	if got, want := hex.EncodeToString(h.Sum(nil)), strings.ToLower(meta.GetSha256()); got != want {
		return nil, connect.NewError(connect.CodeDataLoss, fmt.Errorf("artifact %s: sha256 mismatch: received %s, expected %s", artPath, got, want))
	}
	return meta, nil
}

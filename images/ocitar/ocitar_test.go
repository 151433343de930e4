package main

import (
	"archive/tar"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/sandboxhq/sandbox/internal/testenv"
)

// entry is what the tests compare of a tar header.
type entry struct {
	Name     string
	Type     byte
	Linkname string
	Mode     int64
	Body     string
}

func readLayer(t *testing.T, blobs string, l layer) []entry {
	t.Helper()
	f, err := os.Open(blobPath(blobs, l.Digest))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	diff := sha256.New()
	tr := tar.NewReader(io.TeeReader(zr, diff))
	var out []entry
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, entry{h.Name, h.Typeflag, h.Linkname, h.Mode, string(body)})
	}
	if _, err := io.Copy(io.Discard, zr); err != nil {
		t.Fatal(err)
	}
	if got := "sha256:" + hex.EncodeToString(diff.Sum(nil)); got != l.DiffID {
		t.Errorf("diff id = %s, uncompressed tar hashes to %s", l.DiffID, got)
	}
	return out
}

func mustWrite(t *testing.T, p, body string, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte(body), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil { // despite the umask
		t.Fatal(err)
	}
}

func TestLayerTreeAndDeterminism(t *testing.T) {
	src := t.TempDir()
	mustWrite(t, filepath.Join(src, "usr/bin/tool"), "#!/bin/sh\n", 0o755)
	mustWrite(t, filepath.Join(src, "etc/b.conf"), "b", 0o644)
	mustWrite(t, filepath.Join(src, "etc/a.conf"), "a", 0o600)
	if err := os.Link(filepath.Join(src, "usr/bin/tool"), filepath.Join(src, "usr/bin/tool2")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("usr/bin", filepath.Join(src, "bin")); err != nil {
		t.Fatal(err)
	}

	blobs := t.TempDir()
	l1, err := writeLayer(blobs, src, layerOptions{MTime: -1})
	if err != nil {
		t.Fatal(err)
	}
	// Touching files without changing content or times must not matter; a
	// second blob store must get the same bytes.
	l2, err := writeLayer(t.TempDir(), src, layerOptions{MTime: -1})
	if err != nil {
		t.Fatal(err)
	}
	if l1 != l2 {
		t.Errorf("same tree gave different layers:\n%+v\n%+v", l1, l2)
	}
	if l1.MediaType != mediaTypeLayerGzip {
		t.Errorf("media type = %s", l1.MediaType)
	}

	got := readLayer(t, blobs, l1)
	want := []entry{
		{"bin", tar.TypeSymlink, "usr/bin", 0o777, ""},
		{"etc/", tar.TypeDir, "", 0o755, ""},
		{"etc/a.conf", tar.TypeReg, "", 0o600, "a"},
		{"etc/b.conf", tar.TypeReg, "", 0o644, "b"},
		{"usr/", tar.TypeDir, "", 0o755, ""},
		{"usr/bin/", tar.TypeDir, "", 0o755, ""},
		{"usr/bin/tool", tar.TypeReg, "", 0o755, "#!/bin/sh\n"},
		{"usr/bin/tool2", tar.TypeLink, "usr/bin/tool", 0o755, ""},
	}
	if !slices.Equal(got, want) {
		t.Errorf("entries:\n got %+v\nwant %+v", got, want)
	}

	// A forced mtime makes the digest independent of the files' times.
	forced := func() layer {
		l, err := writeLayer(t.TempDir(), src, layerOptions{MTime: 0})
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	before := forced()
	later := time.Now().Add(time.Hour)
	if err := os.Chtimes(filepath.Join(src, "etc/a.conf"), later, later); err != nil {
		t.Fatal(err)
	}
	if after := forced(); after != before {
		t.Errorf("with -mtime 0 a changed mtime changed the layer: %s -> %s", before.Digest, after.Digest)
	}
	if l3, err := writeLayer(t.TempDir(), src, layerOptions{MTime: -1}); err != nil {
		t.Fatal(err)
	} else if l3.Digest == l1.Digest {
		t.Errorf("without -mtime a changed mtime kept digest %s", l1.Digest)
	}
}

func TestLayerOverlayWhiteouts(t *testing.T) {
	testenv.RequireRoot(t) // mknod and trusted.* xattrs
	upper := t.TempDir()
	mustWrite(t, filepath.Join(upper, "etc/new.conf"), "n", 0o644)
	if err := syscall.Mknod(filepath.Join(upper, "etc/gone"), syscall.S_IFCHR|0o000, 0); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(upper, "opq/sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Setxattr(filepath.Join(upper, "opq"), "trusted.overlay.opaque", []byte("y"), 0); err != nil {
		t.Skipf("filesystem of %s has no trusted xattrs: %v", upper, err)
	}

	blobs := t.TempDir()
	l, err := writeLayer(blobs, upper, layerOptions{Overlay: true, MTime: -1})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range readLayer(t, blobs, l) {
		names = append(names, e.Name)
		if e.Type != tar.TypeReg && e.Type != tar.TypeDir {
			t.Errorf("%s: type %q in an overlay layer", e.Name, e.Type)
		}
	}
	want := []string{"etc/", "etc/.wh.gone", "etc/new.conf", "opq/", "opq/.wh..wh..opq", "opq/sub/"}
	if !slices.Equal(names, want) {
		t.Errorf("entries = %q, want %q", names, want)
	}
}

func TestImageArchive(t *testing.T) {
	blobs := t.TempDir()
	var layers []layer
	for _, body := range []string{"one", "two"} {
		src := t.TempDir()
		mustWrite(t, filepath.Join(src, body), body, 0o644)
		l, err := writeLayer(blobs, src, layerOptions{MTime: 0})
		if err != nil {
			t.Fatal(err)
		}
		layers = append(layers, l)
	}
	cfg := imageConfig{User: "1000:1000", Entrypoint: "/usr/local/bin/sandbox-executor", WorkingDir: "/workspace",
		Env: []string{"PATH=/usr/bin:/bin"}, Labels: []string{"k=v"}}
	const ref = "localhost/sandbox/test:latest"
	img, err := buildImage(blobs, ref, cfg, layers)
	if err != nil {
		t.Fatal(err)
	}
	again, err := buildImage(blobs, ref, cfg, layers)
	if err != nil {
		t.Fatal(err)
	}
	if again.manifest.Digest != img.manifest.Digest {
		t.Errorf("same input gave manifests %s and %s", img.manifest.Digest, again.manifest.Digest)
	}
	sum := sha256.Sum256([]byte(layers[0].DiffID + " " + layers[1].DiffID))
	if want := "sha256:" + hex.EncodeToString(sum[:]); img.chainID != want {
		t.Errorf("chain id = %s, want %s", img.chainID, want)
	}

	out := filepath.Join(t.TempDir(), "image.tar")
	if err := img.writeArchive(out); err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{}
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		files[h.Name] = b
	}
	blob := func(digest string) []byte {
		t.Helper()
		b, ok := files["blobs/sha256/"+digest[len("sha256:"):]]
		if !ok {
			t.Fatalf("archive has no blob %s", digest)
		}
		if sum := sha256.Sum256(b); "sha256:"+hex.EncodeToString(sum[:]) != digest {
			t.Fatalf("blob %s has the wrong content", digest)
		}
		return b
	}
	if string(files["oci-layout"]) != `{"imageLayoutVersion":"1.0.0"}` {
		t.Errorf("oci-layout = %q", files["oci-layout"])
	}
	var index ociIndex
	if err := json.Unmarshal(files["index.json"], &index); err != nil {
		t.Fatal(err)
	}
	if len(index.Manifests) != 1 || index.Manifests[0].Annotations["io.containerd.image.name"] != ref ||
		index.Manifests[0].Annotations["org.opencontainers.image.ref.name"] != "latest" {
		t.Fatalf("index = %+v", index)
	}
	var m ociManifest
	if err := json.Unmarshal(blob(index.Manifests[0].Digest), &m); err != nil {
		t.Fatal(err)
	}
	var c ociConfig
	if err := json.Unmarshal(blob(m.Config.Digest), &c); err != nil {
		t.Fatal(err)
	}
	for _, l := range m.Layers {
		blob(l.Digest)
	}
	if c.Config.User != "1000:1000" || !slices.Equal(c.Config.Entrypoint, []string{"/usr/local/bin/sandbox-executor"}) ||
		c.Config.WorkingDir != "/workspace" || c.Config.Labels["k"] != "v" || c.OS != "linux" || c.Architecture != "amd64" {
		t.Errorf("config = %+v", c)
	}
	if !slices.Equal(c.RootFS.DiffIDs, []string{layers[0].DiffID, layers[1].DiffID}) {
		t.Errorf("diff ids = %q", c.RootFS.DiffIDs)
	}
}

func TestRefTag(t *testing.T) {
	tests := map[string]string{
		"localhost/sandbox/base:latest": "latest",
		"localhost:5000/sandbox/base":   "latest",
		"localhost:5000/sandbox/base:1": "1",
	}
	for ref, want := range tests {
		if got := refTag(ref); got != want {
			t.Errorf("refTag(%q) = %q, want %q", ref, got, want)
		}
	}
}

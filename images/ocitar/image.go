package main

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// imageConfig holds the runtime settings written into the image config.
type imageConfig struct {
	User       string
	Entrypoint string
	WorkingDir string
	Env        []string
	Labels     []string // K=V
}

// descriptor is an OCI content descriptor.
type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int64             `json:"size"`
	Annotations map[string]string `json:"annotations,omitempty"`
	Platform    *platform         `json:"platform,omitempty"`
}

type platform struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
}

// ociConfig is the subset of the OCI image config ocitar writes. Field order
// and map key order are fixed by encoding/json, so the bytes are stable.
type ociConfig struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
	Config       struct {
		User       string            `json:"User,omitempty"`
		Env        []string          `json:"Env,omitempty"`
		Entrypoint []string          `json:"Entrypoint,omitempty"`
		WorkingDir string            `json:"WorkingDir,omitempty"`
		Labels     map[string]string `json:"Labels,omitempty"`
	} `json:"config"`
	RootFS struct {
		Type    string   `json:"type"`
		DiffIDs []string `json:"diff_ids"`
	} `json:"rootfs"`
}

type ociManifest struct {
	SchemaVersion int          `json:"schemaVersion"`
	MediaType     string       `json:"mediaType"`
	Config        descriptor   `json:"config"`
	Layers        []descriptor `json:"layers"`
}

type ociIndex struct {
	SchemaVersion int          `json:"schemaVersion"`
	MediaType     string       `json:"mediaType"`
	Manifests     []descriptor `json:"manifests"`
}

// image is a built image: its blobs are in the blob store.
type image struct {
	blobs    string
	name     string
	manifest descriptor // annotated with the name, as listed in index.json
	config   descriptor
	layers   []descriptor
	chainID  string
}

// buildImage writes the config and manifest blobs for layers (bottom first).
func buildImage(blobs, name string, c imageConfig, layers []layer) (*image, error) {
	var cfg ociConfig
	cfg.Architecture = "amd64"
	cfg.OS = "linux"
	cfg.Config.User = c.User
	cfg.Config.Env = c.Env
	if c.Entrypoint != "" {
		cfg.Config.Entrypoint = []string{c.Entrypoint}
	}
	cfg.Config.WorkingDir = c.WorkingDir
	for _, kv := range c.Labels {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, fmt.Errorf("label %q is not K=V", kv)
		}
		if cfg.Config.Labels == nil {
			cfg.Config.Labels = map[string]string{}
		}
		cfg.Config.Labels[k] = v
	}
	cfg.RootFS.Type = "layers"
	img := &image{blobs: blobs, name: name}
	for _, l := range layers {
		if l.MediaType == "" || l.Digest == "" || l.DiffID == "" {
			return nil, fmt.Errorf("incomplete layer descriptor %+v", l)
		}
		if _, err := os.Stat(blobPath(blobs, l.Digest)); err != nil {
			return nil, fmt.Errorf("layer %s: %w", l.Digest, err)
		}
		cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, l.DiffID)
		img.layers = append(img.layers, descriptor{MediaType: l.MediaType, Digest: l.Digest, Size: l.Size})
	}
	img.chainID = chainID(cfg.RootFS.DiffIDs)

	var err error
	if img.config, err = putJSONBlob(blobs, mediaTypeConfig, cfg); err != nil {
		return nil, err
	}
	m := ociManifest{SchemaVersion: 2, MediaType: mediaTypeManifest, Config: img.config, Layers: img.layers}
	if img.manifest, err = putJSONBlob(blobs, mediaTypeManifest, m); err != nil {
		return nil, err
	}
	img.manifest.Annotations = map[string]string{
		// containerd names the imported image by this annotation.
		"io.containerd.image.name": name,
		// OCI's own annotation holds only the tag.
		"org.opencontainers.image.ref.name": refTag(name),
	}
	img.manifest.Platform = &platform{Architecture: "amd64", OS: "linux"}
	return img, nil
}

// writeArchive writes the image as a tar of an OCI image layout.
func (img *image) writeArchive(out string) error {
	index, err := json.Marshal(ociIndex{SchemaVersion: 2, MediaType: mediaTypeIndex, Manifests: []descriptor{img.manifest}})
	if err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(out), ".tmp-"+filepath.Base(out)+"-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	defer f.Close()

	tw := tar.NewWriter(f)
	add := func(name string, size int64, r io.Reader) error {
		if err := tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: size, ModTime: epoch}); err != nil {
			return err
		}
		n, err := io.Copy(tw, r)
		if err == nil && n != size {
			err = fmt.Errorf("%s: wrote %d of %d bytes", name, n, size)
		}
		return err
	}
	for _, d := range []string{"blobs/", "blobs/sha256/"} {
		if err := tw.WriteHeader(&tar.Header{Name: d, Typeflag: tar.TypeDir, Mode: 0o755, ModTime: epoch}); err != nil {
			return err
		}
	}
	layout := []byte(`{"imageLayoutVersion":"1.0.0"}`)
	if err := add("oci-layout", int64(len(layout)), bytes.NewReader(layout)); err != nil {
		return err
	}
	if err := add("index.json", int64(len(index)), bytes.NewReader(index)); err != nil {
		return err
	}
	seen := map[string]bool{}
	for _, d := range append([]descriptor{img.manifest, img.config}, img.layers...) {
		if seen[d.Digest] {
			continue
		}
		seen[d.Digest] = true
		if err := addBlob(add, img.blobs, d); err != nil {
			return err
		}
	}
	if err := tw.Close(); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), out)
}

func addBlob(add func(string, int64, io.Reader) error, blobs string, d descriptor) error {
	b, err := os.Open(blobPath(blobs, d.Digest))
	if err != nil {
		return err
	}
	defer b.Close()
	return add("blobs/sha256/"+strings.TrimPrefix(d.Digest, "sha256:"), d.Size, b)
}

// chainID is the OCI chain id of a stack of diff ids: the name of the
// snapshot containerd unpacks the top layer into.
func chainID(diffIDs []string) string {
	id := ""
	for i, d := range diffIDs {
		if i == 0 {
			id = d
			continue
		}
		sum := sha256.Sum256([]byte(id + " " + d))
		id = "sha256:" + hex.EncodeToString(sum[:])
	}
	return id
}

// refTag returns the tag of an image reference ("latest" when none).
func refTag(ref string) string {
	if i := strings.LastIndex(ref, ":"); i > strings.LastIndex(ref, "/") {
		return ref[i+1:]
	}
	return "latest"
}

func blobPath(blobs, digest string) string {
	return filepath.Join(blobs, "sha256", strings.TrimPrefix(digest, "sha256:"))
}

// putJSONBlob stores v as a blob and returns its descriptor.
func putJSONBlob(blobs, mediaType string, v any) (descriptor, error) {
	p, err := json.Marshal(v)
	if err != nil {
		return descriptor{}, err
	}
	sum := sha256.Sum256(p)
	d := descriptor{MediaType: mediaType, Digest: "sha256:" + hex.EncodeToString(sum[:]), Size: int64(len(p))}
	if _, err := os.Stat(blobPath(blobs, d.Digest)); err == nil {
		return d, nil
	}
	tmp, err := newBlobTemp(blobs)
	if err != nil {
		return descriptor{}, err
	}
	defer tmp.discard()
	if _, err := tmp.Write(p); err != nil {
		return descriptor{}, err
	}
	if _, _, err := tmp.commit(); err != nil {
		return descriptor{}, err
	}
	return d, nil
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func writeJSONFile(p string, v any) error {
	var buf bytes.Buffer
	if err := writeJSON(&buf, v); err != nil {
		return err
	}
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, buf.Bytes(), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, p)
}

func readJSONFile(p string, v any) error {
	b, err := os.ReadFile(p)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%s: %w", p, err)
	}
	return nil
}

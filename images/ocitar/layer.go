package main

import (
	"archive/tar"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"syscall"
	"time"
)

// Media types written by ocitar (OCI image spec v1).
const (
	mediaTypeLayerGzip = "application/vnd.oci.image.layer.v1.tar+gzip"
	mediaTypeConfig    = "application/vnd.oci.image.config.v1+json"
	mediaTypeManifest  = "application/vnd.oci.image.manifest.v1+json"
	mediaTypeIndex     = "application/vnd.oci.image.index.v1+json"
)

// OCI whiteout names (image-spec layer.md).
const (
	whiteoutPrefix = ".wh."
	whiteoutOpaque = ".wh..wh..opq"
)

// layer is a layer blob's descriptor plus its diff id (the digest of the
// uncompressed tar), which the image config needs.
type layer struct {
	MediaType string `json:"mediaType"`
	Digest    string `json:"digest"`
	Size      int64  `json:"size"`
	DiffID    string `json:"diffID"`
}

// layerOptions says how to read the source directory.
type layerOptions struct {
	// Overlay treats the source as an overlayfs upper directory.
	Overlay bool
	// MTime, when >= 0, is written as every entry's modification time.
	MTime int64
}

// epoch is the time written where a time is required but carries no meaning
// (whiteouts), so that it cannot make two layers differ.
var epoch = time.Unix(0, 0)

// xattrs copied into the layer when present. Only file capabilities matter
// for what the images run; other attributes (SELinux labels, overlayfs
// bookkeeping) must not leak into images.
var keptXattrs = []string{"security.capability"}

// writeLayer writes src as a gzip-compressed tar into the blob store and
// returns its descriptor.
func writeLayer(blobs, src string, opts layerOptions) (layer, error) {
	tmp, err := newBlobTemp(blobs)
	if err != nil {
		return layer{}, err
	}
	defer tmp.discard()

	diffHash := sha256.New()
	// Level 6 (the default) is a fair trade on 2 cores: layers are written
	// once per input change and read on every import.
	zw, err := gzip.NewWriterLevel(tmp, gzip.DefaultCompression)
	if err != nil {
		return layer{}, err
	}
	tw := tar.NewWriter(io.MultiWriter(zw, diffHash))
	if err := writeTree(tw, src, opts); err != nil {
		return layer{}, fmt.Errorf("layer from %s: %w", src, err)
	}
	if err := tw.Close(); err != nil {
		return layer{}, err
	}
	if err := zw.Close(); err != nil {
		return layer{}, err
	}
	digest, size, err := tmp.commit()
	if err != nil {
		return layer{}, err
	}
	return layer{
		MediaType: mediaTypeLayerGzip,
		Digest:    digest,
		Size:      size,
		DiffID:    "sha256:" + hex.EncodeToString(diffHash.Sum(nil)),
	}, nil
}

// writeTree writes every entry under src (not src itself) in lexical order.
func writeTree(tw *tar.Writer, src string, opts layerOptions) error {
	type inode struct{ dev, ino uint64 }
	links := map[inode]string{}
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		if rel == "." {
			return nil
		}
		name := filepath.ToSlash(rel)
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok {
			return fmt.Errorf("%s: no stat information", p)
		}
		mtime := time.Unix(st.Mtim.Sec, 0)
		if opts.MTime >= 0 {
			mtime = time.Unix(opts.MTime, 0)
		}
		hdr := &tar.Header{
			Name:    name,
			Mode:    int64(st.Mode & 0o7777),
			Uid:     int(st.Uid),
			Gid:     int(st.Gid),
			ModTime: mtime,
		}

		if opts.Overlay {
			if fi.Mode()&fs.ModeCharDevice != 0 && st.Rdev == 0 {
				// An overlayfs whiteout: the lower file was deleted. Checked
				// before hard links: the kernel may share one whiteout inode.
				return writeEmpty(tw, path.Join(path.Dir(name), whiteoutPrefix+path.Base(name)))
			}
			for _, attr := range []string{"redirect", "metacopy"} {
				if fi.Mode()&fs.ModeSymlink != 0 {
					break
				}
				if _, ok := overlayXattr(p, attr); ok {
					return fmt.Errorf("%s: overlayfs %s entry; mount the overlay with redirect_dir=off,metacopy=off", p, attr)
				}
			}
		}

		switch {
		case fi.Mode().IsRegular():
			hdr.Typeflag = tar.TypeReg
			hdr.Size = fi.Size()
			if st.Nlink > 1 {
				key := inode{uint64(st.Dev), st.Ino}
				if first, ok := links[key]; ok {
					hdr.Typeflag = tar.TypeLink
					hdr.Linkname = first
					hdr.Size = 0
				} else {
					links[key] = name
				}
			}
		case fi.IsDir():
			hdr.Typeflag = tar.TypeDir
			hdr.Name += "/"
		case fi.Mode()&fs.ModeSymlink != 0:
			hdr.Typeflag = tar.TypeSymlink
			if hdr.Linkname, err = os.Readlink(p); err != nil {
				return err
			}
		case fi.Mode()&fs.ModeNamedPipe != 0:
			hdr.Typeflag = tar.TypeFifo
		case fi.Mode()&fs.ModeDevice != 0:
			hdr.Typeflag = tar.TypeBlock
			if fi.Mode()&fs.ModeCharDevice != 0 {
				hdr.Typeflag = tar.TypeChar
			}
			hdr.Devmajor, hdr.Devminor = devNumbers(st.Rdev)
		case fi.Mode()&fs.ModeSocket != 0:
			return nil // sockets cannot be archived; nothing in an image needs one
		default:
			return fmt.Errorf("%s: unsupported file type %v", p, fi.Mode().Type())
		}
		if hdr.Typeflag == tar.TypeReg || hdr.Typeflag == tar.TypeDir {
			for _, attr := range keptXattrs {
				if v, ok := getXattr(p, attr); ok {
					if hdr.PAXRecords == nil {
						hdr.PAXRecords = map[string]string{}
					}
					hdr.PAXRecords["SCHILY.xattr."+attr] = v
				}
			}
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		if hdr.Typeflag == tar.TypeReg {
			if err := copyFile(tw, p, hdr.Size); err != nil {
				return err
			}
		}
		if opts.Overlay && fi.IsDir() {
			if v, ok := overlayXattr(p, "opaque"); ok && v == "y" {
				// The directory replaces, rather than merges with, the lower one.
				return writeEmpty(tw, path.Join(name, whiteoutOpaque))
			}
		}
		return nil
	})
}

// writeEmpty writes a whiteout marker: an empty regular file.
func writeEmpty(tw *tar.Writer, name string) error {
	return tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0, ModTime: epoch})
}

func copyFile(w io.Writer, p string, size int64) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	n, err := io.Copy(w, io.LimitReader(f, size))
	if err != nil {
		return fmt.Errorf("%s: %w", p, err)
	}
	if n != size {
		return fmt.Errorf("%s: changed while archiving (read %d of %d bytes)", p, n, size)
	}
	return nil
}

// devNumbers splits a Linux dev_t (glibc encoding).
func devNumbers(dev uint64) (major, minor int64) {
	major = int64((dev>>8)&0xfff | (dev>>32)&^0xfff)
	minor = int64(dev&0xff | (dev>>12)&^0xff)
	return major, minor
}

// overlayXattr reads an overlayfs attribute, in the trusted namespace (the
// default for a root mount) or the user namespace (userxattr mounts).
func overlayXattr(p, attr string) (string, bool) {
	if v, ok := getXattr(p, "trusted.overlay."+attr); ok {
		return v, true
	}
	return getXattr(p, "user.overlay."+attr)
}

// getXattr returns an extended attribute of p. It follows symlinks, so
// callers use it only on directories and regular files.
func getXattr(p, attr string) (string, bool) {
	buf := make([]byte, 256)
	for {
		n, err := syscall.Getxattr(p, attr, buf)
		if errors.Is(err, syscall.ERANGE) {
			buf = make([]byte, len(buf)*4)
			continue
		}
		if err != nil {
			return "", false
		}
		return string(buf[:n]), true
	}
}

// blobTemp is a blob being written; commit moves it to its digest's name.
type blobTemp struct {
	*os.File
	blobs string
	hash  hash.Hash
	size  int64
}

func newBlobTemp(blobs string) (*blobTemp, error) {
	dir := filepath.Join(blobs, "sha256")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	f, err := os.CreateTemp(dir, ".tmp-*")
	if err != nil {
		return nil, err
	}
	return &blobTemp{File: f, blobs: blobs, hash: sha256.New()}, nil
}

func (b *blobTemp) Write(p []byte) (int, error) {
	n, err := b.File.Write(p)
	b.hash.Write(p[:n])
	b.size += int64(n)
	return n, err
}

// commit syncs the blob and renames it to sha256/<hex>; it returns the digest.
func (b *blobTemp) commit() (string, int64, error) {
	if err := b.File.Sync(); err != nil {
		return "", 0, err
	}
	if err := b.File.Close(); err != nil {
		return "", 0, err
	}
	hexsum := hex.EncodeToString(b.hash.Sum(nil))
	if err := os.Rename(b.File.Name(), filepath.Join(b.blobs, "sha256", hexsum)); err != nil {
		return "", 0, err
	}
	return "sha256:" + hexsum, b.size, nil
}

// discard removes the temporary file unless it was committed.
func (b *blobTemp) discard() {
	b.File.Close()
	os.Remove(b.File.Name())
}

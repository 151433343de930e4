// Command ocitar turns directories into OCI image layers and layers into an
// OCI image archive, deterministically, with the standard library only. It is
// the packaging half of images/build.sh, which builds the root filesystems
// (debootstrap, chroot apt-get) on a machine with no registry and no Docker.
//
//	ocitar layer -blobs DIR [-overlay] [-mtime SECONDS] -desc OUT.json SRC
//	ocitar image -blobs DIR -name REF [-out ARCHIVE.tar] [config flags] LAYER.json...
//
// layer writes SRC as a gzip-compressed tar layer into the blob store
// DIR/sha256/<hex> and its descriptor (digest, size, diff id) to OUT.json.
// With -overlay, SRC is an overlayfs upper directory: whiteouts (0/0
// character devices) become ".wh." entries and opaque directories get a
// ".wh..wh..opq" entry. With -mtime every entry gets that modification time
// (used for the executor layer, so that its digest depends only on the
// binary); otherwise file times are kept, truncated to seconds, because
// Python's .pyc files record the mtime of their source.
//
// image writes the image config and manifest for the given layers (in order,
// bottom first), prints {"manifest": DIGEST, "chainID": CHAINID} and, with
// -out, writes an OCI image layout as a tar archive that
// "ctr images import" accepts, named by the io.containerd.image.name
// annotation.
//
// The same tree always gives the same layer bytes: entries are sorted, owners
// are numeric, gzip headers carry no name or time, and no timestamps other
// than file mtimes are recorded.
package main

import (
	"flag"
	"fmt"
	"os"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "layer":
		err = runLayer(os.Args[2:])
	case "image":
		err = runImage(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "ocitar %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: ocitar layer -blobs DIR [-overlay] [-mtime SECONDS] -desc OUT.json SRC")
	fmt.Fprintln(os.Stderr, "       ocitar image -blobs DIR -name REF [-out ARCHIVE.tar] [-user U] [-entrypoint P] [-workdir D] [-env K=V]... [-label K=V]... LAYER.json...")
	os.Exit(2)
}

// listFlag collects a repeatable string flag.
type listFlag []string

func (l *listFlag) String() string     { return fmt.Sprint(*l) }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func runLayer(args []string) error {
	fs := flag.NewFlagSet("layer", flag.ExitOnError)
	blobs := fs.String("blobs", "", "blob store directory (holds sha256/<hex>)")
	overlay := fs.Bool("overlay", false, "SRC is an overlayfs upper directory")
	mtime := fs.Int64("mtime", -1, "force this modification time (unix seconds) on every entry")
	desc := fs.String("desc", "", "where to write the layer descriptor (JSON)")
	_ = fs.Parse(args)
	if *blobs == "" || *desc == "" || fs.NArg() != 1 {
		return fmt.Errorf("need -blobs, -desc and one source directory")
	}
	l, err := writeLayer(*blobs, fs.Arg(0), layerOptions{Overlay: *overlay, MTime: *mtime})
	if err != nil {
		return err
	}
	return writeJSONFile(*desc, l)
}

func runImage(args []string) error {
	fs := flag.NewFlagSet("image", flag.ExitOnError)
	blobs := fs.String("blobs", "", "blob store directory (holds sha256/<hex>)")
	name := fs.String("name", "", "image reference, e.g. localhost/sandbox/python-basic:latest")
	out := fs.String("out", "", "write the OCI image archive here (optional)")
	var c imageConfig
	fs.StringVar(&c.User, "user", "", "config User")
	fs.StringVar(&c.Entrypoint, "entrypoint", "", "config Entrypoint (a single path)")
	fs.StringVar(&c.WorkingDir, "workdir", "", "config WorkingDir")
	fs.Var((*listFlag)(&c.Env), "env", "config Env entry K=V (repeatable)")
	fs.Var((*listFlag)(&c.Labels), "label", "config label K=V (repeatable)")
	_ = fs.Parse(args)
	if *blobs == "" || *name == "" || fs.NArg() == 0 {
		return fmt.Errorf("need -blobs, -name and at least one layer descriptor")
	}
	var layers []layer
	for _, p := range fs.Args() {
		var l layer
		if err := readJSONFile(p, &l); err != nil {
			return err
		}
		layers = append(layers, l)
	}
	img, err := buildImage(*blobs, *name, c, layers)
	if err != nil {
		return err
	}
	if *out != "" {
		if err := img.writeArchive(*out); err != nil {
			return err
		}
	}
	return writeJSON(os.Stdout, map[string]string{
		"manifest": img.manifest.Digest,
		"chainID":  img.chainID,
	})
}

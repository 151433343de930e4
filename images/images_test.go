package images

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/mount"
	"github.com/opencontainers/image-spec/identity"

	sandbox "github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/internal/testenv"
)

// TestBuiltImages checks the images "make images" imported into containerd:
// present, unpacked for overlayfs, configured to run the executor as 1000,
// and holding what their template promises. It reads the unpacked root
// filesystems through a read-only snapshot view instead of starting
// containers, so it stays fast.
func TestBuiltImages(t *testing.T) {
	addr := testenv.RequireContainerd(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	client, err := containerd.New(addr, containerd.WithDefaultNamespace(Namespace), containerd.WithTimeout(5*time.Second))
	if err != nil {
		t.Fatalf("connect to containerd at %s: %v", addr, err)
	}
	t.Cleanup(func() { client.Close() })
	// The snapshot views below are kept from containerd's garbage collector
	// by this lease; releasing it lets the collector take what we leave.
	ctx, release, err := client.WithLease(ctx)
	if err != nil {
		t.Fatalf("lease: %v", err)
	}
	t.Cleanup(func() {
		if err := release(context.Background()); err != nil {
			t.Errorf("release lease: %v", err)
		}
	})

	base := []string{"/usr/bin/bwrap", "/bin/bash", "/etc/ssl/certs/ca-certificates.crt", ExecutorPath}
	tests := []struct {
		ref   string
		paths []string // must exist in the root filesystem
	}{
		{BaseImage, base},
		{builtin(t, "python-basic"), append([]string{"/usr/bin/python3"}, base...)},
		{builtin(t, "python-datascience"), append([]string{
			"/usr/bin/python3",
			"/usr/lib/python3/dist-packages/numpy",
			"/usr/lib/python3/dist-packages/pandas",
			"/usr/lib/python3/dist-packages/scipy",
			"/usr/lib/python3/dist-packages/matplotlib",
		}, base...)},
		{builtin(t, "nodejs-basic"), append([]string{"/usr/bin/node"}, base...)},
	}
	for _, tt := range tests {
		t.Run(strings.TrimPrefix(tt.ref, sandbox.ImagePrefix), func(t *testing.T) {
			img, err := client.GetImage(ctx, tt.ref)
			if errdefs.IsNotFound(err) {
				testenv.Unavailable(t, "image %s is not in containerd namespace %s: run make images", tt.ref, Namespace)
			}
			if err != nil {
				t.Fatalf("get image %s: %v", tt.ref, err)
			}
			spec, err := img.Spec(ctx)
			if err != nil {
				t.Fatalf("image %s config: %v", tt.ref, err)
			}
			if spec.OS != "linux" || spec.Architecture != "amd64" {
				t.Errorf("platform = %s/%s, want linux/amd64", spec.OS, spec.Architecture)
			}
			c := spec.Config
			if c.User != User {
				t.Errorf("User = %q, want %q", c.User, User)
			}
			if !slices.Equal(c.Entrypoint, []string{ExecutorPath}) {
				t.Errorf("Entrypoint = %q, want [%q]", c.Entrypoint, ExecutorPath)
			}
			if c.WorkingDir != WorkingDir {
				t.Errorf("WorkingDir = %q, want %q", c.WorkingDir, WorkingDir)
			}
			if !slices.ContainsFunc(c.Env, func(e string) bool { return strings.HasPrefix(e, "PATH=") }) {
				t.Errorf("Env = %q, want a PATH", c.Env)
			}
			unpacked, err := img.IsUnpacked(ctx, "overlayfs")
			if err != nil {
				t.Fatalf("image %s unpacked: %v", tt.ref, err)
			}
			if !unpacked {
				t.Fatalf("image %s is not unpacked for overlayfs", tt.ref)
			}
			checkRootfs(ctx, t, client, img, tt.paths)
		})
	}
}

// checkRootfs mounts a read-only view of the image's root filesystem and
// checks the paths and the ownership of /workspace.
func checkRootfs(ctx context.Context, t *testing.T, client *containerd.Client, img containerd.Image, paths []string) {
	t.Helper()
	diffIDs, err := img.RootFS(ctx)
	if err != nil {
		t.Fatalf("image %s layers: %v", img.Name(), err)
	}
	sn := client.SnapshotService("overlayfs")
	key := fmt.Sprintf("images-test-%s-%d", strings.ReplaceAll(t.Name(), "/", "-"), time.Now().UnixNano())
	mounts, err := sn.View(ctx, key, identity.ChainID(diffIDs).String())
	if err != nil {
		t.Fatalf("view snapshot of %s: %v", img.Name(), err)
	}
	defer func() {
		if err := sn.Remove(ctx, key); err != nil && !errdefs.IsNotFound(err) {
			t.Errorf("remove view %s: %v", key, err)
		}
	}()
	err = mount.WithTempMount(ctx, mounts, func(root string) error {
		for _, p := range paths {
			if _, err := os.Stat(filepath.Join(root, p)); err != nil {
				t.Errorf("%s: %v", p, err)
			}
		}
		fi, err := os.Stat(filepath.Join(root, "workspace"))
		if err != nil {
			t.Errorf("/workspace: %v", err)
			return nil
		}
		if st := fi.Sys().(*syscall.Stat_t); !fi.IsDir() || st.Uid != 1000 || st.Gid != 1000 {
			t.Errorf("/workspace: dir=%v owner %d:%d, want a directory owned by 1000:1000", fi.IsDir(), st.Uid, st.Gid)
		}
		exe, err := os.Stat(filepath.Join(root, ExecutorPath))
		if err == nil && exe.Mode().Perm()&0o111 == 0 {
			t.Errorf("%s mode %v is not executable", ExecutorPath, exe.Mode())
		}
		return nil
	})
	if err != nil {
		t.Fatalf("mount view of %s: %v", img.Name(), err)
	}
}

// builtin returns the image of a built-in template, so that the test follows
// the domain's naming.
func builtin(t *testing.T, id string) string {
	t.Helper()
	for _, tpl := range sandbox.BuiltinTemplates {
		if tpl.ID == id {
			return tpl.Image
		}
	}
	t.Fatalf("no built-in template %q", id)
	return ""
}

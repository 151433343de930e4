package containerd_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	ctrd "github.com/containerd/containerd"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/remotes/docker"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/agent/runtime"
	"github.com/sandboxhq/sandbox/agent/runtime/containerd"
	"github.com/sandboxhq/sandbox/internal/testenv"
)

// startRegistry runs Debian's docker-registry on a loopback port and
// returns its host:port.
func startRegistry(t *testing.T) string {
	t.Helper()
	testenv.RequireBinary(t, "docker-registry")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	dir := t.TempDir()
	conf := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: %s\n", filepath.Join(dir, "data"), addr)), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("docker-registry", "serve", conf)
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		resp, err := http.Get("http://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			return addr
		}
		if time.Now().After(deadline) {
			t.Fatalf("docker-registry did not answer on %s: %v; its output:\n%s", addr, err, out.String())
		}
	}
}

// TestPullFromRegistry: a container of an image containerd does not hold
// starts once the adapter has pulled it from its registry (plain HTTP on
// loopback), and the pull happens once; an image in no registry, or named
// localhost/ (no registry), fails with a clear failed_precondition.
func TestPullFromRegistry(t *testing.T) {
	var logs syncBuffer
	rt, image := newRuntime(t, containerd.Config{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	reg := startRegistry(t)
	ctx := namespaces.WithNamespace(t.Context(), rt.Namespace())

	// Put the test image in the registry under a name containerd lacks.
	remote := fmt.Sprintf("%s/sandbox/pull-test:%d", reg, time.Now().UnixNano())
	img, err := rt.Client().GetImage(ctx, image)
	if err != nil {
		t.Fatal(err)
	}
	resolver := docker.NewResolver(docker.ResolverOptions{Hosts: docker.ConfigureDefaultRegistries(docker.WithPlainHTTP(docker.MatchLocalhost))})
	if err := rt.Client().Push(ctx, remote, img.Target(), ctrd.WithResolver(resolver)); err != nil {
		t.Fatalf("push %s: %v", remote, err)
	}
	if _, err := rt.Client().GetImage(ctx, remote); err == nil {
		t.Fatalf("containerd already holds %s", remote)
	}
	t.Cleanup(func() { _ = rt.Client().ImageService().Delete(context.WithoutCancel(ctx), remote) })

	startTwice(t, rt, remote, "pull")
	if n := strings.Count(logs.String(), "image pulled"); n != 1 {
		t.Errorf("image pulled %d times over two starts, want once; logs:\n%s", n, logs.String())
	}

	for _, missing := range []string{reg + "/sandbox/never-pushed:1", "localhost/sandbox/never-built:1"} {
		_, err := rt.Start(t.Context(), runtime.Spec{
			ID: fmt.Sprintf("missing-%d", time.Now().UnixNano()), Image: missing, Limits: sandbox.DefaultLimits,
			SocketDir: t.TempDir(), Args: []string{"sleep", "1"},
		})
		if !errors.Is(err, sandbox.ErrFailedPrecondition) || !strings.Contains(err.Error(), missing) {
			t.Errorf("Start of %s: %v, want failed_precondition naming the image", missing, err)
		}
	}
}

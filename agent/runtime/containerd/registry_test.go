package containerd_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
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

// TestPullFromRegistry: a container of an image containerd does not hold
// starts once the adapter has pulled it from its registry (plain HTTP on
// loopback), and the pull happens once; an image in no registry, or named
// localhost/ (no registry), fails with a clear failed_precondition.
func TestPullFromRegistry(t *testing.T) {
	var logs syncBuffer
	rt, image := newRuntime(t, containerd.Config{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	reg := testenv.StartRegistry(t)
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

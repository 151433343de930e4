package docker_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/docker/docker/api/types/image"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/agent/runtime"
	"github.com/sandboxhq/sandbox/agent/runtime/docker"
	"github.com/sandboxhq/sandbox/internal/testenv"
)

// lockedBuffer is a log sink safe for concurrent writes.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestPullFromRegistry: containers of an image Docker does not hold start
// once the adapter has had dockerd pull it from its registry (loopback:
// plain HTTP), pulled once for two concurrent starts; an image in no
// registry, or named localhost/ (no registry), fails with a clear
// failed_precondition.
func TestPullFromRegistry(t *testing.T) {
	base := newRuntime(t, t.TempDir())
	var logs lockedBuffer
	rt, err := docker.New(t.Context(), docker.Config{Host: testenv.DockerHost(), StateDir: t.TempDir(),
		Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rt.Close() })
	reg := testenv.StartRegistry(t)
	cli := base.Client()
	ctx := t.Context()

	// Put the test image in the registry under a name Docker then lacks.
	remote := fmt.Sprintf("%s/sandbox/pull-test:%d", reg, time.Now().UnixNano())
	if err := cli.ImageTag(ctx, testImage(), remote); err != nil {
		t.Fatal(err)
	}
	push, err := cli.ImagePush(ctx, remote, image.PushOptions{RegistryAuth: base64.URLEncoding.EncodeToString([]byte("{}"))})
	if err != nil {
		t.Fatalf("push %s: %v", remote, err)
	}
	out, _ := io.ReadAll(push)
	push.Close()
	if bytes.Contains(out, []byte(`"error"`)) {
		t.Fatalf("push %s: %s", remote, out)
	}
	if _, err := cli.ImageRemove(ctx, remote, image.RemoveOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = cli.ImageRemove(context.WithoutCancel(ctx), remote, image.RemoveOptions{}) })

	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i := range errs {
		wg.Go(func() {
			spec := runtime.Spec{
				ID: fmt.Sprintf("pull-%d-%d", i, time.Now().UnixNano()), Image: remote, Limits: sandbox.DefaultLimits,
				SocketDir: t.TempDir(), Args: []string{"sleep", "30"},
			}
			if _, errs[i] = rt.Start(ctx, spec); errs[i] == nil {
				t.Cleanup(func() { _ = rt.Destroy(context.Background(), spec.ID) })
			}
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatalf("Start of a registry image: %v", err)
		}
	}
	if n := strings.Count(logs.String(), "image pulled"); n != 1 {
		t.Errorf("image pulled %d times over two starts, want once; logs:\n%s", n, logs.String())
	}

	for _, missing := range []string{reg + "/sandbox/never-pushed:1", "localhost/sandbox/never-built:1"} {
		_, err := rt.Start(ctx, runtime.Spec{
			ID: fmt.Sprintf("missing-%d", time.Now().UnixNano()), Image: missing, Limits: sandbox.DefaultLimits,
			SocketDir: t.TempDir(), Args: []string{"sleep", "1"},
		})
		if !errors.Is(err, sandbox.ErrFailedPrecondition) || !strings.Contains(err.Error(), missing) {
			t.Errorf("Start of %s: %v, want failed_precondition naming the image", missing, err)
		}
	}
}

package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/namespaces"

	"github.com/sandboxhq/sandbox/internal/testenv"
)

// TestTemplateFromRegistry: make images PUSH=host:port puts the template
// images in a registry (Debian's docker-registry on loopback here), a
// template whose image is the registry reference is created through the
// API, and its first session runs code: the agent pulled the image, which
// its containerd lacked under that name.
func TestTemplateFromRegistry(t *testing.T) {
	c := startCluster(t)
	reg := testenv.StartRegistry(t)

	// make images PUSH=..., for one template: build.sh with the executor
	// make images built the images with, so that its cache finds nothing
	// to rebuild and it only pushes.
	_, file, _, _ := runtime.Caller(0)
	root := filepath.Join(filepath.Dir(file), "..", "..")
	executor := filepath.Join(root, "bin", "sandbox-executor")
	if _, err := os.Stat(executor); err != nil {
		testenv.Unavailable(t, "%s is missing: run make images first", executor)
	}
	push := exec.Command(filepath.Join(root, "images", "build.sh"), executor, "python-basic")
	push.Env = append(os.Environ(), "PUSH="+reg, "CONTAINERD_ADDRESS="+c.containerd)
	out, err := push.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "pushed "+reg+"/sandbox/python-basic:latest") {
		t.Fatalf("images/build.sh with PUSH=%s: %v\n%s", reg, err, out)
	}
	image := reg + "/sandbox/python-basic:latest"
	t.Cleanup(func() { removeImage(t, image) })
	removeImage(t, image) // the push tagged it locally: make the agent pull it

	id := fmt.Sprintf("from-registry-%d", time.Now().UnixNano())
	if o, e, code := c.ctl("", "templates", "create", "--id", id, "--image", image, "--language", "python"); code != 0 {
		t.Fatalf("templates create: %d %s %s", code, o, e)
	}
	o, e, code := c.ctl("", "exec", "--template", id, "-c", "print(6*7)")
	if o != "42\n" || code != 0 {
		t.Fatalf("exec in a template pulled from the registry: stdout %q, exit %d, stderr %q", o, code, e)
	}
	logs, err := os.ReadFile(filepath.Join(c.dir, "agent.log"))
	must(t, err)
	if !strings.Contains(string(logs), `"msg":"image pulled","component":"containerd","image":"`+image+`"`) {
		t.Errorf("the agent's log says no pull of %s", image)
	}
}

// removeImage deletes an image name from containerd's sandbox namespace
// (its content stays, shared with the other names).
func removeImage(t *testing.T, name string) {
	t.Helper()
	cl, err := containerd.New(testenv.ContainerdAddress())
	must(t, err)
	defer cl.Close()
	ctx := namespaces.WithNamespace(context.Background(), "sandbox")
	if err := cl.ImageService().Delete(ctx, name); err != nil && !errdefs.IsNotFound(err) {
		t.Errorf("remove image %s: %v", name, err)
	}
}

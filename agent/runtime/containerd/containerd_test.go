package containerd_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	tasksapi "github.com/containerd/containerd/api/services/tasks/v1"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/images"
	"github.com/containerd/containerd/namespaces"
	"github.com/opencontainers/image-spec/identity"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/agent/runtime"
	"github.com/sandboxhq/sandbox/agent/runtime/containerd"
	"github.com/sandboxhq/sandbox/agent/runtime/runtimetest"
	"github.com/sandboxhq/sandbox/executor/executorapi"
	"github.com/sandboxhq/sandbox/internal/testenv"
)

const defaultTestImage = "localhost/sandbox/python-basic:latest"

// newRuntime connects to the test containerd and checks the test image is
// there; cfg's Address and Namespace are filled in.
func newRuntime(t testing.TB, cfg containerd.Config) (*containerd.Runtime, string) {
	t.Helper()
	cfg.Address = testenv.RequireContainerd(t)
	cfg.Namespace = "sandbox"
	image := os.Getenv("SANDBOX_TEST_IMAGE")
	if image == "" {
		image = defaultTestImage
	}
	ctx := context.Background()
	rt, err := containerd.New(ctx, cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { rt.Close() })
	if _, err := rt.Client().GetImage(namespaces.WithNamespace(ctx, rt.Namespace()), image); err != nil {
		if errdefs.IsNotFound(err) {
			testenv.Unavailable(t, "image %s is not in containerd namespace sandbox: run make images", image)
		}
		t.Fatalf("get image %s: %v", image, err)
	}
	return rt, image
}

func TestConformance(t *testing.T) {
	rt, image := newRuntime(t, containerd.Config{})
	runtimetest.Run(t, runtimetest.Harness{
		Runtime: rt,
		Image:   image,
		CgroupLimits: func(_ context.Context, id string) (runtimetest.CgroupLimits, error) {
			return runtimetest.ReadCgroupLimits(rt.CgroupPath(id))
		},
		Leftovers: func(ctx context.Context, id string) error { return leftovers(ctx, rt, id) },
		Reopen: func(t *testing.T) runtime.Runtime {
			again, _ := newRuntime(t, containerd.Config{})
			return again
		},
	})
}

// TestImageEntrypoint runs the image's own entrypoint, the executor, under
// the adapter's spec (read-only root, uid 1000, no capabilities, no network)
// and checks it serves /health on its socket in the socket directory.
func TestImageEntrypoint(t *testing.T) {
	rt, image := newRuntime(t, containerd.Config{})
	dir := t.TempDir()
	if err := os.Chown(dir, 1000, 1000); err != nil {
		t.Fatal(err)
	}
	spec := runtime.Spec{
		ID:        fmt.Sprintf("entrypoint-%d", time.Now().UnixNano()),
		Image:     image,
		Limits:    sandbox.DefaultLimits,
		SocketDir: dir,
		LogPath:   filepath.Join(t.TempDir(), "executor.log"),
	}
	if _, err := rt.Start(t.Context(), spec); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() {
		if err := rt.Destroy(context.Background(), spec.ID); err != nil {
			t.Errorf("Destroy: %v", err)
		}
	})
	exits, err := rt.Wait(t.Context(), spec.ID)
	if err != nil {
		t.Fatalf("Wait: %v", err)
	}
	sock := filepath.Join(dir, executorapi.ExecutorSocket)
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := client.Get("http://executor/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("GET /health: %s", resp.Status)
			}
			break
		}
		select {
		case res := <-exits:
			logs, _ := os.ReadFile(spec.LogPath)
			t.Fatalf("executor exited %d before serving /health; its log:\n%s", res.ExitCode, logs)
		default:
		}
		if time.Now().After(deadline) {
			logs, _ := os.ReadFile(spec.LogPath)
			t.Fatalf("executor did not serve /health on %s: %v; its log:\n%s", sock, err, logs)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := rt.Stop(t.Context(), spec.ID, 10*time.Second); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	select {
	case res := <-exits:
		t.Logf("executor exited %d after SIGTERM", res.ExitCode)
	case <-time.After(time.Minute):
		t.Fatal("no exit after Stop")
	}
}

// leftovers asks containerd itself (not the adapter) for the container, its
// task and its snapshot, and the kernel for its cgroups.
func leftovers(ctx context.Context, rt *containerd.Runtime, id string) error {
	ctx = namespaces.WithNamespace(ctx, rt.Namespace())
	c := rt.Client()
	var errs []error
	if _, err := c.ContainerService().Get(ctx, id); !errdefs.IsNotFound(err) {
		errs = append(errs, fmt.Errorf("container record still there (err %v)", err))
	}
	if _, err := c.TaskService().Get(ctx, &tasksapi.GetRequest{ContainerID: id}); !errdefs.IsNotFound(errdefs.FromGRPC(err)) {
		errs = append(errs, fmt.Errorf("task still there (err %v)", err))
	}
	if _, err := c.SnapshotService(containerd.DefaultConfig().Snapshotter).Stat(ctx, id); !errdefs.IsNotFound(err) {
		errs = append(errs, fmt.Errorf("snapshot still there (err %v)", err))
	}
	for _, ctrl := range []string{"memory", "cpu", "pids", "devices"} {
		dir := filepath.Join("/sys/fs/cgroup", ctrl, rt.CgroupPath(id))
		if _, err := os.Stat(dir); err == nil {
			errs = append(errs, fmt.Errorf("cgroup %s still there", dir))
		}
	}
	return errors.Join(errs...)
}

// TestUnpackOnce starts from an image that is not unpacked in the chosen
// snapshotter ("native", which nothing else here uses): the first Start
// unpacks it, the second does not.
func TestUnpackOnce(t *testing.T) {
	var logs syncBuffer
	rt, image := newRuntime(t, containerd.Config{
		Snapshotter: "native",
		Logger:      slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	ctx := namespaces.WithNamespace(t.Context(), rt.Namespace())
	img, err := rt.Client().GetImage(ctx, image)
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := img.IsUnpacked(ctx, "native"); err != nil || ok {
		t.Fatalf("image %s already unpacked in native (%v, %v): remove those snapshots first", image, ok, err)
	}
	t.Cleanup(func() { removeUnpacked(t, rt, image, "native") })
	startTwice(t, rt, image, "unpack")
	if n := strings.Count(logs.String(), "image unpacked"); n != 1 {
		t.Errorf("image unpacked %d times over two starts, want once; logs:\n%s", n, logs.String())
	}
}

// startTwice starts and destroys two containers of image, one after the other.
func startTwice(t *testing.T, rt *containerd.Runtime, image, prefix string) {
	t.Helper()
	for i := range 2 {
		spec := runtime.Spec{
			ID:        fmt.Sprintf("%s-%d-%d", prefix, i, time.Now().UnixNano()),
			Image:     image,
			Limits:    sandbox.DefaultLimits,
			SocketDir: t.TempDir(),
			Args:      []string{"sleep", "300"},
		}
		if _, err := rt.Start(t.Context(), spec); err != nil {
			t.Fatalf("Start %d of %s: %v", i, image, err)
		}
		if err := rt.Destroy(t.Context(), spec.ID); err != nil {
			t.Fatalf("Destroy %d: %v", i, err)
		}
	}
}

// removeUnpacked removes an image's unpacked snapshot chain from a snapshotter.
func removeUnpacked(t *testing.T, rt *containerd.Runtime, image, snapshotter string) {
	ctx := namespaces.WithNamespace(context.Background(), rt.Namespace())
	img, err := rt.Client().GetImage(ctx, image)
	if err != nil {
		t.Errorf("cleanup: %v", err)
		return
	}
	diffIDs, err := img.RootFS(ctx)
	if err != nil {
		t.Errorf("cleanup: %v", err)
		return
	}
	sn := rt.Client().SnapshotService(snapshotter)
	// Remove from the top of the chain down; each parent is then childless.
	for i := len(diffIDs); i > 0; i-- {
		key := identity.ChainID(diffIDs[:i]).String()
		if err := sn.Remove(ctx, key); err != nil && !errdefs.IsNotFound(err) {
			t.Errorf("cleanup: remove snapshot %s: %v", key, err)
		}
	}
}

// BenchmarkStart measures Start alone (Destroy runs with the timer
// stopped) and reports its median, e.g. go test -bench Start -benchtime 20x.
func BenchmarkStart(b *testing.B) {
	rt, image := newRuntime(b, containerd.Config{})
	dir := b.TempDir()
	if err := os.Chown(dir, 1000, 1000); err != nil {
		b.Fatal(err)
	}
	var starts, destroys []time.Duration
	i := 0
	for b.Loop() {
		i++
		spec := runtime.Spec{
			ID:        fmt.Sprintf("bench-%d-%d", i, time.Now().UnixNano()),
			Image:     image,
			Limits:    sandbox.DefaultLimits,
			SocketDir: dir,
			Args:      []string{"sleep", "300"},
		}
		begin := time.Now()
		if _, err := rt.Start(b.Context(), spec); err != nil {
			b.Fatalf("Start: %v", err)
		}
		starts = append(starts, time.Since(begin))
		b.StopTimer()
		begin = time.Now()
		if err := rt.Destroy(b.Context(), spec.ID); err != nil {
			b.Fatalf("Destroy: %v", err)
		}
		destroys = append(destroys, time.Since(begin))
		b.StartTimer()
	}
	b.ReportMetric(median(starts).Seconds()*1000, "start-p50-ms")
	b.ReportMetric(median(destroys).Seconds()*1000, "destroy-p50-ms")
}

func median(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

// syncBuffer is a bytes.Buffer safe for a logger and a test to share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestShimGroup checks that containers of one Group share one shim, and
// what a crash of that shim does: every container of the group exits, and
// each can then be destroyed without leftovers.
func TestShimGroup(t *testing.T) {
	rt, image := newRuntime(t, containerd.Config{})
	group := fmt.Sprintf("shimgroup-%d", time.Now().UnixNano())
	var specs []runtime.Spec
	var exits []<-chan runtime.ExitResult
	for i := range 3 {
		spec := runtime.Spec{
			ID:        fmt.Sprintf("%s-%d", group, i),
			Image:     image,
			Limits:    sandbox.DefaultLimits,
			SocketDir: t.TempDir(),
			Args:      []string{"sleep", "300"},
			Group:     group,
		}
		if i == 2 {
			spec.Group = "" // a container of its own, which the crash spares
		}
		if _, err := rt.Start(t.Context(), spec); err != nil {
			t.Fatalf("Start: %v", err)
		}
		t.Cleanup(func() {
			if err := rt.Destroy(context.Background(), spec.ID); err != nil {
				t.Errorf("Destroy %s: %v", spec.ID, err)
			}
		})
		ch, err := rt.Wait(t.Context(), spec.ID)
		if err != nil {
			t.Fatalf("Wait: %v", err)
		}
		specs = append(specs, spec)
		exits = append(exits, ch)
	}
	shims := make([]int, len(specs))
	for i, spec := range specs {
		st, err := rt.Inspect(t.Context(), spec.ID)
		if err != nil {
			t.Fatalf("Inspect: %v", err)
		}
		shims[i] = ppid(int(st.Pid))
		if !isShim(shims[i]) {
			t.Fatalf("parent %d of container %s is not a shim", shims[i], spec.ID)
		}
	}
	if shims[0] != shims[1] || shims[0] == shims[2] {
		t.Fatalf("shims %v, want the first two containers to share one and the third to have its own", shims)
	}

	if err := syscall.Kill(shims[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		select {
		case res := <-exits[i]:
			t.Logf("container %s of the killed shim's group exited: %+v", specs[i].ID, res)
		case <-time.After(time.Minute):
			t.Fatalf("container %s of the killed shim's group did not exit", specs[i].ID)
		}
		for _, id := range []string{specs[i].ID} {
			if st, err := rt.Inspect(t.Context(), id); err != nil || st.Running {
				t.Errorf("Inspect %s after its shim died = %+v, %v; want not running", id, st, err)
			}
		}
	}
	if st, err := rt.Inspect(t.Context(), specs[2].ID); err != nil || !st.Running {
		t.Errorf("Inspect %s (own shim) = %+v, %v; want running", specs[2].ID, st, err)
	}
	// containerd cleans up after a dead shim (runc delete --force: the
	// processes are killed, the cgroups go) in the background, so what is
	// left after Destroy goes soon after.
	begin := time.Now()
	for _, spec := range specs[:2] {
		if err := rt.Destroy(t.Context(), spec.ID); err != nil {
			t.Fatalf("Destroy %s: %v", spec.ID, err)
		}
		deadline := time.Now().Add(30 * time.Second)
		for {
			err := leftovers(t.Context(), rt, spec.ID)
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("after Destroy: %v", err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	t.Logf("nothing left of the killed shim's containers %s after their exit", time.Since(begin))
}

// TestImageChange re-points an image name at another image: Start follows
// the name to the new image without a restart, though it no longer looks
// the image up at every start.
func TestImageChange(t *testing.T) {
	rt, image := newRuntime(t, containerd.Config{})
	ctx := namespaces.WithNamespace(t.Context(), rt.Namespace())
	store := rt.Client().ImageService()
	chains := map[string]string{}
	targets := map[string]images.Image{}
	for _, name := range []string{image, "localhost/sandbox/base:latest"} {
		img, err := rt.Client().GetImage(ctx, name)
		if errdefs.IsNotFound(err) {
			testenv.Unavailable(t, "image %s is not in containerd namespace sandbox: run make images", name)
		}
		if err != nil {
			t.Fatal(err)
		}
		diffIDs, err := img.RootFS(ctx)
		if err != nil {
			t.Fatal(err)
		}
		chains[name] = identity.ChainID(diffIDs).String()
		targets[name] = img.Metadata()
	}
	alias := fmt.Sprintf("localhost/sandbox/runtimetest-alias-%d:latest", time.Now().UnixNano())
	pointAt := func(name string) {
		rec := targets[name]
		rec.Name = alias
		if _, err := store.Update(ctx, rec); errdefs.IsNotFound(err) {
			_, err = store.Create(ctx, rec)
			if err != nil {
				t.Fatal(err)
			}
		} else if err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		if err := store.Delete(namespaces.WithNamespace(context.Background(), rt.Namespace()), alias); err != nil {
			t.Errorf("delete image %s: %v", alias, err)
		}
	})
	// parent starts a container of alias and returns the snapshot its root
	// view was made from.
	i := 0
	parent := func() string {
		t.Helper()
		i++
		spec := runtime.Spec{
			ID:        fmt.Sprintf("alias-%d-%d", i, time.Now().UnixNano()),
			Image:     alias,
			Limits:    sandbox.DefaultLimits,
			SocketDir: t.TempDir(),
			Args:      []string{"sleep", "300"},
		}
		if _, err := rt.Start(t.Context(), spec); err != nil {
			t.Fatalf("Start: %v", err)
		}
		defer func() {
			if err := rt.Destroy(context.Background(), spec.ID); err != nil {
				t.Errorf("Destroy: %v", err)
			}
		}()
		info, err := rt.Client().SnapshotService(containerd.DefaultConfig().Snapshotter).Stat(ctx, spec.ID)
		if err != nil {
			t.Fatal(err)
		}
		return info.Parent
	}

	pointAt(image)
	if got := parent(); got != chains[image] {
		t.Fatalf("root made from %s, want %s's %s", got, image, chains[image])
	}
	pointAt("localhost/sandbox/base:latest")
	// containerd reports the change as an event, a moment after Update.
	deadline := time.Now().Add(10 * time.Second)
	for got := parent(); got != chains["localhost/sandbox/base:latest"]; got = parent() {
		if time.Now().After(deadline) {
			t.Fatalf("root still made from %s after the name moved to the base image", got)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("the moved name was followed by start %d after the move", i-1)
}

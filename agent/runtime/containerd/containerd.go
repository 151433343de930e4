// Package containerd is the agent's runtime adapter for containerd. It talks
// to containerd directly (no CRI plugin) and builds each container's OCI
// spec itself (see ociSpec), so the sandbox's isolation is written down in
// this package rather than inherited from defaults.
//
// Each container's root is a read-only view of the image's unpacked
// snapshot, so images must contain the mount points the spec uses:
// /workspace, /tmp, /run/sandbox, /proc, /dev and /sys.
package containerd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/containerd"
	tasksapi "github.com/containerd/containerd/api/services/tasks/v1"
	tasktypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/cio"
	"github.com/containerd/containerd/containers"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/namespaces"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/agent/runtime"
)

// Config configures the adapter.
type Config struct {
	// Address is containerd's socket.
	Address string
	// Namespace is the containerd namespace holding images and containers.
	Namespace string
	// Snapshotter unpacks images and holds the containers' root views.
	Snapshotter string
	// RuntimeName is the containerd shim that runs the containers.
	RuntimeName string
	// CgroupParent is the cgroup under which each container gets <parent>/<id>.
	CgroupParent string
	// TmpMiB is the size of each container's /tmp tmpfs.
	TmpMiB int64
	// Logger receives one line per container event; nil means slog.Default().
	Logger *slog.Logger
}

// DefaultConfig is the configuration of a standard agent host.
func DefaultConfig() Config {
	return Config{
		Address:      "/run/containerd/containerd.sock",
		Namespace:    "sandbox",
		Snapshotter:  "overlayfs",
		RuntimeName:  "io.containerd.runc.v2",
		CgroupParent: "/sandbox",
		TmpMiB:       128,
	}
}

// Runtime runs sandbox containers on containerd. It is safe for concurrent use.
type Runtime struct {
	cfg    Config
	client *containerd.Client
	log    *slog.Logger

	// unpackMu serialises the rare cache misses, so an image is unpacked once
	// even when many containers of it start together.
	unpackMu sync.Mutex
	mu       sync.Mutex
	images   map[string]cachedImage // by image name
}

// cachedImage is an image known to be unpacked in the snapshotter.
type cachedImage struct {
	target  digest.Digest // manifest (or index) digest the name pointed at
	chainID string        // the unpacked snapshot the views are made from
	info    imageInfo
}

var _ runtime.Runtime = (*Runtime)(nil)

// New connects to containerd. Zero fields of cfg take DefaultConfig's values.
func New(ctx context.Context, cfg Config) (*Runtime, error) {
	def := DefaultConfig()
	if cfg.Address == "" {
		cfg.Address = def.Address
	}
	if cfg.Namespace == "" {
		cfg.Namespace = def.Namespace
	}
	if cfg.Snapshotter == "" {
		cfg.Snapshotter = def.Snapshotter
	}
	if cfg.RuntimeName == "" {
		cfg.RuntimeName = def.RuntimeName
	}
	if cfg.CgroupParent == "" {
		cfg.CgroupParent = def.CgroupParent
	}
	if cfg.TmpMiB <= 0 {
		cfg.TmpMiB = def.TmpMiB
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	client, err := containerd.New(cfg.Address,
		containerd.WithDefaultNamespace(cfg.Namespace),
		containerd.WithDefaultRuntime(cfg.RuntimeName),
		containerd.WithTimeout(10*time.Second))
	if err != nil {
		return nil, fmt.Errorf("connect to containerd at %s: %w", cfg.Address, err)
	}
	// Fail now, not at the first Start, when containerd does not answer.
	if _, err := client.Version(ctx); err != nil {
		client.Close()
		return nil, fmt.Errorf("containerd at %s: %w", cfg.Address, err)
	}
	return &Runtime{cfg: cfg, client: client, log: log, images: map[string]cachedImage{}}, nil
}

// Close releases the connection to containerd; containers keep running.
func (r *Runtime) Close() error { return r.client.Close() }

// Client is the underlying containerd client, for tests and diagnostics.
func (r *Runtime) Client() *containerd.Client { return r.client }

// Namespace is the containerd namespace the adapter works in.
func (r *Runtime) Namespace() string { return r.cfg.Namespace }

// CgroupPath is the cgroup path (relative to each controller's root) of a
// container the adapter started.
func (r *Runtime) CgroupPath(id string) string { return r.cfg.CgroupParent + "/" + id }

func (r *Runtime) ns(ctx context.Context) context.Context {
	return namespaces.WithNamespace(ctx, r.cfg.Namespace)
}

// cleanupCtx outlives a cancelled caller so that undoing a half-made start
// or a destroy is not cut short.
func cleanupCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
}

// mapErr turns containerd's not-found into runtime.ErrNotFound.
func mapErr(id string, op string, err error) error {
	if errdefs.IsNotFound(err) {
		return fmt.Errorf("%s container %s: %w (%v)", op, id, runtime.ErrNotFound, err)
	}
	return fmt.Errorf("%s container %s: %w", op, id, err)
}

// errParentMissing marks a view whose image snapshot has disappeared since
// it was cached (e.g. pruned); Start then unpacks again once.
var errParentMissing = errors.New("image snapshot missing")

// Start creates the container and its task and starts it. On any error it
// deletes whatever it made, and leaves alone a container that already
// existed under the same id.
func (r *Runtime) Start(ctx context.Context, spec runtime.Spec) (runtime.Status, error) {
	begin := time.Now()
	if err := validateSpec(spec); err != nil {
		return runtime.Status{}, err
	}
	ctx = r.ns(ctx)
	img, err := r.image(ctx, spec.Image)
	if err != nil {
		return runtime.Status{}, fmt.Errorf("start container %s: %w", spec.ID, err)
	}
	c, err := r.create(ctx, spec, img)
	if errors.Is(err, errParentMissing) {
		r.forget(spec.Image)
		if img, err = r.image(ctx, spec.Image); err != nil {
			return runtime.Status{}, fmt.Errorf("start container %s: %w", spec.ID, err)
		}
		c, err = r.create(ctx, spec, img)
	}
	if err != nil {
		return runtime.Status{}, err
	}

	task, err := r.startTask(ctx, spec, c)
	if err != nil {
		cctx, cancel := cleanupCtx(ctx)
		defer cancel()
		if derr := c.Delete(cctx, containerd.WithSnapshotCleanup); derr != nil && !errdefs.IsNotFound(derr) {
			r.log.Error("cannot delete container after failed start", "container", spec.ID, "err", derr)
		}
		return runtime.Status{}, err
	}
	info, err := c.Info(ctx, containerd.WithoutRefreshedMetadata)
	if err != nil {
		return runtime.Status{}, fmt.Errorf("start container %s: %w", spec.ID, err)
	}
	r.log.Debug("container started", "container", spec.ID, "image", spec.Image, "pid", task.Pid(), "duration", time.Since(begin))
	return runtime.Status{
		ID:        spec.ID,
		Labels:    info.Labels,
		Running:   true,
		Pid:       task.Pid(),
		CreatedAt: info.CreatedAt,
	}, nil
}

// create makes the container record and its read-only root view.
func (r *Runtime) create(ctx context.Context, spec runtime.Spec, img cachedImage) (containerd.Container, error) {
	viewMade := false
	view := func(ctx context.Context, client *containerd.Client, c *containers.Container) error {
		// NewContainer holds a lease around its options, so the view cannot
		// be collected before the container record refers to it.
		if _, err := client.SnapshotService(r.cfg.Snapshotter).View(ctx, spec.ID, img.chainID); err != nil {
			if errdefs.IsNotFound(err) {
				return fmt.Errorf("%w: %s: %w", errParentMissing, img.chainID, err)
			}
			return fmt.Errorf("snapshot view: %w", err)
		}
		viewMade = true
		c.Snapshotter = r.cfg.Snapshotter
		c.SnapshotKey = spec.ID
		c.Image = spec.Image
		return nil
	}
	c, err := r.client.NewContainer(ctx, spec.ID,
		view,
		containerd.WithSpec(ociSpec(spec, img.info, r.cfg.CgroupParent, r.cfg.TmpMiB)),
		containerd.WithContainerLabels(spec.Labels),
		containerd.WithRuntime(r.cfg.RuntimeName, nil),
	)
	if err != nil {
		if viewMade {
			cctx, cancel := cleanupCtx(ctx)
			defer cancel()
			if rerr := r.client.SnapshotService(r.cfg.Snapshotter).Remove(cctx, spec.ID); rerr != nil && !errdefs.IsNotFound(rerr) {
				r.log.Error("cannot remove snapshot after failed create", "container", spec.ID, "err", rerr)
			}
		}
		if errdefs.IsAlreadyExists(err) {
			return nil, fmt.Errorf("create container %s: %w (%v)", spec.ID, sandbox.ErrAlreadyExists, err)
		}
		return nil, fmt.Errorf("create container %s: %w", spec.ID, err)
	}
	return c, nil
}

// startTask creates and starts the container's task; on error it deletes
// the task it made.
func (r *Runtime) startTask(ctx context.Context, spec runtime.Spec, c containerd.Container) (containerd.Task, error) {
	// The shim writes stdout/stderr to the file itself (or to /dev/null):
	// no pipe runs through the agent, so none can fill up and block.
	ioc := cio.NullIO
	if spec.LogPath != "" {
		ioc = cio.LogFile(spec.LogPath)
	}
	task, err := c.NewTask(ctx, ioc)
	if err != nil {
		return nil, fmt.Errorf("create task of container %s: %w", spec.ID, err)
	}
	if err := task.Start(ctx); err != nil {
		cctx, cancel := cleanupCtx(ctx)
		defer cancel()
		if _, derr := task.Delete(cctx, containerd.WithProcessKill); derr != nil && !errdefs.IsNotFound(derr) {
			r.log.Error("cannot delete task after failed start", "container", spec.ID, "err", derr)
		}
		return nil, fmt.Errorf("start task of container %s: %w", spec.ID, err)
	}
	return task, nil
}

// image returns the unpacked image, unpacking it on first use. The cache is
// keyed by name and checked against the digest the name points at now, so
// a rebuilt image is picked up.
func (r *Runtime) image(ctx context.Context, name string) (cachedImage, error) {
	img, err := r.client.GetImage(ctx, name)
	if err != nil {
		if errdefs.IsNotFound(err) {
			return cachedImage{}, fmt.Errorf("%w: image %s is not in containerd namespace %s", sandbox.ErrFailedPrecondition, name, r.cfg.Namespace)
		}
		return cachedImage{}, fmt.Errorf("get image %s: %w", name, err)
	}
	target := img.Target().Digest
	r.mu.Lock()
	ci, ok := r.images[name]
	r.mu.Unlock()
	if ok && ci.target == target {
		return ci, nil
	}

	r.unpackMu.Lock()
	defer r.unpackMu.Unlock()
	r.mu.Lock()
	ci, ok = r.images[name]
	r.mu.Unlock()
	if ok && ci.target == target {
		return ci, nil
	}
	unpacked, err := img.IsUnpacked(ctx, r.cfg.Snapshotter)
	if err != nil {
		return cachedImage{}, fmt.Errorf("check image %s is unpacked: %w", name, err)
	}
	if !unpacked {
		begin := time.Now()
		if err := img.Unpack(ctx, r.cfg.Snapshotter); err != nil {
			return cachedImage{}, fmt.Errorf("unpack image %s: %w", name, err)
		}
		r.log.Info("image unpacked", "image", name, "digest", target, "duration", time.Since(begin))
	}
	diffIDs, err := img.RootFS(ctx)
	if err != nil {
		return cachedImage{}, fmt.Errorf("read layers of image %s: %w", name, err)
	}
	conf, err := img.Spec(ctx)
	if err != nil {
		return cachedImage{}, fmt.Errorf("read config of image %s: %w", name, err)
	}
	info := imageInfo{pathEnv: defaultPath}
	info.args = append(append([]string(nil), conf.Config.Entrypoint...), conf.Config.Cmd...)
	for _, e := range conf.Config.Env {
		if strings.HasPrefix(e, "PATH=") {
			info.pathEnv = e
		}
	}
	ci = cachedImage{target: target, chainID: identity.ChainID(diffIDs).String(), info: info}
	r.mu.Lock()
	r.images[name] = ci
	r.mu.Unlock()
	return ci, nil
}

func (r *Runtime) forget(name string) {
	r.mu.Lock()
	delete(r.images, name)
	r.mu.Unlock()
}

// task loads a container's task; a missing container or task is ErrNotFound.
func (r *Runtime) task(ctx context.Context, op, id string) (containerd.Task, error) {
	c, err := r.client.LoadContainer(ctx, id)
	if err != nil {
		return nil, mapErr(id, op, err)
	}
	t, err := c.Task(ctx, nil)
	if err != nil {
		return nil, mapErr(id, op, err)
	}
	return t, nil
}

// Wait returns a channel that receives the task's exit once. The channel is
// bound to ctx: cancelling it delivers an ExitResult carrying ctx's error.
func (r *Runtime) Wait(ctx context.Context, id string) (<-chan runtime.ExitResult, error) {
	ctx = r.ns(ctx)
	t, err := r.task(ctx, "wait for", id)
	if err != nil {
		return nil, err
	}
	exits, err := t.Wait(ctx)
	if err != nil {
		return nil, mapErr(id, "wait for", err)
	}
	out := make(chan runtime.ExitResult, 1)
	// Ends when containerd's channel delivers: at the exit, or when ctx ends.
	go func() {
		defer close(out)
		st, ok := <-exits
		if !ok {
			out <- runtime.ExitResult{ExitCode: int(containerd.UnknownExitStatus), Err: fmt.Errorf("wait for container %s: channel closed", id)}
			return
		}
		code, _, err := st.Result()
		if err != nil {
			err = fmt.Errorf("wait for container %s: %w", id, err)
		}
		out <- runtime.ExitResult{ExitCode: int(code), Err: err}
	}()
	return out, nil
}

// Stop sends SIGTERM to the container's init process and SIGKILL to every
// process in it when it has not exited after timeout. It returns once the
// task has exited. Stopping a stopped container is not an error.
func (r *Runtime) Stop(ctx context.Context, id string, timeout time.Duration) error {
	ctx = r.ns(ctx)
	t, err := r.task(ctx, "stop", id)
	if err != nil {
		return err
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Wait before Kill, so the exit cannot slip between the two.
	exits, err := t.Wait(wctx)
	if err != nil {
		return mapErr(id, "stop", err)
	}
	if err := t.Kill(ctx, syscall.SIGTERM); err != nil && !finished(err) {
		return mapErr(id, "stop", err)
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-exits:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("stop container %s: %w", id, ctx.Err())
	case <-timer.C:
	}
	r.log.Info("container ignored SIGTERM, killing it", "container", id, "timeout", timeout)
	if err := t.Kill(ctx, syscall.SIGKILL, containerd.WithKillAll); err != nil && !finished(err) {
		return mapErr(id, "kill", err)
	}
	select {
	case <-exits:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("kill container %s: %w", id, ctx.Err())
	}
}

// finished reports a Kill error that means the process has already exited.
func finished(err error) bool {
	return errdefs.IsNotFound(err) || errdefs.IsFailedPrecondition(err)
}

// Destroy kills the task, deletes it, and deletes the container with its
// snapshot. An unknown id is not an error, so a Destroy cut short (by ctx or
// a failure) can simply be called again.
func (r *Runtime) Destroy(ctx context.Context, id string) error {
	ctx = r.ns(ctx)
	c, err := r.client.LoadContainer(ctx, id)
	if errdefs.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("destroy container %s: %w", id, err)
	}
	t, err := c.Task(ctx, nil)
	switch {
	case err == nil:
		if _, err := t.Delete(ctx, containerd.WithProcessKill); err != nil && !errdefs.IsNotFound(err) {
			return fmt.Errorf("destroy container %s: delete task: %w", id, err)
		}
	case !errdefs.IsNotFound(err):
		return fmt.Errorf("destroy container %s: load task: %w", id, err)
	}
	if err := c.Delete(ctx, containerd.WithSnapshotCleanup); err != nil && !errdefs.IsNotFound(err) {
		return fmt.Errorf("destroy container %s: %w", id, err)
	}
	r.log.Debug("container destroyed", "container", id)
	return nil
}

// Inspect reports a container's labels and its task's state.
func (r *Runtime) Inspect(ctx context.Context, id string) (runtime.Status, error) {
	ctx = r.ns(ctx)
	c, err := r.client.ContainerService().Get(ctx, id)
	if err != nil {
		return runtime.Status{}, mapErr(id, "inspect", err)
	}
	st := status(c)
	resp, err := r.client.TaskService().Get(ctx, &tasksapi.GetRequest{ContainerID: id})
	if err != nil {
		if err := errdefs.FromGRPC(err); !errdefs.IsNotFound(err) {
			return runtime.Status{}, mapErr(id, "inspect task of", err)
		}
		return st, nil
	}
	addProcess(&st, resp.GetProcess().GetPid(), resp.GetProcess().GetStatus(), resp.GetProcess().GetExitStatus())
	return st, nil
}

// List returns the containers carrying every label in match, with their
// tasks' state, in two calls to containerd however many there are.
func (r *Runtime) List(ctx context.Context, match map[string]string) ([]runtime.Status, error) {
	ctx = r.ns(ctx)
	var filters []string
	if len(match) > 0 {
		// Comma-separated conditions in one filter must all hold.
		conds := make([]string, 0, len(match))
		for k, v := range match {
			conds = append(conds, "labels."+strconv.Quote(k)+"=="+strconv.Quote(v))
		}
		filters = []string{strings.Join(conds, ",")}
	}
	cs, err := r.client.ContainerService().List(ctx, filters...)
	if err != nil {
		return nil, fmt.Errorf("list containers: %w", err)
	}
	resp, err := r.client.TaskService().List(ctx, &tasksapi.ListTasksRequest{})
	if err != nil {
		return nil, fmt.Errorf("list tasks: %w", errdefs.FromGRPC(err))
	}
	byID := make(map[string]int, len(resp.GetTasks()))
	for i, t := range resp.GetTasks() {
		byID[t.GetID()] = i
	}
	out := make([]runtime.Status, 0, len(cs))
	for _, c := range cs {
		st := status(c)
		if i, ok := byID[c.ID]; ok {
			t := resp.GetTasks()[i]
			addProcess(&st, t.GetPid(), t.GetStatus(), t.GetExitStatus())
		}
		out = append(out, st)
	}
	return out, nil
}

func status(c containers.Container) runtime.Status {
	return runtime.Status{ID: c.ID, Labels: c.Labels, CreatedAt: c.CreatedAt}
}

func addProcess(st *runtime.Status, pid uint32, s tasktypes.Status, exit uint32) {
	st.Pid = pid
	switch s {
	case tasktypes.Status_RUNNING, tasktypes.Status_PAUSED, tasktypes.Status_PAUSING:
		st.Running = true
	case tasktypes.Status_STOPPED:
		st.ExitCode = int(exit)
	}
}

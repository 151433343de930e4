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
	"github.com/containerd/containerd/api/types"
	tasktypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/cio"
	"github.com/containerd/containerd/containers"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/typeurl/v2"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/agent/runtime"
	"github.com/sandboxhq/sandbox/agent/runtime/isolation"
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
	// PlainHTTPRegistries are registry hosts (host or host:port) pulled from
	// over plain HTTP; loopback registries always are. Others use HTTPS.
	PlainHTTPRegistries []string
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
		TmpMiB:       isolation.DefaultTmpMiB,
	}
}

// Runtime runs sandbox containers on containerd. It is safe for concurrent use.
type Runtime struct {
	cfg     Config
	client  *containerd.Client
	log     *slog.Logger
	images  imageCache
	cgroups cgroupLimits
	// limits holds the limits (sandbox.Limits) of the containers this
	// Runtime started or updated, by id, so that Update checks the disk
	// size without asking containerd for the container's record (a claim's
	// latency) and writes only the cgroup files whose values change;
	// others are looked up.
	limits sync.Map
	// stopWatch ends the image watch; watchDone is closed when it has.
	stopWatch context.CancelFunc
	watchDone chan struct{}
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
	cgroups, err := detectCgroups()
	if err != nil {
		client.Close()
		return nil, err
	}
	r := &Runtime{cfg: cfg, client: client, log: log, cgroups: cgroups, images: imageCache{byName: map[string]cachedImage{}}, watchDone: make(chan struct{})}
	var watchCtx context.Context
	watchCtx, r.stopWatch = context.WithCancel(context.Background())
	go r.watchImages(watchCtx)
	return r, nil
}

// Close releases the connection to containerd; containers keep running.
func (r *Runtime) Close() error {
	r.stopWatch()
	<-r.watchDone
	return r.client.Close()
}

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
//
// It talks to containerd's services directly rather than through the
// client's NewContainer and NewTask, which look up again what Start already
// holds (the container record, its spec, its root's mounts) and take a lease
// that the order below makes needless: five round trips and two metadata
// writes of a ~50 ms start. What is left is the floor: runc create and start
// (about 30 of those ms), the shim, the root view and the container record.
func (r *Runtime) Start(ctx context.Context, spec runtime.Spec) (runtime.Status, error) {
	begin := time.Now()
	if err := isolation.ValidateSpec(spec); err != nil {
		return runtime.Status{}, err
	}
	ctx = r.ns(ctx)
	img, err := r.image(ctx, spec.Image)
	if err != nil {
		return runtime.Status{}, fmt.Errorf("start container %s: %w", spec.ID, err)
	}
	rec, err := r.create(ctx, spec, img)
	if err != nil {
		return runtime.Status{}, err
	}
	mounts, err := r.view(ctx, spec.ID, img)
	if errors.Is(err, errParentMissing) {
		r.images.forget(spec.Image)
		if img, err = r.image(ctx, spec.Image); err == nil {
			mounts, err = r.view(ctx, spec.ID, img)
		}
	}
	made := time.Now()
	if err == nil {
		err = r.createTask(ctx, spec, mounts)
	}
	created := time.Now()
	var pid uint32
	if err == nil {
		pid, err = r.startTask(ctx, spec.ID)
	}
	if err != nil {
		cctx, cancel := cleanupCtx(ctx)
		defer cancel()
		if derr := r.Destroy(cctx, spec.ID); derr != nil {
			r.log.Error("cannot remove container after failed start", "container", spec.ID, "err", derr)
		}
		return runtime.Status{}, fmt.Errorf("start container %s: %w", spec.ID, err)
	}
	// Where a cold start's time goes: the record and root view, the task's
	// creation (shim, runc create) and its start (runc start).
	r.log.Debug("container started", "container", spec.ID, "image", spec.Image, "pid", pid, "duration", time.Since(begin),
		"root", made.Sub(begin), "task_create", created.Sub(made), "task_start", time.Since(created))
	r.limits.Store(spec.ID, spec.Limits)
	return runtime.Status{
		ID:        spec.ID,
		Labels:    rec.Labels,
		Running:   true,
		Pid:       pid,
		CreatedAt: rec.CreatedAt,
	}, nil
}

// create writes the container record, naming the snapshot key of the root
// view it does not have yet. Record first, view second: once the record
// names the key, containerd's garbage collector keeps the view, so no lease
// has to hold it in between.
func (r *Runtime) create(ctx context.Context, spec runtime.Spec, img cachedImage) (containers.Container, error) {
	ociAny, err := typeurl.MarshalAny(ociSpec(spec, img.info, r.cfg.CgroupParent, r.cfg.TmpMiB))
	if err != nil {
		return containers.Container{}, fmt.Errorf("create container %s: encode spec: %w", spec.ID, err)
	}
	rec, err := r.client.ContainerService().Create(ctx, containers.Container{
		ID:          spec.ID,
		Labels:      spec.Labels,
		Image:       spec.Image,
		Runtime:     containers.RuntimeInfo{Name: r.cfg.RuntimeName},
		Spec:        ociAny,
		Snapshotter: r.cfg.Snapshotter,
		SnapshotKey: spec.ID,
	})
	if errdefs.IsAlreadyExists(err) {
		return containers.Container{}, fmt.Errorf("create container %s: %w (%v)", spec.ID, sandbox.ErrAlreadyExists, err)
	}
	if err != nil {
		return containers.Container{}, fmt.Errorf("create container %s: %w", spec.ID, err)
	}
	return rec, nil
}

// view makes the container's read-only root from the image's snapshot and
// returns its mounts.
func (r *Runtime) view(ctx context.Context, id string, img cachedImage) ([]mount.Mount, error) {
	mounts, err := r.client.SnapshotService(r.cfg.Snapshotter).View(ctx, id, img.chainID)
	if errdefs.IsNotFound(err) {
		return nil, fmt.Errorf("%w: %s: %w", errParentMissing, img.chainID, err)
	}
	if err != nil {
		return nil, fmt.Errorf("snapshot view: %w", err)
	}
	return mounts, nil
}

// createTask creates the container's task on the given root: the shim
// starts (or, for a Group, is reused) and runc creates the container. The
// shim writes stdout and stderr to spec.LogPath itself (or discards them):
// no pipe runs through the agent, so none can fill up and block.
func (r *Runtime) createTask(ctx context.Context, spec runtime.Spec, mounts []mount.Mount) error {
	req := &tasksapi.CreateTaskRequest{ContainerID: spec.ID, Rootfs: make([]*types.Mount, 0, len(mounts))}
	for _, m := range mounts {
		req.Rootfs = append(req.Rootfs, &types.Mount{Type: m.Type, Source: m.Source, Target: m.Target, Options: m.Options})
	}
	if spec.LogPath != "" {
		uri, err := cio.LogURIGenerator("file", spec.LogPath, nil)
		if err != nil {
			return fmt.Errorf("log path: %w", err)
		}
		req.Stdout, req.Stderr = uri.String(), uri.String()
	}
	if _, err := r.client.TaskService().Create(ctx, req); err != nil {
		return fmt.Errorf("create task: %w", errdefs.FromGRPC(err))
	}
	return nil
}

// startTask starts a created task and returns its pid.
func (r *Runtime) startTask(ctx context.Context, id string) (uint32, error) {
	resp, err := r.client.TaskService().Start(ctx, &tasksapi.StartRequest{ContainerID: id})
	if err != nil {
		return 0, fmt.Errorf("start task: %w", errdefs.FromGRPC(err))
	}
	return resp.GetPid(), nil
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

// Update applies u to a running container: first cpu, memory (without
// swap) and pids on its cgroup, then the labels on its record, so that a
// container carrying a session's label has that session's limits. Limits
// are checked against the container's record before anything changes: the
// disk size must be the one it was created with. A container whose task is
// not running cannot take limits: sandbox.ErrFailedPrecondition.
func (r *Runtime) Update(ctx context.Context, id string, u runtime.Update) error {
	ctx = r.ns(ctx)
	if u.Limits != nil {
		if l := *u.Limits; l.CPUMillis <= 0 || l.MemoryMiB <= 0 || l.Pids <= 0 {
			return fmt.Errorf("%w: update container %s: cpu, memory and pids limits must be positive, got %+v", sandbox.ErrInvalidArgument, id, l)
		}
	}
	if u.Limits != nil {
		// A container this Runtime started is known with its disk size;
		// any other's record proves id names a container before id
		// becomes part of a cgroup path, and holds its disk size.
		var prev *sandbox.Limits
		var disk int64
		if v, known := r.limits.Load(id); known {
			l := v.(sandbox.Limits)
			prev, disk = &l, l.DiskMiB
		} else {
			rec, err := r.client.ContainerService().Get(ctx, id)
			if err != nil {
				return mapErr(id, "update", err)
			}
			if disk, err = workspaceMiB(rec); err != nil {
				return fmt.Errorf("update container %s: %w", id, err)
			}
		}
		if err := r.updateLimits(id, disk, prev, *u.Limits); err != nil {
			// What the cgroup holds now is not known for sure.
			r.limits.Delete(id)
			return err
		}
		r.limits.Store(id, *u.Limits)
	}
	if len(u.Labels) == 0 {
		return nil
	}
	// Only the given label keys are written; the others stay.
	paths := make([]string, 0, len(u.Labels))
	for k := range u.Labels {
		paths = append(paths, "labels."+k)
	}
	if _, err := r.client.ContainerService().Update(ctx, containers.Container{ID: id, Labels: u.Labels}, paths...); err != nil {
		return mapErr(id, "update labels of", err)
	}
	return nil
}

// updateLimits checks l against the container's spec and writes it to the
// container's cgroup; prev, when known, is what the cgroup holds.
func (r *Runtime) updateLimits(id string, disk int64, prev *sandbox.Limits, l sandbox.Limits) error {
	if err := isolation.ValidateUpdate(id, l, disk); err != nil {
		return err
	}
	if err := r.cgroups.set(r.CgroupPath(id), prev, l); err != nil {
		return fmt.Errorf("update limits of container %s: %w", id, err)
	}
	return nil
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
	r.limits.Delete(id)
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

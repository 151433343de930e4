// Package docker is the agent's runtime adapter for hosts that run Docker
// rather than containerd directly (`sandbox-agent --runtime docker`). It
// drives dockerd through the Docker Engine API and gives each sandbox the
// isolation the containerd adapter gives (package isolation): uid 1000 with
// no capabilities and no_new_privs, the same seccomp profile, no network, a
// read-only root, size- and inode-limited tmpfs /workspace and /tmp, cpu,
// memory (no swap) and pids limits, rlimits, and the executor reached on a
// unix socket in a bound-in host directory.
//
// Where Docker differs, and what the adapter does about it:
//   - Docker cannot change a container's labels after it is created, and a
//     claimed warm container gets its session's label. Labels given to
//     Update are kept in a small file per container under Config.StateDir
//     and merged into what Inspect and List report, so a restarted agent
//     (a new Runtime on the same StateDir) sees them too.
//   - Docker's bind mounts take no nosuid, nodev or noexec. A new bind mount
//     keeps the flags of the mount it copies, so Start first binds the socket
//     directory onto itself with those flags and Docker binds that mount;
//     Destroy unmounts it.
//   - Docker writes a container's output to its own log. With Spec.LogPath
//     set, the adapter follows that log into the file while the container
//     runs (until it exits or this Runtime is closed; a restarted agent does
//     not resume following: `docker logs` still has the output).
//   - Docker's default /proc masks are lifted (systempaths=unconfined), as on
//     containerd: bubblewrap cannot mount a fresh /proc for user code under
//     them, and uid 1000 without capabilities cannot use what they guard.
//     AppArmor is off for the same reason (docker-default forbids mount).
//   - Spec.Group is ignored: dockerd supervises each container with its own
//     shim.
package docker

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	cerrdefs "github.com/containerd/errdefs"
	"github.com/docker/docker/api/types/container"
	"github.com/docker/docker/api/types/filters"
	"github.com/docker/docker/api/types/mount"
	"github.com/docker/docker/client"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/agent/runtime"
	"github.com/sandboxhq/sandbox/agent/runtime/isolation"
	"github.com/sandboxhq/sandbox/executor/executorapi"
)

// LabelRuntime marks every container this adapter starts, so that List
// looks at sandbox containers only, never at the host's other containers.
const LabelRuntime = "sandbox.runtime"

const runtimeName = "docker"

// Config configures the adapter.
type Config struct {
	// Host is dockerd's address (unix:///var/run/docker.sock); empty takes
	// DOCKER_HOST from the environment, then Docker's default.
	Host string
	// StateDir holds the labels added to containers after their creation.
	// Required; keep it across agent restarts (the agent uses a directory
	// of its data dir).
	StateDir string
	// TmpMiB is the size of each container's /tmp tmpfs.
	TmpMiB int64
	// CgroupParent is the cgroup parent of the containers; empty is
	// Docker's default (/docker).
	CgroupParent string
	// Logger receives one line per notable event; nil means slog.Default().
	Logger *slog.Logger
}

// Runtime runs sandbox containers on Docker. It is safe for concurrent use.
type Runtime struct {
	cfg     Config
	cli     *client.Client
	log     *slog.Logger
	seccomp string
	// labelsMu serializes the read-modify-write of label files.
	labelsMu sync.Mutex
	// pullMu makes concurrent starts of a missing image pull it once.
	pullMu sync.Mutex
	// followers are the log followers' cancel functions, by container id.
	followers sync.Map
	closed    chan struct{}
	closeOnce sync.Once
}

var _ runtime.Runtime = (*Runtime)(nil)

// New connects to dockerd and checks that it answers.
func New(ctx context.Context, cfg Config) (*Runtime, error) {
	if cfg.StateDir == "" {
		return nil, errors.New("docker runtime: a state directory is required")
	}
	if cfg.TmpMiB <= 0 {
		cfg.TmpMiB = isolation.DefaultTmpMiB
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	opts := []client.Opt{client.FromEnv, client.WithAPIVersionNegotiation()}
	if cfg.Host != "" {
		opts = append(opts, client.WithHost(cfg.Host))
	}
	cli, err := client.NewClientWithOpts(opts...)
	if err != nil {
		return nil, fmt.Errorf("docker at %s: %w", cfg.Host, err)
	}
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := cli.Ping(pctx); err != nil {
		cli.Close()
		return nil, fmt.Errorf("docker at %s is unreachable: %w", cli.DaemonHost(), err)
	}
	cli.NegotiateAPIVersion(pctx)
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		cli.Close()
		return nil, fmt.Errorf("docker runtime: state directory: %w", err)
	}
	profile, err := isolation.SeccompProfileJSON()
	if err != nil {
		cli.Close()
		return nil, fmt.Errorf("docker runtime: seccomp profile: %w", err)
	}
	return &Runtime{cfg: cfg, cli: cli, log: log, seccomp: string(profile), closed: make(chan struct{})}, nil
}

// Close stops the log followers and releases the client; containers keep
// running.
func (r *Runtime) Close() error {
	r.closeOnce.Do(func() { close(r.closed) })
	return r.cli.Close()
}

// Client is the Docker client (tests inspect what the adapter made).
func (r *Runtime) Client() *client.Client { return r.cli }

// DaemonHost is the address of the dockerd the adapter talks to.
func (r *Runtime) DaemonHost() string { return r.cli.DaemonHost() }

func cleanupCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), time.Minute)
}

// mapErr turns Docker's errors into the port's.
func mapErr(id, op string, err error) error {
	switch {
	case err == nil:
		return nil
	case cerrdefs.IsNotFound(err):
		return fmt.Errorf("%s container %s: %w", op, id, runtime.ErrNotFound)
	case cerrdefs.IsConflict(err):
		return fmt.Errorf("%s container %s: %w: %v", op, id, sandbox.ErrAlreadyExists, err)
	case cerrdefs.IsInvalidArgument(err):
		return fmt.Errorf("%s container %s: %w: %v", op, id, sandbox.ErrInvalidArgument, err)
	}
	return fmt.Errorf("%s container %s: %w", op, id, err)
}

// Start creates and starts a container; on error nothing is left behind.
func (r *Runtime) Start(ctx context.Context, spec runtime.Spec) (runtime.Status, error) {
	begin := time.Now()
	if err := isolation.ValidateSpec(spec); err != nil {
		return runtime.Status{}, err
	}
	if fi, err := os.Stat(spec.SocketDir); err != nil || !fi.IsDir() {
		return runtime.Status{}, fmt.Errorf("%w: start container %s: socket dir %s is not a directory", sandbox.ErrInvalidArgument, spec.ID, spec.SocketDir)
	}
	if err := sealDir(spec.SocketDir); err != nil {
		return runtime.Status{}, fmt.Errorf("start container %s: %w", spec.ID, err)
	}
	created, err := r.create(ctx, spec)
	if err != nil {
		unsealDir(spec.SocketDir, r.log)
		return runtime.Status{}, err
	}
	if err := r.cli.ContainerStart(ctx, created, container.StartOptions{}); err != nil {
		cctx, cancel := cleanupCtx()
		defer cancel()
		if rerr := r.cli.ContainerRemove(cctx, created, container.RemoveOptions{Force: true, RemoveVolumes: true}); rerr != nil && !cerrdefs.IsNotFound(rerr) {
			r.log.Error("cannot remove container after failed start", "container", spec.ID, "err", rerr)
		}
		unsealDir(spec.SocketDir, r.log)
		return runtime.Status{}, fmt.Errorf("start container %s: %w", spec.ID, err)
	}
	if spec.LogPath != "" {
		r.follow(spec.ID, created, spec.LogPath)
	}
	st, err := r.Inspect(ctx, spec.ID)
	if err != nil {
		return runtime.Status{}, fmt.Errorf("start container %s: %w", spec.ID, err)
	}
	r.log.Debug("container started", "container", spec.ID, "image", spec.Image, "pid", st.Pid, "duration", time.Since(begin))
	return st, nil
}

// create creates the container, pulling its image first when dockerd lacks
// it and its name names a registry. It returns Docker's id.
func (r *Runtime) create(ctx context.Context, spec runtime.Spec) (string, error) {
	cfg, hc := r.containerConfig(spec)
	resp, err := r.cli.ContainerCreate(ctx, cfg, hc, nil, nil, spec.ID)
	if err != nil && cerrdefs.IsNotFound(err) {
		if perr := r.pull(ctx, spec.Image); perr != nil {
			return "", fmt.Errorf("start container %s: %w", spec.ID, perr)
		}
		resp, err = r.cli.ContainerCreate(ctx, cfg, hc, nil, nil, spec.ID)
	}
	if err != nil {
		return "", mapErr(spec.ID, "create", err)
	}
	return resp.ID, nil
}

// containerConfig is the whole Docker configuration of one sandbox
// container: every permission it has is written here.
func (r *Runtime) containerConfig(spec runtime.Spec) (*container.Config, *container.HostConfig) {
	labels := make(map[string]string, len(spec.Labels)+1)
	for k, v := range spec.Labels {
		labels[k] = v
	}
	labels[LabelRuntime] = runtimeName
	cfg := &container.Config{
		Image:           spec.Image,
		Hostname:        isolation.Hostname,
		User:            fmt.Sprintf("%d:%d", isolation.SandboxUID, isolation.SandboxGID),
		Env:             spec.Env,
		WorkingDir:      isolation.WorkspacePath,
		Labels:          labels,
		NetworkDisabled: true,
		StopSignal:      "SIGTERM",
	}
	if len(spec.Args) > 0 {
		cfg.Entrypoint = spec.Args[:1]
		cfg.Cmd = spec.Args[1:]
	}
	logCfg := container.LogConfig{Type: "none"}
	if spec.LogPath != "" {
		logCfg = container.LogConfig{Type: "json-file", Config: map[string]string{"max-size": "10m", "max-file": "1"}}
	}
	fsize := int64(isolation.FsizeLimit(spec.Limits.DiskMiB, r.cfg.TmpMiB))
	noInit := false
	hc := &container.HostConfig{
		NetworkMode:    "none",
		IpcMode:        "private",
		CgroupnsMode:   container.CgroupnsModePrivate,
		ReadonlyRootfs: true,
		CapDrop:        []string{"ALL"},
		GroupAdd:       []string{strconv.Itoa(isolation.SandboxGID)},
		SecurityOpt: []string{
			"no-new-privileges",
			"seccomp=" + r.seccomp,
			"apparmor=unconfined",
		},
		// No /proc masks (what the CLI's systempaths=unconfined sends):
		// empty, not nil, which would take Docker's defaults.
		MaskedPaths:   []string{},
		ReadonlyPaths: []string{},
		Init:          &noInit,
		LogConfig:     logCfg,
		ShmSize:       64 << 20,
		Tmpfs:         tmpfs(spec.Limits.DiskMiB, r.cfg.TmpMiB),
		AutoRemove:    false,
		Mounts: []mount.Mount{{
			Type:        mount.TypeBind,
			Source:      spec.SocketDir,
			Target:      executorapi.SocketDir,
			BindOptions: &mount.BindOptions{Propagation: mount.PropagationRPrivate, NonRecursive: true},
		}},
		Resources: resources(spec.Limits),
	}
	hc.Resources.CgroupParent = r.cfg.CgroupParent
	hc.Resources.Ulimits = []*container.Ulimit{
		{Name: "nofile", Soft: isolation.NofileLimit, Hard: isolation.NofileLimit},
		{Name: "core", Soft: 0, Hard: 0},
		{Name: "fsize", Soft: fsize, Hard: fsize},
	}
	return cfg, hc
}

// tmpfs is /workspace and /tmp: sized, inode-limited, executable (user code
// runs scripts from them), neither setuid nor devices.
func tmpfs(diskMiB, tmpMiB int64) map[string]string {
	return map[string]string{
		isolation.WorkspacePath: fmt.Sprintf("rw,exec,nosuid,nodev,mode=0755,size=%dm,nr_inodes=%d,uid=%d,gid=%d",
			diskMiB, isolation.InodesFor(diskMiB), isolation.SandboxUID, isolation.SandboxGID),
		isolation.TmpPath: fmt.Sprintf("rw,exec,nosuid,nodev,mode=1777,size=%dm,nr_inodes=%d", tmpMiB, isolation.InodesFor(tmpMiB)),
	}
}

// resources are the cgroup limits of l: cpu quota, memory without swap, pids.
func resources(l sandbox.Limits) container.Resources {
	pids := int64(l.Pids)
	return container.Resources{
		Memory: l.MemoryMiB << 20,
		// memory+swap equal to memory: no swap.
		MemorySwap: l.MemoryMiB << 20,
		CPUPeriod:  isolation.CPUPeriodMicros,
		CPUQuota:   isolation.CPUQuotaMicros(l.CPUMillis),
		PidsLimit:  &pids,
	}
}

// workspaceMiB reads the size of /workspace from a container's tmpfs options.
func workspaceMiB(hc *container.HostConfig) (int64, error) {
	if hc != nil {
		if mib, ok := isolation.TmpfsSizeMiB(strings.Split(hc.Tmpfs[isolation.WorkspacePath], ",")); ok {
			return mib, nil
		}
	}
	return 0, fmt.Errorf("container has no %s tmpfs with a size in MiB", isolation.WorkspacePath)
}

// inspect looks a container up by its name. Docker also resolves a prefix
// of its own ids, which must not make another container answer for id.
func (r *Runtime) inspect(ctx context.Context, op, id string) (container.InspectResponse, error) {
	c, err := r.cli.ContainerInspect(ctx, id)
	if err != nil {
		return container.InspectResponse{}, mapErr(id, op, err)
	}
	if c.ContainerJSONBase == nil || strings.TrimPrefix(c.Name, "/") != id || c.Config == nil || c.Config.Labels[LabelRuntime] != runtimeName {
		return container.InspectResponse{}, fmt.Errorf("%s container %s: %w", op, id, runtime.ErrNotFound)
	}
	return c, nil
}

// Inspect reports a container's state and labels.
func (r *Runtime) Inspect(ctx context.Context, id string) (runtime.Status, error) {
	c, err := r.inspect(ctx, "inspect", id)
	if err != nil {
		return runtime.Status{}, err
	}
	return r.status(id, c)
}

func (r *Runtime) status(id string, c container.InspectResponse) (runtime.Status, error) {
	labels, err := r.labels(id, c.Config.Labels)
	if err != nil {
		return runtime.Status{}, err
	}
	st := runtime.Status{ID: id, Labels: labels}
	if c.State != nil {
		st.Running = c.State.Running
		if st.Running {
			st.Pid = uint32(c.State.Pid)
		}
		st.ExitCode = c.State.ExitCode
	}
	st.CreatedAt, _ = time.Parse(time.RFC3339Nano, c.Created)
	return st, nil
}

// Wait returns a channel that receives the container's exit once. The
// channel is bound to ctx: cancelling it delivers an ExitResult carrying
// ctx's error.
func (r *Runtime) Wait(ctx context.Context, id string) (<-chan runtime.ExitResult, error) {
	c, err := r.inspect(ctx, "wait for", id)
	if err != nil {
		return nil, err
	}
	resC, errC := r.cli.ContainerWait(ctx, c.ID, container.WaitConditionNotRunning)
	out := make(chan runtime.ExitResult, 1)
	go func() {
		defer close(out)
		select {
		case res := <-resC:
			var err error
			if res.Error != nil && res.Error.Message != "" {
				err = fmt.Errorf("wait for container %s: %s", id, res.Error.Message)
			}
			out <- runtime.ExitResult{ExitCode: int(res.StatusCode), Err: err}
		case err := <-errC:
			out <- runtime.ExitResult{ExitCode: -1, Err: fmt.Errorf("wait for container %s: %w", id, err)}
		}
	}()
	return out, nil
}

// Stop sends SIGTERM to the container's init process and SIGKILL when it
// has not exited after timeout (to the millisecond: Docker's own stop
// counts whole seconds). It returns once the container has exited.
// Stopping a stopped container is not an error.
func (r *Runtime) Stop(ctx context.Context, id string, timeout time.Duration) error {
	c, err := r.inspect(ctx, "stop", id)
	if err != nil {
		return err
	}
	if c.State == nil || !c.State.Running {
		return nil
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Wait before the kill, so that the exit cannot slip between the two.
	resC, errC := r.cli.ContainerWait(wctx, c.ID, container.WaitConditionNotRunning)
	exited := func(d time.Duration) (bool, error) {
		timer := time.NewTimer(d)
		defer timer.Stop()
		select {
		case <-resC:
			return true, nil
		case err := <-errC:
			return false, fmt.Errorf("stop container %s: %w", id, err)
		case <-timer.C:
			return false, nil
		}
	}
	if err := r.kill(ctx, c.ID, id, syscall.SIGTERM); err != nil {
		return err
	}
	if done, err := exited(timeout); done || err != nil {
		return err
	}
	r.log.Info("container ignored SIGTERM, killing it", "container", id, "timeout", timeout)
	if err := r.kill(ctx, c.ID, id, syscall.SIGKILL); err != nil {
		return err
	}
	if done, err := exited(time.Minute); done || err != nil {
		return err
	}
	return fmt.Errorf("stop container %s: still running a minute after SIGKILL", id)
}

// kill signals the container; one that is no longer running is not an error.
func (r *Runtime) kill(ctx context.Context, dockerID, id string, sig syscall.Signal) error {
	err := r.cli.ContainerKill(ctx, dockerID, strconv.Itoa(int(sig)))
	if err == nil || cerrdefs.IsConflict(err) || strings.Contains(err.Error(), "is not running") {
		return nil
	}
	return mapErr(id, "signal", err)
}

// Destroy removes the container, its label file and the socket directory's
// sealing mount. An unknown id is not an error.
func (r *Runtime) Destroy(ctx context.Context, id string) error {
	if cancel, ok := r.followers.LoadAndDelete(id); ok {
		cancel.(context.CancelFunc)()
	}
	c, err := r.inspect(ctx, "destroy", id)
	if errors.Is(err, runtime.ErrNotFound) {
		return r.removeLabels(id)
	}
	if err != nil {
		return err
	}
	if err := r.cli.ContainerRemove(ctx, c.ID, container.RemoveOptions{Force: true, RemoveVolumes: true}); err != nil && !cerrdefs.IsNotFound(err) {
		return mapErr(id, "destroy", err)
	}
	for _, m := range c.Mounts {
		if m.Destination == executorapi.SocketDir && m.Type == mount.TypeBind {
			unsealDir(m.Source, r.log)
		}
	}
	return r.removeLabels(id)
}

// Update applies new limits and labels to a container. The limits are
// checked against the container before anything changes.
func (r *Runtime) Update(ctx context.Context, id string, u runtime.Update) error {
	c, err := r.inspect(ctx, "update", id)
	if err != nil {
		return err
	}
	if u.Limits != nil {
		disk, err := workspaceMiB(c.HostConfig)
		if err != nil {
			return fmt.Errorf("update container %s: %w", id, err)
		}
		if err := isolation.ValidateUpdate(id, *u.Limits, disk); err != nil {
			return err
		}
		if _, err := r.cli.ContainerUpdate(ctx, c.ID, container.UpdateConfig{Resources: resources(*u.Limits)}); err != nil {
			return mapErr(id, "update limits of", err)
		}
	}
	if len(u.Labels) > 0 {
		return r.addLabels(id, u.Labels)
	}
	return nil
}

// List returns the sandbox containers carrying every label in match,
// labels added by Update included.
func (r *Runtime) List(ctx context.Context, match map[string]string) ([]runtime.Status, error) {
	cs, err := r.cli.ContainerList(ctx, container.ListOptions{All: true, Filters: filters.NewArgs(filters.Arg("label", LabelRuntime+"="+runtimeName))})
	if err != nil {
		return nil, fmt.Errorf("list containers: %w", err)
	}
	var out []runtime.Status
	for _, s := range cs {
		if len(s.Names) == 0 {
			continue
		}
		id := strings.TrimPrefix(s.Names[0], "/")
		labels, err := r.labels(id, s.Labels)
		if err != nil {
			return nil, err
		}
		if !matches(labels, match) {
			continue
		}
		// The summary has no pid: inspect the matches.
		st, err := r.Inspect(ctx, id)
		if errors.Is(err, runtime.ErrNotFound) {
			continue // removed meanwhile
		}
		if err != nil {
			return nil, err
		}
		out = append(out, st)
	}
	return out, nil
}

func matches(labels, match map[string]string) bool {
	for k, v := range match {
		if got, ok := labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// follow copies the container's output into path until it exits, Destroy
// is called, or the Runtime is closed.
func (r *Runtime) follow(id, dockerID, path string) {
	ctx, cancel := context.WithCancel(context.Background())
	r.followers.Store(id, cancel)
	go func() {
		defer cancel()
		select {
		case <-r.closed:
		case <-ctx.Done():
		}
	}()
	go func() {
		defer r.followers.CompareAndDelete(id, cancel)
		if err := r.copyLogs(ctx, dockerID, path); err != nil && ctx.Err() == nil {
			r.log.Warn("cannot follow the container's output into its log", "container", id, "log", path, "err", err)
		}
	}()
}

func (r *Runtime) copyLogs(ctx context.Context, dockerID, path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		return err
	}
	defer f.Close()
	rc, err := r.cli.ContainerLogs(ctx, dockerID, container.LogsOptions{ShowStdout: true, ShowStderr: true, Follow: true})
	if err != nil {
		return err
	}
	defer rc.Close()
	// Without a tty, Docker multiplexes both streams with 8-byte headers.
	return demux(f, rc)
}

// demux copies the payloads of Docker's multiplexed log stream to w.
func demux(w io.Writer, r io.Reader) error {
	var hdr [8]byte
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		n := int64(hdr[4])<<24 | int64(hdr[5])<<16 | int64(hdr[6])<<8 | int64(hdr[7])
		if _, err := io.CopyN(w, r, n); err != nil {
			return err
		}
	}
}

// labelsPath is the file of the labels Update added to container id.
func (r *Runtime) labelsPath(id string) string {
	return filepath.Join(r.cfg.StateDir, id+".labels")
}

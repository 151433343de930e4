package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/sandboxhq/sandbox/executor"
)

// sandboxUID is the user the executor (and so bubblewrap) runs as in a
// sandbox container; the floors run as it too.
const sandboxUID = 1000

// imageRef is the containerd image of a template, as make images names it.
func imageRef(template string) string { return "localhost/sandbox/" + template + ":latest" }

// hostEnv holds what the floors and baselines share: the templates' root
// filesystems, mounted read-only from containerd's snapshots once per run,
// and a scratch directory.
type hostEnv struct {
	ctr    []string // ctr's global flags: address and namespace
	dir    string
	mounts map[string]string // template -> mounted root filesystem
	seq    atomic.Int64
}

// hostEnv makes the runner's hostEnv on first use.
func (r *runner) hostEnv() (*hostEnv, error) {
	if r.host != nil {
		return r.host, nil
	}
	dir, err := os.MkdirTemp("", "sandbox-bench-")
	if err != nil {
		return nil, fmt.Errorf("scratch directory: %w", err)
	}
	// bwrap resolves its bind sources as the sandbox user.
	if err := os.Chmod(dir, 0o755); err != nil {
		return nil, fmt.Errorf("scratch directory: %w", err)
	}
	r.host = &hostEnv{
		ctr:    []string{"-a", r.cfg.ContainerdAddress, "-n", r.cfg.Namespace},
		dir:    dir,
		mounts: map[string]string{},
	}
	return r.host, nil
}

// ctrCmd is a ctr command against the run's containerd and namespace.
func (h *hostEnv) ctrCmd(ctx context.Context, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ctr", append(slices.Clone(h.ctr), args...)...)
}

// rootfs mounts template's image read-only (ctr images mount: a view of
// its unpacked snapshot, held by a lease) and returns the mount point.
func (h *hostEnv) rootfs(ctx context.Context, template string) (string, error) {
	if p, ok := h.mounts[template]; ok {
		return p, nil
	}
	p := filepath.Join(h.dir, "rootfs-"+template)
	if err := os.Mkdir(p, 0o755); err != nil {
		return "", fmt.Errorf("mount point for %s: %w", template, err)
	}
	if out, err := h.ctrCmd(ctx, "images", "mount", imageRef(template), p).CombinedOutput(); err != nil {
		return "", fmt.Errorf("mount image %s (make images builds it): %w: %s", imageRef(template), err, bytes.TrimSpace(out))
	}
	h.mounts[template] = p
	return p, nil
}

// close unmounts the images (removing their views and leases) and removes
// the scratch directory.
func (h *hostEnv) close() error {
	var first error
	for t, p := range h.mounts {
		out, err := h.ctrCmd(context.Background(), "images", "unmount", "--rm", p).CombinedOutput()
		if err != nil {
			first = cmpOr(first, fmt.Errorf("unmount %s at %s: %w: %s", t, p, err, bytes.TrimSpace(out)))
			continue
		}
		delete(h.mounts, t)
	}
	if len(h.mounts) == 0 {
		first = cmpOr(first, os.RemoveAll(h.dir))
	}
	return first
}

// scratch makes a fresh directory under the run's scratch directory, owned
// by the sandbox user.
func (h *hostEnv) scratch(name string, mode os.FileMode) (string, error) {
	p := filepath.Join(h.dir, fmt.Sprintf("%s-%d", name, h.seq.Add(1)))
	if err := os.Mkdir(p, mode); err != nil {
		return "", err
	}
	if err := os.Chmod(p, mode); err != nil { // past the umask
		return "", err
	}
	return p, os.Chown(p, sandboxUID, sandboxUID)
}

// interpreterPath is where a template image keeps program.
func interpreterPath(rootfs, program string) (string, error) {
	for _, dir := range strings.Split(floorPath, ":") {
		p := filepath.Join(dir, program)
		if fi, err := os.Stat(filepath.Join(rootfs, p)); err == nil && fi.Mode().IsRegular() {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s is not in the image at %s", program, rootfs)
}

// floorEnv is the executor's base environment, floorPath its PATH.
var (
	floorEnv  = executor.BaseEnv()
	floorPath = floorEnv["PATH"]
)

// bwrapFloorArgs is the executor's own bubblewrap command line
// (executor.BwrapArgs), with the image's root filesystem as the root and
// host directories as the workspace and /tmp.
func bwrapFloorArgs(rootfs, workspace, tmp, interp, codeFile string) []string {
	return executor.BwrapArgs(executor.BwrapMounts{Root: rootfs, Workspace: workspace, Tmp: tmp}, interp, codeFile, floorEnv)
}

// floorLang is one interpreter a floor runs: in which image, with which file.
type floorLang struct {
	name, template, program, file, code string
}

func floorLangs(cfg Config) []floorLang {
	return []floorLang{
		{"python", cfg.Template, "python3", "main.py", "print(1)\n"},
		{"bash", cfg.Template, "bash", "main.sh", "echo 1\n"},
		{"node", cfg.NodeTemplate, "node", "main.js", "console.log(1)\n"},
	}
}

// bwrapRun is one prepared floor: the same bubblewrap sandbox the executor
// makes, started from this process as the sandbox user.
type bwrapRun struct {
	bwrap string
	args  []string
	code  string
}

func (h *hostEnv) prepareBwrap(ctx context.Context, l floorLang) (*bwrapRun, error) {
	bwrap, err := exec.LookPath("bwrap")
	if err != nil {
		return nil, fmt.Errorf("bubblewrap: %w", err)
	}
	root, err := h.rootfs(ctx, l.template)
	if err != nil {
		return nil, err
	}
	interp, err := interpreterPath(root, l.program)
	if err != nil {
		return nil, err
	}
	ws, err := h.scratch("workspace", 0o755)
	if err != nil {
		return nil, fmt.Errorf("workspace: %w", err)
	}
	tmp, err := h.scratch("tmp", 0o1777)
	if err != nil {
		return nil, fmt.Errorf("tmp: %w", err)
	}
	return &bwrapRun{bwrap: bwrap, args: bwrapFloorArgs(root, ws, tmp, interp, l.file), code: l.code}, nil
}

// once runs the sandbox once and checks that it printed 1.
func (b *bwrapRun) once(ctx context.Context) (time.Duration, error) {
	code, err := executor.MemFile("code", []byte(b.code))
	if err != nil {
		return 0, err
	}
	defer code.Close()
	filter, err := executor.SeccompFile()
	if err != nil {
		return 0, err
	}
	defer filter.Close()
	cmd := exec.CommandContext(ctx, b.bwrap, b.args...)
	cmd.Env = []string{}
	cmd.ExtraFiles = []*os.File{code, filter}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid: true, Pdeathsig: syscall.SIGKILL,
		Credential: &syscall.Credential{Uid: sandboxUID, Gid: sandboxUID, Groups: []uint32{sandboxUID}},
	}
	return timeCmd(cmd, "bwrap")
}

// timeCmd runs cmd and checks that it printed exactly "1\n".
func timeCmd(cmd *exec.Cmd, what string) (time.Duration, error) {
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	t0 := time.Now()
	err := cmd.Run()
	d := time.Since(t0)
	if err != nil {
		return d, fmt.Errorf("%s: %w: %s", what, err, strings.TrimSpace(errOut.String()))
	}
	if out.Len() == 0 && errOut.Len() == 0 {
		return d, fmt.Errorf("%w: %s exited 0", errNoOutput, what)
	}
	if out.String() != "1\n" {
		return d, fmt.Errorf("%s printed %q (stderr %q), want \"1\\n\"", what, out.String(), errOut.String())
	}
	return d, nil
}

// errNoOutput is a run that succeeded but whose output never arrived.
var errNoOutput = errors.New("no output")

// measure runs op Warmup times unmeasured, then N times.
func (r *runner) measure(ctx context.Context, name string, op func(context.Context) (time.Duration, error)) (Result, error) {
	var d []time.Duration
	for i := range r.cfg.Warmup + r.cfg.N {
		x, err := op(ctx)
		if err != nil {
			return Result{}, fmt.Errorf("%s run %d: %w", name, i+1, err)
		}
		if i >= r.cfg.Warmup {
			d = append(d, x)
		}
	}
	return summarize(name, d), nil
}

// floorBwrap measures the executor's bubblewrap sandbox with each
// interpreter, run bare from this process, one at a time; then the python
// one from Clients concurrent loops for Duration, the rate the sustained
// scenario is compared with.
func floorBwrap(ctx context.Context, r *runner) error {
	h, err := r.hostEnv()
	if err != nil {
		return err
	}
	var python *bwrapRun
	for _, l := range floorLangs(r.cfg) {
		b, err := h.prepareBwrap(ctx, l)
		if err != nil {
			if l.name == "node" { // the node image is optional for the floors
				r.report.Notes = append(r.report.Notes, fmt.Sprintf("floor-bwrap-node not measured: %v", err))
				continue
			}
			return err
		}
		res, err := r.measure(ctx, "floor-bwrap-"+l.name, b.once)
		if err != nil {
			return err
		}
		res.Note = fmt.Sprintf("bwrap (executor's arguments) + %s, %s root filesystem, uid %d", l.program, l.template, sandboxUID)
		r.add(res)
		if l.name == "python" {
			python = b
		}
	}
	res, err := loop(ctx, r.cfg.Clients, r.cfg.Duration, func(int) (time.Duration, error) { return python.once(ctx) })
	if err != nil {
		return fmt.Errorf("floor-bwrap-python-loop: %w", err)
	}
	res.Scenario = "floor-bwrap-python-loop"
	res.Note = fmt.Sprintf("%d concurrent loops of bwrap + python3, %s", r.cfg.Clients, r.cfg.Duration)
	r.add(res)
	return nil
}

// templatePython is what the python floors and baselines share: the host
// environment, the template image's root filesystem (mounted once; this
// also checks the image is there) and the path of python3 in it.
func (r *runner) templatePython(ctx context.Context) (h *hostEnv, root, interp string, err error) {
	if h, err = r.hostEnv(); err != nil {
		return nil, "", "", err
	}
	if root, err = h.rootfs(ctx, r.cfg.Template); err != nil {
		return nil, "", "", err
	}
	if interp, err = interpreterPath(root, "python3"); err != nil {
		return nil, "", "", err
	}
	return h, root, interp, nil
}

// floorPython measures the template's python3 -c 'print(1)' with nothing
// around it: chrooted into the image as the sandbox user.
func floorPython(ctx context.Context, r *runner) error {
	_, root, interp, err := r.templatePython(ctx)
	if err != nil {
		return err
	}
	res, err := r.measure(ctx, "floor-python", func(ctx context.Context) (time.Duration, error) {
		cmd := exec.CommandContext(ctx, interp, "-c", "print(1)")
		cmd.Env = envList(floorEnv)
		cmd.Dir = "/"
		cmd.SysProcAttr = &syscall.SysProcAttr{
			Chroot:     root,
			Credential: &syscall.Credential{Uid: sandboxUID, Gid: sandboxUID, Groups: []uint32{sandboxUID}},
		}
		return timeCmd(cmd, "python3")
	})
	if err != nil {
		return err
	}
	res.Note = fmt.Sprintf("python3 -c print(1), chrooted into the %s image, uid %d", r.cfg.Template, sandboxUID)
	r.add(res)
	return nil
}

func envList(env map[string]string) []string {
	var out []string
	for _, k := range slices.Sorted(maps.Keys(env)) {
		out = append(out, k+"="+env[k])
	}
	return out
}

// runcSpec is a minimal OCI spec for print(1) in the template's root
// filesystem: read-only root, the sandbox user, no capabilities, its own
// pid, ipc, uts, mount and network namespaces.
func runcSpec(rootfs string, args []string) *specs.Spec {
	return &specs.Spec{
		Version:  specs.Version,
		Root:     &specs.Root{Path: rootfs, Readonly: true},
		Hostname: "bench",
		Process: &specs.Process{
			User:            specs.User{UID: sandboxUID, GID: sandboxUID},
			Args:            args,
			Env:             envList(floorEnv),
			Cwd:             "/",
			Capabilities:    &specs.LinuxCapabilities{},
			NoNewPrivileges: true,
			Rlimits:         []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Hard: 1024, Soft: 1024}},
		},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/tmp", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "nodev", "mode=1777", "size=65536k"}},
		},
		Linux: &specs.Linux{
			Namespaces: []specs.LinuxNamespace{
				{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace}, {Type: specs.UTSNamespace},
				{Type: specs.MountNamespace}, {Type: specs.NetworkNamespace},
			},
		},
	}
}

// baselineRunc measures `runc run` of a fresh container per execution from
// the template's root filesystem (no image work: the snapshot is mounted
// once for the run).
func baselineRunc(ctx context.Context, r *runner) error {
	runc, err := exec.LookPath("runc")
	if err != nil {
		return fmt.Errorf("runc: %w", err)
	}
	h, root, interp, err := r.templatePython(ctx)
	if err != nil {
		return err
	}
	bundle := filepath.Join(h.dir, "runc-bundle")
	state := filepath.Join(h.dir, "runc-state")
	for _, d := range []string{bundle, state} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}
	b, err := json.MarshalIndent(runcSpec(root, []string{interp, "-c", "print(1)"}), "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(bundle, "config.json"), b, 0o644); err != nil {
		return err
	}
	res, err := r.measure(ctx, "baseline-runc", func(ctx context.Context) (time.Duration, error) {
		id := fmt.Sprintf("sandbox-bench-%d-%d", os.Getpid(), h.seq.Add(1))
		cmd := exec.CommandContext(ctx, runc, "--root", state, "run", "--bundle", bundle, id)
		return timeCmd(cmd, "runc run")
	})
	if err != nil {
		return err
	}
	res.Note = "runc run of a fresh container per execution, python3 -c print(1)"
	r.add(res)
	return nil
}

// baselineCtr measures `ctr run --rm` of the template's image: what
// containerd's own client does per container (snapshot, spec, shim, runc).
func baselineCtr(ctx context.Context, r *runner) error {
	if _, err := exec.LookPath("ctr"); err != nil {
		return fmt.Errorf("ctr: %w", err)
	}
	h, _, interp, err := r.templatePython(ctx)
	if err != nil {
		return err
	}
	lost := 0
	res, err := r.measure(ctx, "baseline-ctr", func(ctx context.Context) (time.Duration, error) {
		id := fmt.Sprintf("sandbox-bench-%d-%d", os.Getpid(), h.seq.Add(1))
		d, err := timeCmd(h.ctrCmd(ctx, "run", "--rm", imageRef(r.cfg.Template), id, interp, "-c", "print(1)"), "ctr run")
		if errors.Is(err, errNoOutput) {
			// ctr run exits with the container's status, so the run
			// happened; ctr sometimes loses a short-lived container's
			// output (its FIFO copy races the task's deletion).
			lost++
			return d, nil
		}
		return d, err
	})
	if err != nil {
		return err
	}
	res.Note = "ctr run --rm " + imageRef(r.cfg.Template) + ", python3 -c print(1)"
	if lost > 0 {
		res.Note += fmt.Sprintf("; ctr lost the output of %d runs (exit status 0)", lost)
	}
	r.add(res)
	return nil
}

// baselineDocker measures `docker run --rm --network none` of the template's
// root filesystem imported into Docker, when a Docker daemon answers.
func baselineDocker(ctx context.Context, r *runner) error {
	docker, err := exec.LookPath("docker")
	if err != nil {
		return fmt.Errorf("%w: no docker client on PATH", errSkipped)
	}
	vctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(vctx, docker, "version", "--format", "{{.Server.Version}}").CombinedOutput(); err != nil {
		return fmt.Errorf("%w: no Docker daemon answers: %s", errSkipped, firstLine(out))
	}
	h, root, interp, err := r.templatePython(ctx)
	if err != nil {
		return err
	}
	tag, err := h.dockerImage(ctx, docker, r.cfg.Template, root)
	if err != nil {
		return err
	}
	res, err := r.measure(ctx, "baseline-docker", func(ctx context.Context) (time.Duration, error) {
		cmd := exec.CommandContext(ctx, docker, "run", "--rm", "--network", "none", "--user", fmt.Sprintf("%d:%d", sandboxUID, sandboxUID),
			tag, interp, "-c", "print(1)")
		return timeCmd(cmd, "docker run")
	})
	if err != nil {
		return err
	}
	res.Note = "docker run --rm --network none, image imported from the " + r.cfg.Template + " root filesystem"
	r.add(res)
	return nil
}

// dockerImage imports the template's root filesystem into Docker once per
// image digest and returns its tag.
func (h *hostEnv) dockerImage(ctx context.Context, docker, template, root string) (string, error) {
	digest, err := h.imageDigest(ctx, imageRef(template))
	if err != nil {
		return "", err
	}
	tag := "sandbox-bench/" + template + ":" + strings.TrimPrefix(digest, "sha256:")[:12]
	if exec.CommandContext(ctx, docker, "image", "inspect", tag).Run() == nil {
		return tag, nil
	}
	tar := exec.CommandContext(ctx, "tar", "-C", root, "-c", ".")
	imp := exec.CommandContext(ctx, docker, "import", "-", tag)
	pipe, err := tar.StdoutPipe()
	if err != nil {
		return "", err
	}
	imp.Stdin = pipe
	var tarErr, impOut bytes.Buffer
	tar.Stderr = &tarErr
	imp.Stdout, imp.Stderr = &impOut, &impOut
	if err := tar.Start(); err != nil {
		return "", fmt.Errorf("tar %s: %w", root, err)
	}
	if err := imp.Run(); err != nil {
		_ = tar.Wait()
		return "", fmt.Errorf("docker import %s: %w: %s", tag, err, firstLine(impOut.Bytes()))
	}
	if err := tar.Wait(); err != nil {
		return "", fmt.Errorf("tar %s: %w: %s", root, err, firstLine(tarErr.Bytes()))
	}
	return tag, nil
}

// imageDigest reads the manifest digest of ref from `ctr images ls`.
func (h *hostEnv) imageDigest(ctx context.Context, ref string) (string, error) {
	out, err := h.ctrCmd(ctx, "images", "ls").Output()
	if err != nil {
		return "", fmt.Errorf("ctr images ls: %w", err)
	}
	for line := range strings.Lines(string(out)) {
		f := strings.Fields(line)
		if len(f) >= 3 && f[0] == ref && strings.HasPrefix(f[2], "sha256:") {
			return f[2], nil
		}
	}
	return "", fmt.Errorf("image %s not in containerd", ref)
}

func firstLine(b []byte) string {
	s, _, _ := strings.Cut(strings.TrimSpace(string(b)), "\n")
	return s
}

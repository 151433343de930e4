package containerd

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"strings"

	"github.com/containerd/containerd/containers"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/agent/runtime"
	"github.com/sandboxhq/sandbox/agent/runtime/isolation"
	"github.com/sandboxhq/sandbox/executor/executorapi"
)

// The identity and paths every sandbox container gets (isolation has them).
const (
	SandboxUID    = isolation.SandboxUID
	SandboxGID    = isolation.SandboxGID
	Hostname      = isolation.Hostname
	WorkspacePath = isolation.WorkspacePath

	defaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	mib         = 1 << 20

	// groupAnnotation makes containerd's runc v2 shim serve every container
	// whose spec carries the same value from one shim process (the shim's
	// start command hashes it into the socket address it looks for).
	groupAnnotation = "io.containerd.runc.v2.group"
)

// imageInfo is what the spec needs from an image, read once per image digest.
type imageInfo struct {
	// args is the image's entrypoint followed by its command.
	args []string
	// pathEnv is the image's PATH=... entry, or a default.
	pathEnv string
}

// ociSpec builds the whole OCI runtime spec of one sandbox container. It is
// built here, field by field, rather than from containerd's defaults, so that
// every permission the container has is written down in this function.
func ociSpec(s runtime.Spec, img imageInfo, cgroupParent string, tmpMiB int64) *specs.Spec {
	args := img.args
	if len(s.Args) > 0 {
		args = s.Args
	}
	env := make([]string, 0, len(s.Env)+1)
	hasPath := false
	for _, e := range s.Env {
		hasPath = hasPath || strings.HasPrefix(e, "PATH=")
		env = append(env, e)
	}
	if !hasPath {
		env = append([]string{img.pathEnv}, env...)
	}

	res := resources(s.Limits)
	res.Devices = deviceRules()
	var annotations map[string]string
	if s.Group != "" {
		annotations = map[string]string{groupAnnotation: s.Group}
	}

	sp := &specs.Spec{
		Version:     specs.Version,
		Annotations: annotations,
		// containerd's runc shim mounts the snapshot at <bundle>/rootfs.
		Root:     &specs.Root{Path: "rootfs", Readonly: true},
		Hostname: Hostname,
		Process: &specs.Process{
			User: specs.User{UID: SandboxUID, GID: SandboxGID, AdditionalGids: []uint32{SandboxGID}},
			Args: args,
			Env:  env,
			Cwd:  WorkspacePath,
			// No capabilities in any set: all five lists present and empty,
			// rather than relying on how a runtime reads a missing field.
			Capabilities:    &specs.LinuxCapabilities{},
			NoNewPrivileges: true,
			// No RLIMIT_NPROC: it counts every process of uid 1000 on the
			// host, i.e. across all sandboxes; the pids cgroup bounds each one.
			Rlimits: []specs.POSIXRlimit{
				{Type: "RLIMIT_NOFILE", Hard: isolation.NofileLimit, Soft: isolation.NofileLimit},
				{Type: "RLIMIT_CORE", Hard: 0, Soft: 0},
				// No file larger than the largest writable filesystem.
				{Type: "RLIMIT_FSIZE", Hard: isolation.FsizeLimit(s.Limits.DiskMiB, tmpMiB), Soft: isolation.FsizeLimit(s.Limits.DiskMiB, tmpMiB)},
			},
		},
		Mounts: mounts(s, tmpMiB),
		Linux: &specs.Linux{
			Namespaces: []specs.LinuxNamespace{
				{Type: specs.PIDNamespace},
				{Type: specs.IPCNamespace},
				{Type: specs.UTSNamespace},
				{Type: specs.MountNamespace},
				// A fresh network namespace has only lo: no network at all.
				{Type: specs.NetworkNamespace},
				{Type: specs.CgroupNamespace},
			},
			Devices:     devices(),
			CgroupsPath: path.Join(cgroupParent, s.ID),
			Resources:   res,
			// maskedPaths and readonlyPaths are empty on purpose. bubblewrap
			// mounts a fresh /proc for user code (--proc), and the kernel
			// refuses that while the container's /proc has paths mounted over
			// it ("Can't mount proc on /newroot/proc: Operation not permitted").
			// What those masks guard is still out of reach: the executor runs
			// as uid 1000 with no capabilities and no_new_privs, so
			// /proc/kcore, /proc/sys, /proc/sysrq-trigger and the like are
			// unreadable or unwritable by file permissions; the conformance
			// suite proves it.
			MaskedPaths:   nil,
			ReadonlyPaths: nil,
		},
	}
	// Docker's default profile for a container without capabilities,
	// widened only by what bubblewrap needs (see isolation.SeccompProfile).
	sp.Linux.Seccomp = isolation.SeccompProfile()
	return sp
}

// mounts lists every filesystem in the container besides its root. Nothing
// from the host appears except the socket directory.
func mounts(s runtime.Spec, tmpMiB int64) []specs.Mount {
	return []specs.Mount{
		{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
		{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
		{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"}},
		{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
		{Destination: "/dev/mqueue", Type: "mqueue", Source: "mqueue", Options: []string{"nosuid", "noexec", "nodev"}},
		{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
		// tmpfs pages are charged to the container's memory cgroup, so the
		// workspace and /tmp also count against Limits.MemoryMiB.
		{Destination: WorkspacePath, Type: "tmpfs", Source: "tmpfs", Options: []string{
			"nosuid", "nodev", "mode=0755",
			fmt.Sprintf("size=%dm", s.Limits.DiskMiB), fmt.Sprintf("nr_inodes=%d", isolation.InodesFor(s.Limits.DiskMiB)),
			fmt.Sprintf("uid=%d", SandboxUID), fmt.Sprintf("gid=%d", SandboxGID),
		}},
		{Destination: "/tmp", Type: "tmpfs", Source: "tmpfs", Options: []string{
			"nosuid", "nodev", "mode=1777", fmt.Sprintf("size=%dm", tmpMiB), fmt.Sprintf("nr_inodes=%d", isolation.InodesFor(tmpMiB)),
		}},
		{Destination: executorapi.SocketDir, Type: "bind", Source: s.SocketDir, Options: []string{
			"rbind", "rw", "nosuid", "nodev", "noexec",
		}},
	}
}

// allowedDevices are the only device nodes in the container; bubblewrap's
// --dev binds the same set into user code's sandbox. /dev/ptmx is runc's
// symlink to the devpts instance's pts/ptmx.
var allowedDevices = []struct {
	path         string
	major, minor int64
}{
	{"/dev/null", 1, 3},
	{"/dev/zero", 1, 5},
	{"/dev/full", 1, 7},
	{"/dev/random", 1, 8},
	{"/dev/urandom", 1, 9},
	{"/dev/tty", 5, 0},
}

// devices are the nodes runc creates in the container's /dev.
func devices() []specs.LinuxDevice {
	mode := os.FileMode(0o666)
	var uid, gid uint32
	out := make([]specs.LinuxDevice, 0, len(allowedDevices))
	for _, d := range allowedDevices {
		out = append(out, specs.LinuxDevice{Path: d.path, Type: "c", Major: d.major, Minor: d.minor, FileMode: &mode, UID: &uid, GID: &gid})
	}
	return out
}

// deviceRules deny every device in the cgroup, then allow the created
// nodes, /dev/ptmx (5:2) and the pseudo terminals (136:*).
func deviceRules() []specs.LinuxDeviceCgroup {
	i := func(v int64) *int64 { return &v }
	rules := []specs.LinuxDeviceCgroup{{Allow: false, Access: "rwm"}}
	for _, d := range allowedDevices {
		rules = append(rules, specs.LinuxDeviceCgroup{Allow: true, Type: "c", Major: i(d.major), Minor: i(d.minor), Access: "rwm"})
	}
	return append(rules,
		specs.LinuxDeviceCgroup{Allow: true, Type: "c", Major: i(5), Minor: i(2), Access: "rwm"},
		specs.LinuxDeviceCgroup{Allow: true, Type: "c", Major: i(136), Minor: nil, Access: "rwm"},
	)
}

// workspaceMiB reads the size of /workspace from a container's spec.
func workspaceMiB(c containers.Container) (int64, error) {
	if c.Spec == nil {
		return 0, errors.New("container has no spec")
	}
	var spec specs.Spec
	if err := json.Unmarshal(c.Spec.GetValue(), &spec); err != nil {
		return 0, fmt.Errorf("decode spec: %w", err)
	}
	for _, m := range spec.Mounts {
		if m.Destination != WorkspacePath {
			continue
		}
		if mib, ok := isolation.TmpfsSizeMiB(m.Options); ok {
			return mib, nil
		}
	}
	return 0, fmt.Errorf("spec has no %s tmpfs with a size in MiB", WorkspacePath)
}

// resources are the cgroup limits of l: cpu quota, memory without swap, pids.
func resources(l sandbox.Limits) *specs.LinuxResources {
	memory := l.MemoryMiB * mib
	// On cgroup v1 "swap" is memory+swap, so equal to memory means no swap.
	swap := memory
	quota := isolation.CPUQuotaMicros(l.CPUMillis)
	period := uint64(isolation.CPUPeriodMicros)
	return &specs.LinuxResources{
		Memory: &specs.LinuxMemory{Limit: &memory, Swap: &swap},
		CPU:    &specs.LinuxCPU{Quota: &quota, Period: &period},
		Pids:   &specs.LinuxPids{Limit: int64(l.Pids)},
	}
}

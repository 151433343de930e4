// Package isolation is what every runtime adapter gives a sandbox container,
// written once: the executor's identity, the checks a Spec passes before any
// adapter acts on it, the quotas derived from the limits, and the container's
// seccomp profile. Adapters translate these into their runtime's terms (an
// OCI spec for containerd, a HostConfig for Docker, a Pod for Kubernetes).
package isolation

import (
	"fmt"
	"path"
	"strconv"
	"strings"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/agent/runtime"
)

// The identity and paths every sandbox container gets.
const (
	// SandboxUID and SandboxGID are the executor's user inside the container.
	SandboxUID = 1000
	SandboxGID = 1000
	// Hostname is the UTS name of every sandbox container.
	Hostname = "sandbox"
	// WorkspacePath is the executor's working directory, a size-limited tmpfs.
	WorkspacePath = "/workspace"
	// TmpPath is the container's other writable directory, a tmpfs too.
	TmpPath = "/tmp"
	// DefaultTmpMiB is the size of /tmp when an adapter is not told.
	DefaultTmpMiB = 128
	// NofileLimit is RLIMIT_NOFILE.
	NofileLimit = 1024
	// CPUPeriodMicros is the CFS period; the quota is CPUMillis/1000 of it.
	CPUPeriodMicros = 100000
)

// ValidateSpec rejects a Spec no adapter can turn into a safe container.
func ValidateSpec(s runtime.Spec) error {
	switch {
	case s.ID == "":
		return fmt.Errorf("%w: container id is empty", sandbox.ErrInvalidArgument)
	case s.Image == "":
		return fmt.Errorf("%w: container %s: image is empty", sandbox.ErrInvalidArgument, s.ID)
	case s.SocketDir == "" || !path.IsAbs(s.SocketDir):
		return fmt.Errorf("%w: container %s: socket dir %q must be an absolute path", sandbox.ErrInvalidArgument, s.ID, s.SocketDir)
	case s.LogPath != "" && !path.IsAbs(s.LogPath):
		return fmt.Errorf("%w: container %s: log path %q must be absolute", sandbox.ErrInvalidArgument, s.ID, s.LogPath)
	}
	return ValidateLimits(s.ID, s.Limits)
}

// ValidateLimits rejects the limits of a new container id unless all are
// set: a zero limit would mean "unlimited" to the kernel (and a tmpfs of
// size=0, or a Kubernetes limit left out, is unbounded).
func ValidateLimits(id string, l sandbox.Limits) error {
	if l.CPUMillis <= 0 || l.MemoryMiB <= 0 || l.Pids <= 0 || l.DiskMiB <= 0 {
		return fmt.Errorf("%w: container %s: cpu, memory, pids and disk limits must all be positive, got %+v",
			sandbox.ErrInvalidArgument, id, l)
	}
	return nil
}

// ValidateUpdate rejects new limits for container id that the kernel would
// read as "unlimited", or a disk size other than the diskMiB it was created
// with (a tmpfs cannot be resized under a running container).
func ValidateUpdate(id string, l sandbox.Limits, diskMiB int64) error {
	if l.CPUMillis <= 0 || l.MemoryMiB <= 0 || l.Pids <= 0 {
		return fmt.Errorf("%w: update container %s: cpu, memory and pids limits must be positive, got %+v", sandbox.ErrInvalidArgument, id, l)
	}
	if l.DiskMiB != diskMiB {
		return fmt.Errorf("%w: update container %s: disk limit %d MiB differs from the %d MiB it was created with",
			sandbox.ErrInvalidArgument, id, l.DiskMiB, diskMiB)
	}
	return nil
}

// FsizeLimit is RLIMIT_FSIZE in bytes: the larger of /workspace and /tmp.
// No file can be larger than the largest writable filesystem: a write past
// it gets SIGXFSZ (EFBIG where that is ignored, as Python does).
func FsizeLimit(diskMiB, tmpMiB int64) uint64 {
	return uint64(max(diskMiB, tmpMiB)) << 20
}

// InodesFor is the inode quota of a tmpfs of mib MiB: one per 16 KiB, at
// least 4096. A tmpfs otherwise allows inodes by the host's memory, and
// millions of empty files (each a kernel inode, charged to the container's
// memory) would escape the size quota.
func InodesFor(mib int64) int64 {
	return max(4096, mib*64)
}

// TmpfsSizeMiB reads the size of a tmpfs from its mount options, as the
// adapters write it ("size=<n>m"), to check an update against the size the
// container was created with.
func TmpfsSizeMiB(options []string) (int64, bool) {
	for _, o := range options {
		if v, ok := strings.CutPrefix(o, "size="); ok {
			if n, ok := strings.CutSuffix(v, "m"); ok {
				if mib, err := strconv.ParseInt(n, 10, 64); err == nil {
					return mib, true
				}
			}
		}
	}
	return 0, false
}

// CPUQuotaMicros is the CFS quota of a cpu limit in thousandths of a core.
func CPUQuotaMicros(cpuMillis int32) int64 {
	return int64(cpuMillis) * CPUPeriodMicros / 1000
}

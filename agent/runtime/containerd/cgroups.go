package containerd

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/agent/runtime/isolation"
)

// cgroupRoot is where the host mounts its cgroup filesystems.
const cgroupRoot = "/sys/fs/cgroup"

// cgroupLimits writes a running container's cpu, memory and pids limits
// straight into the cgroup runc made for it at creation. It does what
// "runc update" does, without the fork and exec of runc through the shim:
// about 5 ms saved on the claim of a warm container, whose whole budget is
// 5 ms. runc's own record of the limits goes stale, which nothing reads:
// a later update sets them all, and delete removes the cgroup by path.
type cgroupLimits struct {
	// unified is true on a cgroup v2 host. A hybrid host (v1 controllers
	// and a cgroup2 mount beside them) is v1 to runc, and so to this.
	unified bool
}

// detectCgroups tells a cgroup v2 host (cgroup2 mounted at the root) from
// a v1 or hybrid one, as runc does.
func detectCgroups() (cgroupLimits, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(cgroupRoot, &st); err != nil {
		return cgroupLimits{}, fmt.Errorf("stat %s: %w", cgroupRoot, err)
	}
	return cgroupLimits{unified: st.Type == unix.CGROUP2_SUPER_MAGIC}, nil
}

// set applies l to the cgroup at path (relative to each hierarchy's root):
// memory first, the write most likely to fail (the kernel refuses a limit
// below what the container already uses), then cpu and pids. prev, when
// known, is what the cgroup holds (the container's creation or last
// update): only values that change are written, and the memory limits'
// order needs no read. The cpu period is the spec's, set at creation, and
// is written only when prev is not known.
func (c cgroupLimits) set(path string, prev *sandbox.Limits, l sandbox.Limits) error {
	memory := l.MemoryMiB * mib
	quota := isolation.CPUQuotaMicros(l.CPUMillis)
	pids := l.Pids
	memChanged := prev == nil || prev.MemoryMiB != l.MemoryMiB
	cpuChanged := prev == nil || prev.CPUMillis != l.CPUMillis
	pidsChanged := prev == nil || prev.Pids != l.Pids
	if c.unified {
		return c.setUnified(filepath.Join(cgroupRoot, path), prev == nil, memChanged, cpuChanged, pidsChanged, memory, quota, pids)
	}
	mem := filepath.Join(cgroupRoot, "memory", path)
	var writes [][2]string
	if memChanged {
		var cur int64
		if prev != nil {
			cur = prev.MemoryMiB * mib
		} else {
			current, err := os.ReadFile(filepath.Join(mem, "memory.limit_in_bytes"))
			if errors.Is(err, os.ErrNotExist) {
				return errNoCgroup(mem, err)
			}
			if err != nil {
				return err
			}
			if cur, err = strconv.ParseInt(strings.TrimSpace(string(current)), 10, 64); err != nil {
				cur = 0
			}
		}
		// memory.memsw.limit_in_bytes (memory plus swap, equal to memory:
		// no swap) may never be below memory.limit_in_bytes, so which of
		// the two goes first depends on whether the limit grows or shrinks.
		writes = [][2]string{
			{filepath.Join(mem, "memory.limit_in_bytes"), strconv.FormatInt(memory, 10)},
			{filepath.Join(mem, "memory.memsw.limit_in_bytes"), strconv.FormatInt(memory, 10)},
		}
		if memory > cur {
			writes[0], writes[1] = writes[1], writes[0]
		}
	}
	cpu := filepath.Join(cgroupRoot, "cpu", path)
	if prev == nil {
		writes = append(writes, [2]string{filepath.Join(cpu, "cpu.cfs_period_us"), strconv.Itoa(isolation.CPUPeriodMicros)})
	}
	if cpuChanged {
		writes = append(writes, [2]string{filepath.Join(cpu, "cpu.cfs_quota_us"), strconv.FormatInt(quota, 10)})
	}
	if pidsChanged {
		writes = append(writes, [2]string{filepath.Join(cgroupRoot, "pids", path, "pids.max"), strconv.Itoa(int(pids))})
	}
	if err := writeAll(writes...); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return errNoCgroup(mem, err)
		}
		return err
	}
	return nil
}

// setUnified is set on cgroup v2, where swap has a limit of its own.
func (c cgroupLimits) setUnified(dir string, unknown, memChanged, cpuChanged, pidsChanged bool, memory, quota int64, pids int32) error {
	if unknown {
		if _, err := os.Stat(dir); err != nil {
			return errNoCgroup(dir, err)
		}
	}
	var writes [][2]string
	if memChanged {
		writes = append(writes, [2]string{filepath.Join(dir, "memory.max"), strconv.FormatInt(memory, 10)})
	}
	// Without swap accounting the file is missing, as it is to runc; with
	// it, the spec set it to 0 at creation.
	if swap := filepath.Join(dir, "memory.swap.max"); unknown && fileExists(swap) {
		writes = append(writes, [2]string{swap, "0"})
	}
	if cpuChanged {
		writes = append(writes, [2]string{filepath.Join(dir, "cpu.max"), fmt.Sprintf("%d %d", quota, isolation.CPUPeriodMicros)})
	}
	if pidsChanged {
		writes = append(writes, [2]string{filepath.Join(dir, "pids.max"), strconv.Itoa(int(pids))})
	}
	if err := writeAll(writes...); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return errNoCgroup(dir, err)
		}
		return err
	}
	return nil
}

// writeAll writes each value to its file, in order, stopping at the first
// failure.
func writeAll(writes ...[2]string) error {
	for _, w := range writes {
		f, err := os.OpenFile(w[0], os.O_WRONLY|os.O_TRUNC, 0)
		if err != nil {
			return err
		}
		_, err = f.WriteString(w[1])
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if errors.Is(err, syscall.EBUSY) {
			return fmt.Errorf("%w: write %s to %s: the container uses more memory than that: %w", sandbox.ErrFailedPrecondition, w[1], w[0], err)
		}
		if err != nil {
			return fmt.Errorf("write %s to %s: %w", w[1], w[0], err)
		}
	}
	return nil
}

// errNoCgroup: a container without a cgroup has no running task.
func errNoCgroup(dir string, err error) error {
	return fmt.Errorf("%w: no cgroup %s, so the container is not running: %w", sandbox.ErrFailedPrecondition, dir, err)
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

package runtimetest

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// ReadCgroupLimits reads the limits of the cgroup at path (relative to the
// cgroup root, as /proc/PID/cgroup names it) on cgroup v1 or v2.
func ReadCgroupLimits(path string) (CgroupLimits, error) {
	var l CgroupLimits
	read := func(file string) (string, error) {
		b, err := os.ReadFile(filepath.Join("/sys/fs/cgroup", file))
		return strings.TrimSpace(string(b)), err
	}
	var errs []error
	readInt := func(file string) int64 {
		s, err := read(file)
		if err != nil {
			errs = append(errs, err)
			return 0
		}
		n, err := strconv.ParseInt(s, 10, 64)
		errs = append(errs, err)
		return n
	}
	if _, err := os.Stat(filepath.Join("/sys/fs/cgroup/memory", path)); err == nil {
		l.MemoryBytes = readInt(filepath.Join("memory", path, "memory.limit_in_bytes"))
		l.MemorySwapBytes = readInt(filepath.Join("memory", path, "memory.memsw.limit_in_bytes"))
		l.CPUQuotaMicros = readInt(filepath.Join("cpu", path, "cpu.cfs_quota_us"))
		l.CPUPeriodMicros = readInt(filepath.Join("cpu", path, "cpu.cfs_period_us"))
		l.Pids = readInt(filepath.Join("pids", path, "pids.max"))
		return l, errors.Join(errs...)
	}
	l.MemoryBytes = readInt(filepath.Join(path, "memory.max"))
	l.MemorySwapBytes = l.MemoryBytes + readInt(filepath.Join(path, "memory.swap.max"))
	cpu, err := read(filepath.Join(path, "cpu.max"))
	errs = append(errs, err)
	if q, p, ok := strings.Cut(cpu, " "); ok {
		l.CPUQuotaMicros, _ = strconv.ParseInt(q, 10, 64)
		l.CPUPeriodMicros, _ = strconv.ParseInt(p, 10, 64)
	}
	l.Pids = readInt(filepath.Join(path, "pids.max"))
	return l, errors.Join(errs...)
}

// CgroupPathOf is the memory cgroup (v1) or the unified cgroup (v2) of a
// host process, as ReadCgroupLimits takes it.
func CgroupPathOf(pid uint32) (string, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return "", err
	}
	defer f.Close()
	unified := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		for _, c := range strings.Split(parts[1], ",") {
			if c == "memory" {
				return parts[2], nil
			}
		}
		if parts[0] == "0" && parts[1] == "" {
			unified = parts[2]
		}
	}
	if unified == "" {
		return "", fmt.Errorf("process %d: no memory or unified cgroup in /proc/%d/cgroup", pid, pid)
	}
	return unified, sc.Err()
}

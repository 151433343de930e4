package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// MemoryResult is the warm-memory scenario's answer, per added container.
type MemoryResult struct {
	PoolBefore int `json:"pool_before"`
	PoolAfter  int `json:"pool_after"`
	// Containers is how many new containers were found in containerd; the
	// PSS and cgroup figures are their sums divided by it.
	Containers int `json:"containers"`
	Samples    int `json:"samples"`
	// MemAvailableBeforeMiB and MemAvailableAfterMiB are medians.
	MemAvailableBeforeMiB float64 `json:"mem_available_before_mib"`
	MemAvailableAfterMiB  float64 `json:"mem_available_after_mib"`
	// MemAvailableMiB is the drop divided by the pool's growth.
	MemAvailableMiB float64 `json:"mem_available_mib_per_container"`
	// PSSMiB sums the proportional set size of every process in the
	// containers and of their containerd shims; ShimPSSMiB is the shims' part.
	PSSMiB     float64 `json:"pss_mib_per_container"`
	ShimPSSMiB float64 `json:"shim_pss_mib_per_container"`
	// CgroupMiB is the containers' memory cgroups' usage (page cache
	// included); CgroupAnonMiB its anonymous part.
	CgroupMiB     float64 `json:"cgroup_mib_per_container"`
	CgroupAnonMiB float64 `json:"cgroup_anon_mib_per_container"`
}

const mibF = 1 << 20

// parseMeminfo reads /proc/meminfo's text into bytes per field.
func parseMeminfo(text string) (map[string]int64, error) {
	out := map[string]int64{}
	for line := range strings.Lines(text) {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) == 0 {
			continue
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("meminfo %s: %w", k, err)
		}
		if len(f) > 1 && f[1] == "kB" {
			n <<= 10
		}
		out[k] = n
	}
	if _, ok := out["MemAvailable"]; !ok {
		return nil, fmt.Errorf("meminfo has no MemAvailable")
	}
	return out, nil
}

// memAvailable is MemAvailable in bytes.
func memAvailable() (int64, error) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	m, err := parseMeminfo(string(b))
	if err != nil {
		return 0, err
	}
	return m["MemAvailable"], nil
}

// sampleMemAvailable takes n MemAvailable samples a second apart and
// returns their median in MiB.
func sampleMemAvailable(ctx context.Context, n int) (float64, error) {
	var v []float64
	for i := range n {
		if i > 0 {
			if err := sleep(ctx, time.Second); err != nil {
				return 0, err
			}
		}
		m, err := memAvailable()
		if err != nil {
			return 0, err
		}
		v = append(v, float64(m)/mibF)
	}
	return median(v), nil
}

func sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

// parseRollupPss reads the Pss line of /proc/PID/smaps_rollup, in bytes.
func parseRollupPss(text string) (int64, error) {
	for line := range strings.Lines(text) {
		rest, ok := strings.CutPrefix(line, "Pss:")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			break
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("smaps_rollup Pss: %w", err)
		}
		return n << 10, nil
	}
	return 0, fmt.Errorf("smaps_rollup has no Pss line")
}

// pss is the PSS of process pid in bytes; 0 for one that has gone.
func pss(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0
	}
	n, _ := parseRollupPss(string(b))
	return n
}

// task is a running containerd task.
type task struct {
	id  string
	pid int
}

// parseTasks reads `ctr tasks ls`: TASK PID STATUS, running ones only.
func parseTasks(text string) []task {
	var out []task
	for line := range strings.Lines(text) {
		f := strings.Fields(line)
		if len(f) < 3 || f[2] != "RUNNING" {
			continue
		}
		pid, err := strconv.Atoi(f[1])
		if err != nil {
			continue
		}
		out = append(out, task{f[0], pid})
	}
	return out
}

func (h *hostEnv) tasks(ctx context.Context) (map[string]task, error) {
	out, err := h.ctrCmd(ctx, "tasks", "ls").Output()
	if err != nil {
		return nil, fmt.Errorf("ctr tasks ls: %w", err)
	}
	m := map[string]task{}
	for _, t := range parseTasks(string(out)) {
		m[t.id] = t
	}
	return m, nil
}

// shimPids maps container ids to the pids of their containerd shims
// (containerd-shim-runc-v2 ... -id ID ...), found in /proc.
func shimPids() map[string]int {
	out := map[string]int{}
	dirs, _ := os.ReadDir("/proc")
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", d.Name(), "cmdline"))
		if err != nil || !bytes.Contains(b, []byte("containerd-shim")) {
			continue
		}
		args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		for i := 0; i+1 < len(args); i++ {
			if args[i] == "-id" {
				out[args[i+1]] = pid
			}
		}
	}
	return out
}

// memCgroup finds the memory cgroup directory of process pid: from
// /proc/PID/cgroup, the v1 memory hierarchy when the host has one, else the
// unified one. The agent's containerd adapter puts each container at
// <cgroup parent>/<id>, /sandbox/<id> by default.
func memCgroup(pid int) (dir string, v2 bool, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return "", false, err
	}
	var unified string
	for line := range strings.Lines(string(b)) {
		f := strings.SplitN(strings.TrimSpace(line), ":", 3)
		if len(f) != 3 {
			continue
		}
		if f[0] == "0" && f[1] == "" {
			unified = f[2]
		}
		for _, c := range strings.Split(f[1], ",") {
			if c == "memory" {
				return filepath.Join("/sys/fs/cgroup/memory", f[2]), false, nil
			}
		}
	}
	if unified == "" {
		return "", false, fmt.Errorf("pid %d has no memory cgroup", pid)
	}
	base := "/sys/fs/cgroup"
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err != nil {
		base = "/sys/fs/cgroup/unified"
	}
	return filepath.Join(base, unified), true, nil
}

// cgroupMemory reads a memory cgroup's usage and anonymous memory in bytes.
func cgroupMemory(dir string, v2 bool) (usage, anon int64, err error) {
	usageFile, anonKeys := "memory.usage_in_bytes", []string{"total_rss", "rss"}
	if v2 {
		usageFile, anonKeys = "memory.current", []string{"anon"}
	}
	b, err := os.ReadFile(filepath.Join(dir, usageFile))
	if err != nil {
		return 0, 0, err
	}
	usage, err = strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("%s/%s: %w", dir, usageFile, err)
	}
	b, err = os.ReadFile(filepath.Join(dir, "memory.stat"))
	if err != nil {
		return usage, 0, err
	}
	stat := parseFlatKeyed(string(b))
	for _, k := range anonKeys {
		if v, ok := stat[k]; ok {
			return usage, v, nil
		}
	}
	return usage, 0, nil
}

// parseFlatKeyed reads "key value" lines (memory.stat).
func parseFlatKeyed(text string) map[string]int64 {
	out := map[string]int64{}
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 2 {
			continue
		}
		if v, err := strconv.ParseInt(f[1], 10, 64); err == nil {
			out[f[0]] = v
		}
	}
	return out
}

// cgroupPids lists the processes of a cgroup.
func cgroupPids(dir string) []int {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil
	}
	var out []int
	for _, f := range strings.Fields(string(b)) {
		if p, err := strconv.Atoi(f); err == nil {
			out = append(out, p)
		}
	}
	return out
}

// containerMemory is what the host spends on a set of containers, in bytes.
type containerMemory struct {
	pss, shimPss, cgroup, anon int64
	counted                    int
}

// measureContainers sums PSS (container processes and shims) and cgroup
// memory over the given tasks.
func measureContainers(tasks []task) (containerMemory, error) {
	shims := shimPids()
	var m containerMemory
	for _, t := range tasks {
		dir, v2, err := memCgroup(t.pid)
		if err != nil {
			return m, fmt.Errorf("container %s: %w", t.id, err)
		}
		usage, anon, err := cgroupMemory(dir, v2)
		if err != nil {
			return m, fmt.Errorf("container %s: %w", t.id, err)
		}
		m.cgroup += usage
		m.anon += anon
		for _, p := range cgroupPids(dir) {
			m.pss += pss(p)
		}
		if sp, ok := shims[t.id]; ok {
			s := pss(sp)
			m.pss += s
			m.shimPss += s
		}
		m.counted++
	}
	return m, nil
}

// warmMemory measures host memory per idle warm container: the drop of
// MemAvailable when the pool grows by MemGrow, cross-checked with the new
// containers' summed PSS (their processes and shims) and cgroup usage.
func warmMemory(ctx context.Context, r *runner) error {
	c, t, grow := r.c, r.cfg.Template, r.cfg.MemGrow
	h, err := r.hostEnv()
	if err != nil {
		return err
	}
	if err := c.setPool(ctx, t, 0); err != nil {
		return err
	}
	defer func() { _ = c.setPool(context.WithoutCancel(ctx), t, 0) }()
	if err := c.waitPool(ctx, t, 0); err != nil {
		return err
	}
	res := &MemoryResult{PoolBefore: 0, PoolAfter: grow, Samples: r.cfg.MemSamples}
	r.logf("  settling %s, then %d MemAvailable samples", r.cfg.Settle, r.cfg.MemSamples)
	if err := sleep(ctx, r.cfg.Settle); err != nil {
		return err
	}
	if res.MemAvailableBeforeMiB, err = sampleMemAvailable(ctx, r.cfg.MemSamples); err != nil {
		return err
	}
	before, err := h.tasks(ctx)
	if err != nil {
		return err
	}
	if err := c.setPool(ctx, t, grow); err != nil {
		return err
	}
	r.logf("  waiting for %d warm %s containers", grow, t)
	if err := c.waitPool(ctx, t, grow); err != nil {
		return err
	}
	if err := sleep(ctx, r.cfg.Settle); err != nil {
		return err
	}
	if res.MemAvailableAfterMiB, err = sampleMemAvailable(ctx, r.cfg.MemSamples); err != nil {
		return err
	}
	after, err := h.tasks(ctx)
	if err != nil {
		return err
	}
	var added []task
	for id, tk := range after {
		if _, ok := before[id]; !ok {
			added = append(added, tk)
		}
	}
	m, err := measureContainers(added)
	if err != nil {
		return err
	}
	res.Containers = m.counted
	res.MemAvailableMiB = round2((res.MemAvailableBeforeMiB - res.MemAvailableAfterMiB) / float64(grow))
	if m.counted > 0 {
		n := float64(m.counted) * mibF
		res.PSSMiB = round2(float64(m.pss) / n)
		res.ShimPSSMiB = round2(float64(m.shimPss) / n)
		res.CgroupMiB = round2(float64(m.cgroup) / n)
		res.CgroupAnonMiB = round2(float64(m.anon) / n)
	}
	r.report.Memory = res
	r.logf("  %d containers added: %.2f MiB MemAvailable, %.2f MiB PSS (%.2f shims), %.2f MiB cgroup (%.2f anon) per container",
		res.Containers, res.MemAvailableMiB, res.PSSMiB, res.ShimPSSMiB, res.CgroupMiB, res.CgroupAnonMiB)
	if m.counted != grow {
		r.report.Notes = append(r.report.Notes, fmt.Sprintf(
			"warm-memory: the pool grew by %d but containerd shows %d new tasks (other activity on the host?)", grow, m.counted))
	}
	return nil
}

// Package runtimetest is the conformance suite of the agent's runtime port.
// Every adapter's tests call Run with a Harness around a real runtime; the
// suite starts containers with probe commands (Spec.Args) and checks what a
// sandbox must be: who the process is, what it can write, reach and see,
// which limits hold, and that the lifecycle (start, wait, stop, destroy,
// inspect, list) behaves the same on every adapter.
//
// Probes are POSIX shell scripts run from the test image: it needs /bin/sh
// and coreutils, and bubblewrap for the bubblewrap case. A probe reports by
// writing key=value lines into the socket directory, the one host directory
// a sandbox can write to. The suite runs as root: it hands each container a
// socket directory owned by uid 1000, as the agent does.
package runtimetest

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/agent/runtime"
	"github.com/sandboxhq/sandbox/executor/executorapi"
	"github.com/sandboxhq/sandbox/internal/testenv"
)

// Harness is what an adapter's test hands to Run.
type Harness struct {
	// Runtime is the adapter under test.
	Runtime runtime.Runtime
	// Image is the image probes run from, as the runtime names it.
	Image string
	// MissingImage names an image the runtime does not have; empty uses a
	// made-up name.
	MissingImage string
	// CgroupLimits reads the limits enforced on a running container. Nil
	// skips the cgroup checks, for adapters that cannot see them.
	CgroupLimits func(ctx context.Context, id string) (CgroupLimits, error)
	// Leftovers reports anything the runtime still holds for a destroyed
	// container (records, processes, snapshots, cgroups). Nil skips it.
	Leftovers func(ctx context.Context, id string) error
	// ExtraMounts are mount points besides the standard ones that the
	// adapter is known to add (none for containerd).
	ExtraMounts []string
	// Reopen returns a new instance of the adapter over the same runtime,
	// as an agent gets when it restarts (the old instance stays open). Nil
	// skips the recovery case.
	Reopen func(t *testing.T) runtime.Runtime
	// Simulated, when set, says why the runtime runs no real processes (an
	// API server fake with a stand-in for the kubelet, say): the cases that
	// need a real container and kernel are skipped. A simulation writes the
	// ready files of the lifecycle probes into the socket directory itself.
	Simulated string
	// NoSocketDir, when set, says why the runtime does not bind
	// Spec.SocketDir into its containers: starting without one is no
	// error, and the cases that read what a probe writes there are skipped
	// (unless Simulated writes it).
	NoSocketDir string
}

// CgroupLimits are the resource limits as the kernel enforces them.
type CgroupLimits struct {
	MemoryBytes int64
	// MemorySwapBytes is memory plus swap; equal to MemoryBytes means no swap.
	MemorySwapBytes int64
	CPUQuotaMicros  int64
	CPUPeriodMicros int64
	Pids            int64
}

// testLimits are small, so that the limit checks bite quickly.
var testLimits = sandbox.Limits{CPUMillis: 500, MemoryMiB: 128, Pids: 64, DiskMiB: 16, MaxExecutionTimeoutSeconds: 60}

// standardMounts are the only mount points a sandbox may have.
var standardMounts = []string{"/", "/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/workspace", "/tmp", executorapi.SocketDir}

// Run runs the whole suite against h.
func Run(t *testing.T, h Harness) {
	if h.MissingImage == "" {
		h.MissingImage = "localhost/sandbox/runtimetest-missing:latest"
	}
	s := &suite{h: h, agent: "runtimetest-" + randomHex(4)}
	// Whatever a failed case left behind goes too.
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		left, err := h.Runtime.List(ctx, map[string]string{runtime.LabelAgent: s.agent})
		if err != nil {
			t.Errorf("list leftovers: %v", err)
			return
		}
		for _, st := range left {
			if err := h.Runtime.Destroy(ctx, st.ID); err != nil {
				t.Errorf("destroy leftover %s: %v", st.ID, err)
			}
		}
	})
	cases := []struct {
		name string
		fn   func(t *testing.T)
	}{
		{"StartInspect", s.testStartInspect},
		{"ExecutorClaimRefill", s.testExecutor},
		{"ExitCodes", s.testExitCodes},
		{"Identity", s.testIdentity},
		{"Environment", s.testEnvironment},
		{"Filesystem", s.testFilesystem},
		{"Mounts", s.testMounts},
		{"Network", s.testNetwork},
		{"Devices", s.testDevices},
		{"Bubblewrap", s.testBubblewrap},
		{"CgroupLimits", s.testCgroupLimits},
		{"Update", s.testUpdate},
		{"UpdateErrors", s.testUpdateErrors},
		{"Group", s.testGroup},
		{"OOMKill", s.testOOMKill},
		{"PidsLimit", s.testPidsLimit},
		{"CPUQuota", s.testCPUQuota},
		{"Recovery", s.testRecovery},
		{"Stop", s.testStop},
		{"Destroy", s.testDestroy},
		{"List", s.testList},
		{"LogPath", s.testLogPath},
		{"StartFailureLeavesNothing", s.testStartFailure},
		{"DuplicateID", s.testDuplicateID},
		{"InvalidLimits", s.testInvalidLimits},
	}
	for _, c := range cases {
		t.Run(c.name, c.fn)
	}
}

type suite struct {
	h Harness
	// agent labels every container of this run, for the final sweep.
	agent string
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// needsKernel skips a case that runs real programs in a real container.
func (s *suite) needsKernel(t *testing.T) {
	t.Helper()
	if s.h.Simulated != "" {
		t.Skip("needs a real container: " + s.h.Simulated)
	}
}

// needsSocketDir skips a case that reads what its probe writes into the
// socket directory.
func (s *suite) needsSocketDir(t *testing.T) {
	t.Helper()
	if s.h.NoSocketDir != "" && s.h.Simulated == "" {
		t.Skip("reads probe output from the socket directory: " + s.h.NoSocketDir)
	}
}

// spec returns a Spec with a fresh id and socket directory running args.
func (s *suite) spec(t *testing.T, args ...string) runtime.Spec {
	t.Helper()
	id := "rtt-" + randomHex(6)
	return runtime.Spec{
		ID:        id,
		Image:     s.h.Image,
		Limits:    testLimits,
		SocketDir: socketDir(t),
		Env:       []string{"SANDBOX_TEST=1"},
		Labels:    map[string]string{runtime.LabelAgent: s.agent, runtime.LabelSession: id},
		Args:      args,
	}
}

// script runs a shell script in the container.
func (s *suite) script(t *testing.T, script string) runtime.Spec {
	return s.spec(t, "/bin/sh", "-c", script)
}

// socketDir is a host directory owned by the sandbox user, as the agent
// makes them.
func socketDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.Chown(dir, 1000, 1000); err != nil {
		t.Fatalf("chown socket dir: %v", err)
	}
	return dir
}

// start starts spec and destroys the container when the test ends.
func (s *suite) start(t *testing.T, spec runtime.Spec) runtime.Status {
	t.Helper()
	st, err := s.h.Runtime.Start(t.Context(), spec)
	if err != nil {
		t.Fatalf("Start %s: %v", spec.ID, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := s.h.Runtime.Destroy(ctx, spec.ID); err != nil {
			t.Errorf("Destroy %s: %v", spec.ID, err)
		}
	})
	return st
}

// run starts spec and waits for it to exit, returning the exit code.
func (s *suite) run(t *testing.T, spec runtime.Spec) int {
	t.Helper()
	s.start(t, spec)
	ch, err := s.h.Runtime.Wait(t.Context(), spec.ID)
	if err != nil {
		t.Fatalf("Wait %s: %v", spec.ID, err)
	}
	return waitExit(t, ch, time.Minute).ExitCode
}

// runOK runs spec, requires exit 0 and returns the probe's key=value output.
func (s *suite) runOK(t *testing.T, spec runtime.Spec) map[string]string {
	t.Helper()
	if code := s.run(t, spec); code != 0 {
		t.Fatalf("probe exited %d, want 0", code)
	}
	out := readKV(t, filepath.Join(spec.SocketDir, "out"))
	t.Logf("probe output: %v", out)
	return out
}

func waitExit(t *testing.T, ch <-chan runtime.ExitResult, timeout time.Duration) runtime.ExitResult {
	t.Helper()
	select {
	case res, ok := <-ch:
		if !ok {
			t.Fatal("wait channel closed without a result")
		}
		if res.Err != nil {
			t.Fatalf("wait: %v", res.Err)
		}
		return res
	case <-time.After(timeout):
		t.Fatalf("container did not exit within %s", timeout)
	}
	return runtime.ExitResult{}
}

// readKV parses key=value lines; a repeated key keeps the last value.
func readKV(t *testing.T, path string) map[string]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatalf("read probe output: %v", err)
	}
	defer f.Close()
	out := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			out[k] = v
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("read probe output: %v", err)
	}
	return out
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// checkKV compares probe output with what is expected, key by key.
func checkKV(t *testing.T, got, want map[string]string) {
	t.Helper()
	for _, k := range slices.Sorted(maps.Keys(want)) {
		if got[k] != want[k] {
			t.Errorf("%s = %q, want %q", k, got[k], want[k])
		}
	}
}

func (s *suite) testStartInspect(t *testing.T) {
	spec := s.spec(t, "sleep", "300")
	st := s.start(t, spec)
	if st.ID != spec.ID || !st.Running || st.Pid == 0 {
		t.Fatalf("Start = %+v, want id %s running with a pid", st, spec.ID)
	}
	got, err := s.h.Runtime.Inspect(t.Context(), spec.ID)
	if err != nil {
		t.Fatalf("Inspect: %v", err)
	}
	if !got.Running || got.Pid != st.Pid || got.CreatedAt.IsZero() {
		t.Errorf("Inspect = %+v, want running with pid %d and a creation time", got, st.Pid)
	}
	for k, v := range spec.Labels {
		if got.Labels[k] != v {
			t.Errorf("label %s = %q, want %q", k, got.Labels[k], v)
		}
	}
}

func (s *suite) testExitCodes(t *testing.T) {
	for _, code := range []int{0, 7} {
		t.Run(fmt.Sprint(code), func(t *testing.T) {
			spec := s.script(t, fmt.Sprintf("exit %d", code))
			if got := s.run(t, spec); got != code {
				t.Fatalf("exit code %d, want %d", got, code)
			}
			st, err := s.h.Runtime.Inspect(t.Context(), spec.ID)
			if err != nil {
				t.Fatalf("Inspect: %v", err)
			}
			if st.Running || st.ExitCode != code {
				t.Errorf("Inspect after exit = %+v, want stopped with exit code %d", st, code)
			}
		})
	}
}

// testIdentity: the executor is uid/gid 1000 with no capabilities in any
// set and no_new_privs.
func (s *suite) testIdentity(t *testing.T) {
	s.needsKernel(t)
	s.needsSocketDir(t)
	out := s.runOK(t, s.script(t, `
grep -E '^(Uid|Gid|Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):' /proc/self/status |
  sed -e 's/:[[:space:]]*/=/' -e 's/[[:space:]]\{1,\}/ /g' -e 's/ $//' > /run/sandbox/out`))
	none := "0000000000000000"
	checkKV(t, out, map[string]string{
		"Uid": "1000 1000 1000 1000", "Gid": "1000 1000 1000 1000", "Groups": "1000",
		"CapInh": none, "CapPrm": none, "CapEff": none, "CapBnd": none, "CapAmb": none,
		"NoNewPrivs": "1",
	})
}

func (s *suite) testEnvironment(t *testing.T) {
	s.needsKernel(t)
	s.needsSocketDir(t)
	spec := s.script(t, `{
echo "test=$SANDBOX_TEST"
echo "cwd=$(pwd)"
echo "hostname=$(cat /proc/sys/kernel/hostname)"
command -v sh >/dev/null && echo "path=ok"
} > /run/sandbox/out`)
	checkKV(t, s.runOK(t, spec), map[string]string{"test": "1", "cwd": "/workspace", "hostname": "sandbox", "path": "ok"})
}

// testFilesystem: the root is read-only, /workspace and /tmp writable and
// bounded, and the /proc files the usual masks guard are out of reach for
// the unprivileged executor even without those masks.
func (s *suite) testFilesystem(t *testing.T) {
	s.needsKernel(t)
	s.needsSocketDir(t)
	over := testLimits.DiskMiB + 4
	spec := s.script(t, fmt.Sprintf(`
probe() { name=$1; shift; if ( "$@" ) >/dev/null 2>&1; then echo "$name=yes"; else echo "$name=no"; fi; }
{
probe root_writable touch /probe
probe etc_writable touch /etc/probe
probe usr_writable touch /usr/bin/probe
probe workspace_writable touch /workspace/probe
probe tmp_writable touch /tmp/probe
probe devshm_writable touch /dev/shm/probe
probe workspace_over_limit dd if=/dev/zero of=/workspace/big bs=1M count=%d
probe kcore_readable head -c 1 /proc/kcore
probe proc_sys_writable sh -c 'echo 3 > /proc/sys/vm/drop_caches'
probe proc_sysrq_writable sh -c 'echo h > /proc/sysrq-trigger'
probe sys_writable touch /sys/probe
probe mknod mknod /tmp/null c 1 3
echo "workspace_stat=$(stat -c %%u:%%g:%%a /workspace)"
echo "tmp_stat=$(stat -c %%a /tmp)"
} > /run/sandbox/out`, over))
	checkKV(t, s.runOK(t, spec), map[string]string{
		"root_writable": "no", "etc_writable": "no", "usr_writable": "no",
		"workspace_writable": "yes", "tmp_writable": "yes", "devshm_writable": "yes",
		"workspace_over_limit": "no",
		"kcore_readable":       "no", "proc_sys_writable": "no", "proc_sysrq_writable": "no",
		"sys_writable": "no", "mknod": "no",
		"workspace_stat": "1000:1000:755", "tmp_stat": "1777",
	})
}

// testMounts: only the standard mount points exist, with the options that
// keep them harmless.
func (s *suite) testMounts(t *testing.T) {
	s.needsKernel(t)
	s.needsSocketDir(t)
	spec := s.script(t, `cat /proc/self/mounts > /run/sandbox/mounts`)
	if code := s.run(t, spec); code != 0 {
		t.Fatalf("probe exited %d", code)
	}
	raw, err := os.ReadFile(filepath.Join(spec.SocketDir, "mounts"))
	if err != nil {
		t.Fatal(err)
	}
	opts := map[string][]string{}
	for line := range strings.Lines(string(raw)) {
		f := strings.Fields(line)
		if len(f) < 4 {
			continue
		}
		opts[f[1]] = strings.Split(f[3], ",")
	}
	allowed := append(slices.Clone(standardMounts), s.h.ExtraMounts...)
	for _, mp := range slices.Sorted(maps.Keys(opts)) {
		if !slices.Contains(allowed, mp) {
			t.Errorf("unexpected mount %s (%s)", mp, strings.Join(opts[mp], ","))
		}
	}
	want := []struct {
		mount string
		opts  []string
	}{
		{"/", []string{"ro"}},
		{"/sys", []string{"ro", "nosuid", "nodev", "noexec"}},
		{"/proc", []string{"nosuid", "nodev", "noexec"}},
		{"/workspace", []string{"rw", "nosuid", "nodev"}},
		{"/tmp", []string{"rw", "nosuid", "nodev"}},
		{executorapi.SocketDir, []string{"rw", "nosuid", "nodev", "noexec"}},
	}
	for _, w := range want {
		got, ok := opts[w.mount]
		if !ok {
			t.Errorf("mount %s missing", w.mount)
			continue
		}
		for _, o := range w.opts {
			if !slices.Contains(got, o) {
				t.Errorf("mount %s options %v lack %s", w.mount, got, o)
			}
		}
	}
}

// testNetwork: the only interface is loopback.
func (s *suite) testNetwork(t *testing.T) {
	s.needsKernel(t)
	s.needsSocketDir(t)
	spec := s.script(t, `tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sed 's/^/if=/' > /run/sandbox/out; echo "count=$(tail -n +3 /proc/net/dev | wc -l)" >> /run/sandbox/out`)
	checkKV(t, s.runOK(t, spec), map[string]string{"if": "lo", "count": "1"})
}

// testDevices: only the harmless character devices exist.
func (s *suite) testDevices(t *testing.T) {
	s.needsKernel(t)
	s.needsSocketDir(t)
	spec := s.script(t, `{
for f in /dev/* /dev/pts/* /dev/shm/* /dev/mqueue/*; do
  if [ -h "$f" ]; then continue; fi
  if [ -b "$f" ]; then echo "block=$f"; elif [ -c "$f" ]; then echo "char=$f"; fi
done
echo "urandom=$(head -c 8 /dev/urandom | wc -c)"
echo x > /dev/null && echo "null=ok"
} > /run/sandbox/out`)
	if code := s.run(t, spec); code != 0 {
		t.Fatalf("probe exited %d", code)
	}
	raw, err := os.ReadFile(filepath.Join(spec.SocketDir, "out"))
	if err != nil {
		t.Fatal(err)
	}
	// Symlinks (/dev/ptmx, /dev/fd, /dev/stdin...) are skipped: they point
	// into /proc or /dev/pts, which are checked themselves.
	allowed := []string{"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty", "/dev/pts/ptmx"}
	var chars []string
	for line := range strings.Lines(string(raw)) {
		k, v, _ := strings.Cut(strings.TrimSpace(line), "=")
		switch k {
		case "block":
			t.Errorf("block device %s in the container", v)
		case "char":
			chars = append(chars, v)
			if !slices.Contains(allowed, v) {
				t.Errorf("unexpected character device %s", v)
			}
		case "urandom":
			if v != "8" {
				t.Errorf("read %s bytes from /dev/urandom, want 8", v)
			}
		}
	}
	for _, d := range []string{"/dev/null", "/dev/zero", "/dev/urandom", "/dev/tty"} {
		if !slices.Contains(chars, d) {
			t.Errorf("device %s missing (have %v)", d, chars)
		}
	}
	if !strings.Contains(string(raw), "null=ok") {
		t.Error("cannot write /dev/null")
	}
}

// testBubblewrap: the executor can run user code under bubblewrap with its
// own /proc and every namespace unshared.
func (s *suite) testBubblewrap(t *testing.T) {
	s.needsKernel(t)
	s.needsSocketDir(t)
	spec := s.script(t, `
if ! command -v bwrap >/dev/null; then echo "bwrap=missing" > /run/sandbox/out; exit 0; fi
bwrap --ro-bind / / --proc /proc --dev /dev --tmpfs /tmp --unshare-all --die-with-parent --new-session \
  /bin/sh -c 'echo "pid=$$"; echo "ifs=$(tail -n +3 /proc/net/dev | wc -l)"' > /run/sandbox/out 2>/run/sandbox/err
echo "exit=$?" >> /run/sandbox/out`)
	out := s.runOK(t, spec)
	if out["bwrap"] == "missing" {
		testenv.Unavailable(t, "image %s has no bwrap", s.h.Image)
	}
	if out["exit"] != "0" {
		errText, _ := os.ReadFile(filepath.Join(spec.SocketDir, "err"))
		t.Fatalf("bwrap exited %s: %s", out["exit"], errText)
	}
	// bwrap's own init is pid 1 in the new pid namespace, so the shell is 2.
	checkKV(t, out, map[string]string{"pid": "2", "ifs": "1"})
}

func (s *suite) testCgroupLimits(t *testing.T) {
	if s.h.CgroupLimits == nil {
		t.Skip("the harness cannot read cgroup limits")
	}
	spec := s.spec(t, "sleep", "300")
	spec.Limits = sandbox.Limits{CPUMillis: 250, MemoryMiB: 96, Pids: 48, DiskMiB: 8, MaxExecutionTimeoutSeconds: 60}
	s.start(t, spec)
	got, err := s.h.CgroupLimits(t.Context(), spec.ID)
	if err != nil {
		t.Fatalf("read cgroup limits: %v", err)
	}
	want := CgroupLimits{MemoryBytes: 96 << 20, MemorySwapBytes: 96 << 20, CPUQuotaMicros: 25000, CPUPeriodMicros: 100000, Pids: 48}
	if got != want {
		t.Errorf("cgroup limits = %+v, want %+v", got, want)
	}
}

// testUpdate: a running container (as a warm one is before its claim) gets
// new cpu, memory (still without swap) and pids limits on its cgroup, and
// new labels beside its old ones, visible to Inspect and List.
func (s *suite) testUpdate(t *testing.T) {
	spec := s.spec(t, "sleep", "300")
	s.start(t, spec)
	claim := "claimed-" + randomHex(4)
	limits := sandbox.Limits{CPUMillis: 1500, MemoryMiB: 200, Pids: 100, DiskMiB: spec.Limits.DiskMiB, MaxExecutionTimeoutSeconds: 30}
	err := s.h.Runtime.Update(t.Context(), spec.ID, runtime.Update{
		Limits: &limits,
		Labels: map[string]string{runtime.LabelSession: claim, "sandbox.test.claim": claim},
	})
	if err != nil {
		t.Fatalf("Update: %v", err)
	}
	if s.h.CgroupLimits != nil {
		got, err := s.h.CgroupLimits(t.Context(), spec.ID)
		if err != nil {
			t.Fatalf("read cgroup limits: %v", err)
		}
		want := CgroupLimits{MemoryBytes: 200 << 20, MemorySwapBytes: 200 << 20, CPUQuotaMicros: 150000, CPUPeriodMicros: 100000, Pids: 100}
		if got != want {
			t.Errorf("cgroup limits after Update = %+v, want %+v", got, want)
		}
	}
	wantLabels := map[string]string{runtime.LabelAgent: s.agent, runtime.LabelSession: claim, "sandbox.test.claim": claim}
	st, err := s.h.Runtime.Inspect(t.Context(), spec.ID)
	if err != nil {
		t.Fatalf("Inspect: %v", err)
	}
	if !st.Running {
		t.Errorf("Inspect after Update = %+v, want running", st)
	}
	checkKV(t, st.Labels, wantLabels)
	l, err := s.h.Runtime.List(t.Context(), map[string]string{runtime.LabelSession: claim})
	if err != nil || len(l) != 1 || l[0].ID != spec.ID {
		t.Fatalf("List by the new session label = %v, %v; want %s", l, err, spec.ID)
	}
	checkKV(t, l[0].Labels, wantLabels)

	// Labels alone leave the limits as they are.
	if err := s.h.Runtime.Update(t.Context(), spec.ID, runtime.Update{Labels: map[string]string{"sandbox.test.more": "1"}}); err != nil {
		t.Fatalf("Update of labels alone: %v", err)
	}
	if st, err = s.h.Runtime.Inspect(t.Context(), spec.ID); err != nil {
		t.Fatalf("Inspect: %v", err)
	}
	checkKV(t, st.Labels, map[string]string{runtime.LabelSession: claim, "sandbox.test.more": "1"})
	if s.h.CgroupLimits != nil {
		got, err := s.h.CgroupLimits(t.Context(), spec.ID)
		if err != nil {
			t.Fatalf("read cgroup limits: %v", err)
		}
		if got.MemoryBytes != 200<<20 || got.Pids != 100 {
			t.Errorf("cgroup limits after an Update of labels = %+v, want those of the first Update", got)
		}
	}

	// Limits shrink as well as grow (on cgroup v1 the memory and
	// memory+swap limits must then be written in the other order).
	limits = sandbox.Limits{CPUMillis: 250, MemoryMiB: 64, Pids: 32, DiskMiB: spec.Limits.DiskMiB}
	if err := s.h.Runtime.Update(t.Context(), spec.ID, runtime.Update{Limits: &limits}); err != nil {
		t.Fatalf("Update to smaller limits: %v", err)
	}
	if s.h.CgroupLimits != nil {
		got, err := s.h.CgroupLimits(t.Context(), spec.ID)
		if err != nil {
			t.Fatalf("read cgroup limits: %v", err)
		}
		want := CgroupLimits{MemoryBytes: 64 << 20, MemorySwapBytes: 64 << 20, CPUQuotaMicros: 25000, CPUPeriodMicros: 100000, Pids: 32}
		if got != want {
			t.Errorf("cgroup limits after a shrinking Update = %+v, want %+v", got, want)
		}
	}

	// An adapter may write only what changes: cpu alone, then nothing.
	limits.CPUMillis = 500
	for _, what := range []string{"cpu alone", "the same limits again"} {
		if err := s.h.Runtime.Update(t.Context(), spec.ID, runtime.Update{Limits: &limits}); err != nil {
			t.Fatalf("Update of %s: %v", what, err)
		}
		if s.h.CgroupLimits != nil {
			got, err := s.h.CgroupLimits(t.Context(), spec.ID)
			if err != nil {
				t.Fatalf("read cgroup limits: %v", err)
			}
			want := CgroupLimits{MemoryBytes: 64 << 20, MemorySwapBytes: 64 << 20, CPUQuotaMicros: 50000, CPUPeriodMicros: 100000, Pids: 32}
			if got != want {
				t.Errorf("cgroup limits after an Update of %s = %+v, want %+v", what, got, want)
			}
		}
	}
}

// testUpdateErrors: an unknown container is ErrNotFound; limits the kernel
// would read as "unlimited", or a disk size other than the container's,
// are ErrInvalidArgument and change nothing.
func (s *suite) testUpdateErrors(t *testing.T) {
	rt := s.h.Runtime
	unknown := "rtt-never-existed-" + randomHex(4)
	ok := testLimits
	for name, u := range map[string]runtime.Update{
		"labels": {Labels: map[string]string{runtime.LabelSession: "x"}},
		"limits": {Limits: &ok},
	} {
		if err := rt.Update(t.Context(), unknown, u); !errors.Is(err, runtime.ErrNotFound) {
			t.Errorf("Update (%s) of an unknown container: %v, want ErrNotFound", name, err)
		}
	}

	spec := s.spec(t, "sleep", "300")
	s.start(t, spec)
	cases := []struct {
		name   string
		modify func(*sandbox.Limits)
	}{
		{"zero cpu", func(l *sandbox.Limits) { l.CPUMillis = 0 }},
		{"zero memory", func(l *sandbox.Limits) { l.MemoryMiB = 0 }},
		{"zero pids", func(l *sandbox.Limits) { l.Pids = 0 }},
		{"negative memory", func(l *sandbox.Limits) { l.MemoryMiB = -1 }},
		{"other disk", func(l *sandbox.Limits) { l.DiskMiB = spec.Limits.DiskMiB * 2 }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			l := spec.Limits
			l.MemoryMiB *= 2
			c.modify(&l)
			err := rt.Update(t.Context(), spec.ID, runtime.Update{Limits: &l, Labels: map[string]string{"sandbox.test.bad": "1"}})
			if !errors.Is(err, sandbox.ErrInvalidArgument) {
				t.Fatalf("Update with %+v: %v, want ErrInvalidArgument", l, err)
			}
		})
	}
	st, err := rt.Inspect(t.Context(), spec.ID)
	if err != nil {
		t.Fatalf("Inspect: %v", err)
	}
	if _, ok := st.Labels["sandbox.test.bad"]; ok || !st.Running {
		t.Errorf("after refused Updates: %+v, want running without their label", st)
	}
	if s.h.CgroupLimits != nil {
		got, err := s.h.CgroupLimits(t.Context(), spec.ID)
		if err != nil {
			t.Fatalf("read cgroup limits: %v", err)
		}
		if got.MemoryBytes != spec.Limits.MemoryMiB<<20 {
			t.Errorf("memory limit after refused Updates = %d, want the original %d", got.MemoryBytes, spec.Limits.MemoryMiB<<20)
		}
	}
}

// testGroup: containers that share a Group live and die independently: the
// first of a group can go while the others keep running, a new one joins,
// and each one stops, updates and is destroyed on its own.
func (s *suite) testGroup(t *testing.T) {
	s.needsSocketDir(t)
	rt := s.h.Runtime
	group := s.agent + "/group-" + randomHex(4)
	member := func() runtime.Spec {
		spec := s.script(t, `trap 'exit 3' TERM; touch /run/sandbox/ready; sleep 300 & wait`)
		spec.Group = group
		s.start(t, spec)
		eventually(t, 30*time.Second, "the probe to be ready", func() bool {
			_, err := os.Stat(filepath.Join(spec.SocketDir, "ready"))
			return err == nil
		})
		return spec
	}
	first, second := member(), member()
	if err := rt.Destroy(t.Context(), first.ID); err != nil {
		t.Fatalf("Destroy the group's first container: %v", err)
	}
	if s.h.Leftovers != nil {
		if err := s.h.Leftovers(t.Context(), first.ID); err != nil {
			t.Errorf("after Destroy: %v", err)
		}
	}
	third := member()
	for _, spec := range []runtime.Spec{second, third} {
		if st, err := rt.Inspect(t.Context(), spec.ID); err != nil || !st.Running {
			t.Fatalf("Inspect %s after its group's first container went = %+v, %v; want running", spec.ID, st, err)
		}
	}
	l := third.Limits
	l.MemoryMiB *= 2
	if err := rt.Update(t.Context(), third.ID, runtime.Update{Limits: &l}); err != nil {
		t.Fatalf("Update a container of a group: %v", err)
	}
	ch, err := rt.Wait(t.Context(), second.ID)
	if err != nil {
		t.Fatalf("Wait: %v", err)
	}
	if err := rt.Stop(t.Context(), second.ID, time.Minute); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if res := waitExit(t, ch, time.Minute); res.ExitCode != 3 {
		t.Errorf("exit code %d, want 3", res.ExitCode)
	}
	if st, err := rt.Inspect(t.Context(), third.ID); err != nil || !st.Running {
		t.Errorf("Inspect %s after another of its group stopped = %+v, %v; want running", third.ID, st, err)
	}
	for _, spec := range []runtime.Spec{second, third} {
		if err := rt.Destroy(t.Context(), spec.ID); err != nil {
			t.Fatalf("Destroy %s: %v", spec.ID, err)
		}
		if s.h.Leftovers != nil {
			if err := s.h.Leftovers(t.Context(), spec.ID); err != nil {
				t.Errorf("after Destroy: %v", err)
			}
		}
	}
}

// testOOMKill: a process that outgrows the memory limit is killed by the
// kernel (no swap to escape into).
func (s *suite) testOOMKill(t *testing.T) {
	s.needsKernel(t)
	s.needsSocketDir(t)
	spec := s.script(t, `x=$(head -c 256m /dev/zero | tr '\0' a); echo survived > /run/sandbox/out`)
	spec.Limits.MemoryMiB = 32
	spec.Limits.DiskMiB = 8
	if code := s.run(t, spec); code != 137 {
		t.Errorf("memory hog exited %d, want 137 (SIGKILL by the OOM killer)", code)
	}
	if _, err := os.Stat(filepath.Join(spec.SocketDir, "out")); err == nil {
		t.Error("memory hog survived")
	}
}

// testPidsLimit: a container cannot have more processes than its pids
// limit; the forks past it fail, and the container goes on.
func (s *suite) testPidsLimit(t *testing.T) {
	s.needsKernel(t)
	s.needsSocketDir(t)
	// Python, because a shell at the limit cannot even fork to count.
	spec := s.spec(t, "python3", "-c", `
import os, signal, time
kids = []
for _ in range(60):
    try:
        pid = os.fork()
    except OSError:
        continue
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    kids.append(pid)
open("/run/sandbox/out", "w").write(str(len(kids)))
for pid in kids:
    os.kill(pid, signal.SIGKILL)
`)
	spec.Limits.Pids = 16
	if code := s.run(t, spec); code != 0 {
		t.Fatalf("probe exited %d", code)
	}
	b, err := os.ReadFile(filepath.Join(spec.SocketDir, "out"))
	if err != nil {
		t.Fatalf("probe wrote nothing: %v", err)
	}
	var n int
	if _, err := fmt.Sscan(string(b), &n); err != nil || n >= 16 || n == 0 {
		t.Errorf("%q children under a pids limit of 16 (with the parent itself), want between 1 and 15", b)
	}
}

// testCPUQuota: a busy loop under a cpu limit of 0.2 cores gets about 0.2 s
// of CPU in 1.5 s; the bound is generous (0.6 s: unthrottled it would be
// 1.5 s) so that a loaded host cannot make it fail.
func (s *suite) testCPUQuota(t *testing.T) {
	s.needsKernel(t)
	s.needsSocketDir(t)
	spec := s.spec(t, "python3", "-c", `
import os, time
end = time.monotonic() + 1.5
while time.monotonic() < end:
    pass
t = os.times()
open("/run/sandbox/out", "w").write("%.3f" % (t.user + t.system))
`)
	spec.Limits.CPUMillis = 200
	if code := s.run(t, spec); code != 0 {
		t.Fatalf("probe exited %d", code)
	}
	b, err := os.ReadFile(filepath.Join(spec.SocketDir, "out"))
	if err != nil {
		t.Fatalf("probe wrote nothing: %v", err)
	}
	var used float64
	if _, err := fmt.Sscan(string(b), &used); err != nil || used > 0.6 {
		t.Errorf("a busy loop under 0.2 cpu used %s s of CPU in 1.5 s, want at most 0.6", b)
	}
}

// testRecovery: a new instance of the adapter, as a restarted agent makes,
// finds a container the old one started, with its labels, waits on it,
// applies new limits to it, stops and destroys it.
func (s *suite) testRecovery(t *testing.T) {
	if s.h.Reopen == nil {
		t.Skip("the harness cannot reopen the adapter")
	}
	s.needsSocketDir(t)
	spec := s.script(t, `trap 'exit 3' TERM; touch /run/sandbox/ready; sleep 300 & wait`)
	spec.Labels = map[string]string{"sandbox.test.recovery": "yes"}
	s.start(t, spec)
	eventually(t, 30*time.Second, "the probe to be ready", func() bool {
		_, err := os.Stat(filepath.Join(spec.SocketDir, "ready"))
		return err == nil
	})
	rt := s.h.Reopen(t)
	st, err := rt.Inspect(t.Context(), spec.ID)
	if err != nil || !st.Running || st.Labels["sandbox.test.recovery"] != "yes" {
		t.Fatalf("Inspect from a new instance: %+v, %v; want it running with its labels", st, err)
	}
	l, err := rt.List(t.Context(), map[string]string{"sandbox.test.recovery": "yes"})
	if err != nil || len(l) != 1 || l[0].ID != spec.ID {
		t.Fatalf("List from a new instance: %v, %v", l, err)
	}
	limits := spec.Limits
	limits.CPUMillis, limits.MemoryMiB, limits.Pids = 300, limits.MemoryMiB+16, limits.Pids+8
	if err := rt.Update(t.Context(), spec.ID, runtime.Update{Limits: &limits}); err != nil {
		t.Fatalf("Update from a new instance (it has never seen the container's limits): %v", err)
	}
	if s.h.CgroupLimits != nil {
		got, err := s.h.CgroupLimits(t.Context(), spec.ID)
		if err != nil {
			t.Fatal(err)
		}
		if got.MemoryBytes != limits.MemoryMiB<<20 || got.MemorySwapBytes != limits.MemoryMiB<<20 || got.CPUQuotaMicros != 30000 || got.Pids != int64(limits.Pids) {
			t.Errorf("cgroup limits after an Update from a new instance: %+v", got)
		}
	}
	ch, err := rt.Wait(t.Context(), spec.ID)
	if err != nil {
		t.Fatalf("Wait from a new instance: %v", err)
	}
	if err := rt.Stop(t.Context(), spec.ID, time.Minute); err != nil {
		t.Fatalf("Stop from a new instance: %v", err)
	}
	if res := waitExit(t, ch, time.Minute); res.ExitCode != 3 {
		t.Errorf("exit code %d seen by the new instance, want 3", res.ExitCode)
	}
	if err := rt.Destroy(t.Context(), spec.ID); err != nil {
		t.Fatalf("Destroy from a new instance: %v", err)
	}
	if s.h.Leftovers != nil {
		if err := s.h.Leftovers(t.Context(), spec.ID); err != nil {
			t.Errorf("left behind: %v", err)
		}
	}
}

func (s *suite) testStop(t *testing.T) {
	s.needsSocketDir(t)
	cases := []struct {
		name    string
		script  string
		timeout time.Duration
		want    int
	}{
		// The shell is PID 1, which only gets signals it handles: trap TERM.
		{"graceful", `trap 'exit 3' TERM; touch /run/sandbox/ready; sleep 300 & wait`, time.Minute, 3},
		// sleep as PID 1 ignores SIGTERM, so Stop must fall back to SIGKILL.
		{"killed after timeout", `touch /run/sandbox/ready; exec sleep 300`, 300 * time.Millisecond, 137},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			spec := s.script(t, c.script)
			s.start(t, spec)
			ch, err := s.h.Runtime.Wait(t.Context(), spec.ID)
			if err != nil {
				t.Fatalf("Wait: %v", err)
			}
			eventually(t, 30*time.Second, "the probe to be ready", func() bool {
				_, err := os.Stat(filepath.Join(spec.SocketDir, "ready"))
				return err == nil
			})
			if err := s.h.Runtime.Stop(t.Context(), spec.ID, c.timeout); err != nil {
				t.Fatalf("Stop: %v", err)
			}
			if res := waitExit(t, ch, time.Minute); res.ExitCode != c.want {
				t.Errorf("exit code %d, want %d", res.ExitCode, c.want)
			}
			st, err := s.h.Runtime.Inspect(t.Context(), spec.ID)
			if err != nil {
				t.Fatalf("Inspect: %v", err)
			}
			if st.Running || st.ExitCode != c.want {
				t.Errorf("Inspect after Stop = %+v, want stopped with %d", st, c.want)
			}
			if err := s.h.Runtime.Stop(t.Context(), spec.ID, time.Second); err != nil {
				t.Errorf("Stop of a stopped container: %v", err)
			}
		})
	}
}

func (s *suite) testDestroy(t *testing.T) {
	ctx := t.Context()
	rt := s.h.Runtime
	spec := s.spec(t, "sleep", "300")
	s.start(t, spec)
	if err := rt.Destroy(ctx, spec.ID); err != nil {
		t.Fatalf("Destroy: %v", err)
	}
	if _, err := rt.Inspect(ctx, spec.ID); !errors.Is(err, runtime.ErrNotFound) {
		t.Errorf("Inspect after Destroy: %v, want ErrNotFound", err)
	}
	if _, err := rt.Wait(ctx, spec.ID); !errors.Is(err, runtime.ErrNotFound) {
		t.Errorf("Wait after Destroy: %v, want ErrNotFound", err)
	}
	if err := rt.Stop(ctx, spec.ID, time.Second); !errors.Is(err, runtime.ErrNotFound) {
		t.Errorf("Stop after Destroy: %v, want ErrNotFound", err)
	}
	if l, err := rt.List(ctx, map[string]string{runtime.LabelSession: spec.ID}); err != nil || len(l) != 0 {
		t.Errorf("List after Destroy = %v, %v; want nothing", l, err)
	}
	if s.h.Leftovers != nil {
		if err := s.h.Leftovers(ctx, spec.ID); err != nil {
			t.Errorf("after Destroy: %v", err)
		}
	}
	if err := rt.Destroy(ctx, spec.ID); err != nil {
		t.Errorf("second Destroy: %v", err)
	}
	if err := rt.Destroy(ctx, "rtt-never-existed-"+randomHex(4)); err != nil {
		t.Errorf("Destroy of an unknown id: %v", err)
	}
}

func (s *suite) testList(t *testing.T) {
	const groupLabel, memberLabel = "sandbox.test.group", "sandbox.test.member"
	group := randomHex(4)
	ids := map[string]string{}
	for _, member := range []string{"a", "b"} {
		spec := s.spec(t, "sleep", "300")
		spec.Labels[groupLabel] = group
		spec.Labels[memberLabel] = member
		s.start(t, spec)
		ids[member] = spec.ID
	}
	cases := []struct {
		name  string
		match map[string]string
		want  []string
	}{
		{"group", map[string]string{groupLabel: group}, []string{ids["a"], ids["b"]}},
		{"group and member", map[string]string{groupLabel: group, memberLabel: "b"}, []string{ids["b"]}},
		{"agent and member", map[string]string{runtime.LabelAgent: s.agent, groupLabel: group, memberLabel: "a"}, []string{ids["a"]}},
		{"no match", map[string]string{groupLabel: "no-such-group"}, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := s.h.Runtime.List(t.Context(), c.match)
			if err != nil {
				t.Fatalf("List: %v", err)
			}
			var gotIDs []string
			for _, st := range got {
				gotIDs = append(gotIDs, st.ID)
				if !st.Running || st.Pid == 0 {
					t.Errorf("List reports %+v, want running with a pid", st)
				}
			}
			slices.Sort(gotIDs)
			want := slices.Sorted(slices.Values(c.want))
			if !slices.Equal(gotIDs, want) {
				t.Errorf("List(%v) = %v, want %v", c.match, gotIDs, want)
			}
		})
	}
}

func (s *suite) testLogPath(t *testing.T) {
	s.needsKernel(t)
	// The executor's log matters while it runs, so check it then: at exit the
	// shim may still be copying the last lines when the exit event arrives.
	spec := s.script(t, `echo out-line; echo err-line >&2; exec sleep 60`)
	spec.LogPath = filepath.Join(t.TempDir(), "executor.log")
	s.start(t, spec)
	eventually(t, 30*time.Second, "both lines in the log", func() bool {
		b, _ := os.ReadFile(spec.LogPath)
		return strings.Contains(string(b), "out-line") && strings.Contains(string(b), "err-line")
	})
}

// testStartFailure: a Start that fails leaves nothing behind.
func (s *suite) testStartFailure(t *testing.T) {
	cases := []struct {
		name   string
		modify func(*runtime.Spec)
	}{
		{"missing image", func(sp *runtime.Spec) { sp.Image = s.h.MissingImage }},
		{"missing program", func(sp *runtime.Spec) { sp.Args = []string{"/nonexistent/program"} }},
		{"missing socket dir", func(sp *runtime.Spec) { sp.SocketDir = filepath.Join(sp.SocketDir, "missing") }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if c.name == "missing socket dir" && s.h.NoSocketDir != "" {
				t.Skip("the runtime does not use the socket directory: " + s.h.NoSocketDir)
			}
			spec := s.spec(t, "sleep", "300")
			c.modify(&spec)
			if _, err := s.h.Runtime.Start(t.Context(), spec); err == nil {
				_ = s.h.Runtime.Destroy(context.Background(), spec.ID)
				t.Fatal("Start succeeded, want an error")
			}
			if _, err := s.h.Runtime.Inspect(t.Context(), spec.ID); !errors.Is(err, runtime.ErrNotFound) {
				t.Errorf("Inspect after failed Start: %v, want ErrNotFound", err)
			}
			if s.h.Leftovers != nil {
				if err := s.h.Leftovers(t.Context(), spec.ID); err != nil {
					t.Errorf("after failed Start: %v", err)
				}
			}
		})
	}
}

// testDuplicateID: starting an id twice fails and leaves the first alone.
func (s *suite) testDuplicateID(t *testing.T) {
	spec := s.spec(t, "sleep", "300")
	first := s.start(t, spec)
	if _, err := s.h.Runtime.Start(t.Context(), spec); err == nil {
		t.Fatal("second Start with the same id succeeded")
	}
	st, err := s.h.Runtime.Inspect(t.Context(), spec.ID)
	if err != nil {
		t.Fatalf("Inspect: %v", err)
	}
	if !st.Running || st.Pid != first.Pid {
		t.Errorf("first container after a duplicate Start = %+v, want running with pid %d", st, first.Pid)
	}
}

// testInvalidLimits: a zero limit means "unlimited" to the kernel, so it is
// refused rather than passed on.
func (s *suite) testInvalidLimits(t *testing.T) {
	for _, field := range []string{"cpu", "memory", "pids", "disk"} {
		t.Run(field, func(t *testing.T) {
			spec := s.spec(t, "sleep", "300")
			switch field {
			case "cpu":
				spec.Limits.CPUMillis = 0
			case "memory":
				spec.Limits.MemoryMiB = 0
			case "pids":
				spec.Limits.Pids = 0
			case "disk":
				spec.Limits.DiskMiB = 0
			}
			_, err := s.h.Runtime.Start(t.Context(), spec)
			if !errors.Is(err, sandbox.ErrInvalidArgument) {
				_ = s.h.Runtime.Destroy(context.Background(), spec.ID)
				t.Fatalf("Start with zero %s limit: %v, want ErrInvalidArgument", field, err)
			}
		})
	}
}

package containerd_test

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/agent/runtime"
	"github.com/sandboxhq/sandbox/agent/runtime/containerd"
	"github.com/sandboxhq/sandbox/executor/executorapi"
)

// TestFootprint measures what idle executors cost the host and how long a
// cold start takes. It is a measurement, not a test, and runs only when
// SANDBOX_FOOTPRINT=N (the number of containers) is set:
//
//	SANDBOX_FOOTPRINT=50 go test -run Footprint -v ./agent/runtime/containerd/
//
// SANDBOX_FOOTPRINT_GROUP=K shares one shim among K containers (0: one each);
// SANDBOX_FOOTPRINT_ENV=A=1,B=2 adds to the executor's environment.
func TestFootprint(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("SANDBOX_FOOTPRINT"))
	if n <= 0 {
		t.Skip("a measurement: set SANDBOX_FOOTPRINT=N to run it")
	}
	rounds, _ := strconv.Atoi(os.Getenv("SANDBOX_FOOTPRINT_ROUNDS"))
	rounds = max(rounds, 1)
	f := footprint{n: n, run: fmt.Sprintf("fp%d", time.Now().UnixNano()%1e6)}
	f.group, _ = strconv.Atoi(os.Getenv("SANDBOX_FOOTPRINT_GROUP"))
	if e := os.Getenv("SANDBOX_FOOTPRINT_ENV"); e != "" {
		f.env = strings.Split(e, ",")
	}
	phases := &phaseLog{}
	f.rt, f.image = newRuntime(t, containerd.Config{Logger: slog.New(phases)})
	t.Cleanup(func() { f.destroy(t) })

	// MemAvailable moves with everything else on the host, so it is read
	// right before and after each step, and each round gives two deltas:
	// the drop when the containers start and the rise when they go.
	var deltas []float64
	for r := range rounds {
		before := memAvailable(t)
		f.start(t, r)
		time.Sleep(3 * time.Second) // let the executors and shims settle
		if hold := os.Getenv("SANDBOX_FOOTPRINT_HOLD"); hold != "" {
			d, _ := time.ParseDuration(hold)
			time.Sleep(d)
		}
		during := memAvailable(t)
		f.usage(t)
		f.claim(t)
		f.destroy(t)
		after := memAvailable(t)
		deltas = append(deltas, mb(before-during)/float64(n), mb(after-during)/float64(n))
		t.Logf("round %d: MemAvailable %.0f -> %.0f -> %.0f MiB", r, mb(before), mb(during), mb(after))
	}
	slices.Sort(deltas)
	per := func(v int64) float64 { return mb(v) / float64(n*rounds) }
	t.Logf("%d containers x %d rounds, shim group size %d, executor env %v", n, rounds, f.group, f.env)
	t.Logf("Start: %s", percentiles(f.starts))
	t.Logf("Start+health: %s", percentiles(f.healths))
	t.Logf("Update (a claim: session limits and label): %s", percentiles(f.updates))
	for _, k := range []string{"root", "task_create", "task_start"} {
		t.Logf("  of which %s: %s", k, percentiles(phases.get(k)))
	}
	t.Logf("shims per round: %d", f.shims/rounds)
	t.Logf("MemAvailable per container: median %.2f MiB of %d deltas (min %.2f, max %.2f)", deltas[len(deltas)/2], len(deltas), deltas[0], deltas[len(deltas)-1])
	t.Logf("PSS per container: executor %.2f MiB (anon %.2f) + shim %.2f MiB (anon %.2f) = %.2f MiB",
		per(f.pss), per(f.anon), per(f.shimPSS), per(f.shimAnon), per(f.pss+f.shimPSS))
	t.Logf("cgroup per container: usage %.2f MiB (kmem %.2f, rss %.2f)", per(f.cgUsage), per(f.cgKmem), per(f.cgRSS))
}

// footprint starts n idle executors as the agent does and sums what they use.
type footprint struct {
	n, group   int
	run, image string
	env        []string
	rt         *containerd.Runtime

	ids                    []string
	starts, healths        []time.Duration
	updates                []time.Duration
	pss, anon              int64
	shimPSS, shimAnon      int64
	shims                  int
	cgUsage, cgKmem, cgRSS int64
}

func (f *footprint) start(t *testing.T, round int) {
	for i := range f.n {
		dir := filepath.Join(t.TempDir(), "s")
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(dir, 1000, 1000); err != nil {
			t.Fatal(err)
		}
		spec := runtime.Spec{
			ID:        fmt.Sprintf("%s-%d-%03d", f.run, round, i),
			Image:     f.image,
			Limits:    sandbox.DefaultLimits,
			SocketDir: dir,
			Env: append([]string{
				"WORKSPACE_PATH=/workspace",
				"CONTROL_PLANE_URL=unix://" + executorapi.SocketDir + "/" + executorapi.AgentSocket,
				"EXECUTOR_SOCKET=" + executorapi.SocketDir + "/" + executorapi.ExecutorSocket,
				"LOG_LEVEL=info",
			}, f.env...),
			Labels: map[string]string{
				runtime.LabelAgent:    "footprint-" + f.run,
				runtime.LabelTemplate: "python-basic",
			},
			LogPath: filepath.Join(dir, "..", "executor.log"),
		}
		if f.group > 0 {
			spec.Group = fmt.Sprintf("%s-%d-g%d", f.run, round, i/f.group)
		}
		begin := time.Now()
		if _, err := f.rt.Start(t.Context(), spec); err != nil {
			t.Fatalf("Start %d: %v", i, err)
		}
		started := time.Now()
		f.ids = append(f.ids, spec.ID)
		waitHealth(t, dir, spec.LogPath)
		f.starts = append(f.starts, started.Sub(begin))
		f.healths = append(f.healths, time.Since(begin))
	}
}

func (f *footprint) usage(t *testing.T) {
	shims := map[int]bool{}
	for _, id := range f.ids {
		cg := filepath.Join("/sys/fs/cgroup/memory", f.rt.CgroupPath(id))
		for _, pid := range readPids(t, filepath.Join(cg, "cgroup.procs")) {
			f.pss += rollup(pid, "Pss:")
			f.anon += rollup(pid, "Anonymous:")
			if pp := ppid(pid); pp > 1 && isShim(pp) {
				shims[pp] = true
			}
		}
		f.cgUsage += readInt(t, filepath.Join(cg, "memory.usage_in_bytes"))
		f.cgKmem += readInt(t, filepath.Join(cg, "memory.kmem.usage_in_bytes"))
		f.cgRSS += memStat(t, filepath.Join(cg, "memory.stat"), "total_rss")
	}
	for pid := range shims {
		f.shimPSS += rollup(pid, "Pss:")
		f.shimAnon += rollup(pid, "Anonymous:")
	}
	f.shims += len(shims)
}

// claim applies a session's limits and label to every container, as the
// agent does when a session claims a warm one.
func (f *footprint) claim(t *testing.T) {
	l := sandbox.Limits{CPUMillis: 500, MemoryMiB: 256, Pids: 128, DiskMiB: sandbox.DefaultLimits.DiskMiB}
	for _, id := range f.ids {
		begin := time.Now()
		err := f.rt.Update(t.Context(), id, runtime.Update{Limits: &l, Labels: map[string]string{runtime.LabelSession: "ses-" + id}})
		if err != nil {
			t.Fatalf("Update %s: %v", id, err)
		}
		f.updates = append(f.updates, time.Since(begin))
	}
}

func (f *footprint) destroy(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	for _, id := range f.ids {
		if err := f.rt.Destroy(ctx, id); err != nil {
			t.Errorf("Destroy %s: %v", id, err)
		}
	}
	f.ids = nil
}

func mb(v int64) float64 { return float64(v) / (1 << 20) }

func percentiles(d []time.Duration) string {
	if len(d) == 0 {
		return "none"
	}
	s := slices.Clone(d)
	slices.Sort(s)
	at := func(p float64) time.Duration { return s[int(p*float64(len(s)-1)+0.5)] }
	return fmt.Sprintf("p50 %.1f ms, p90 %.1f ms, p99 %.1f ms, max %.1f ms (n=%d)",
		ms(at(0.5)), ms(at(0.9)), ms(at(0.99)), ms(s[len(s)-1]), len(s))
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func dropCaches() {
	_ = os.WriteFile("/proc/sys/vm/drop_caches", []byte("1"), 0)
	time.Sleep(500 * time.Millisecond)
}

// memAvailable is the median of a few samples of MemAvailable, in bytes.
func memAvailable(t *testing.T) int64 {
	dropCaches()
	var v []int64
	for range 5 {
		v = append(v, memStat(t, "/proc/meminfo", "MemAvailable:")*1024)
		time.Sleep(100 * time.Millisecond)
	}
	slices.Sort(v)
	return v[len(v)/2]
}

// memStat reads the number after key in a "key value" file.
func memStat(t *testing.T, file, key string) int64 {
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) >= 2 && fs[0] == key {
			v, _ := strconv.ParseInt(fs[1], 10, 64)
			return v
		}
	}
	t.Fatalf("%s has no %s", file, key)
	return 0
}

func readInt(t *testing.T, file string) int64 {
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	v, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	return v
}

func readPids(t *testing.T, file string) []int {
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	for _, f := range strings.Fields(string(b)) {
		p, _ := strconv.Atoi(f)
		out = append(out, p)
	}
	return out
}

// rollup reads one field of a process's smaps_rollup, in bytes.
func rollup(pid int, key string) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0
	}
	for line := range strings.Lines(string(b)) {
		if fs := strings.Fields(line); len(fs) >= 2 && fs[0] == key {
			v, _ := strconv.ParseInt(fs[1], 10, 64)
			return v * 1024
		}
	}
	return 0
}

func ppid(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The fields after the command (which may hold spaces) start after ")".
	s := string(b)
	fs := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	p, _ := strconv.Atoi(fs[1])
	return p
}

func isShim(pid int) bool {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	return strings.HasPrefix(string(b), "containerd-shim")
}

// waitHealth polls the executor's /health on its socket.
func waitHealth(t *testing.T, dir, logPath string) {
	sock := filepath.Join(dir, executorapi.ExecutorSocket)
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
	defer client.CloseIdleConnections()
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := client.Get("http://executor/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			logs, _ := os.ReadFile(logPath)
			t.Fatalf("no /health on %s: %v; log:\n%s", sock, err, logs)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// phaseLog is a slog handler that keeps the durations of the adapter's
// "container started" lines.
type phaseLog struct {
	mu sync.Mutex
	d  map[string][]time.Duration
}

func (p *phaseLog) Enabled(context.Context, slog.Level) bool { return true }
func (p *phaseLog) WithAttrs([]slog.Attr) slog.Handler       { return p }
func (p *phaseLog) WithGroup(string) slog.Handler            { return p }

func (p *phaseLog) Handle(_ context.Context, r slog.Record) error {
	if r.Message != "container started" {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.d == nil {
		p.d = map[string][]time.Duration{}
	}
	r.Attrs(func(a slog.Attr) bool {
		if a.Value.Kind() == slog.KindDuration {
			p.d[a.Key] = append(p.d[a.Key], a.Value.Duration())
		}
		return true
	})
	return nil
}

func (p *phaseLog) get(k string) []time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.d[k])
}

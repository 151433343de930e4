package main

import (
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/v1/sandboxv1connect"
	"github.com/sandboxhq/sandbox/internal/testenv"
)

func TestSummarize(t *testing.T) {
	var d []time.Duration
	for i := 100; i >= 1; i-- {
		d = append(d, time.Duration(i)*time.Millisecond)
	}
	r := summarize("x", d)
	if r.Count != 100 || r.P50 != 50 || r.P90 != 90 || r.P99 != 99 || r.Max != 100 {
		t.Fatalf("%+v", r)
	}
	if r := summarize("empty", nil); r.Count != 0 || r.P99 != 0 {
		t.Fatalf("%+v", r)
	}
	if r := summarize("one", []time.Duration{3 * time.Millisecond}); r.P50 != 3 || r.P99 != 3 || r.Max != 3 {
		t.Fatalf("%+v", r)
	}
}

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{
		{nil, 0},
		{[]float64{5}, 5},
		{[]float64{3, 1, 2}, 2},
		{[]float64{4, 1, 3, 2}, 2.5},
	} {
		in := append([]float64(nil), c.in...)
		if got := median(in); got != c.want {
			t.Errorf("median(%v) = %v, want %v", c.in, got, c.want)
		}
		for i := range in {
			if in[i] != c.in[i] {
				t.Fatalf("median modified its input: %v", in)
			}
		}
	}
}

// sampleResults is a plausible run's rows.
func sampleResults() []Result {
	return []Result{
		{Scenario: "floor-python", Count: 10, P50: 10, P90: 11, P99: 12, Max: 13},
		{Scenario: "floor-bwrap-python", Count: 10, P50: 15, P90: 16, P99: 17, Max: 18},
		{Scenario: "floor-bwrap-bash", Count: 10, P50: 5, P90: 6, P99: 7, Max: 8},
		{Scenario: "floor-bwrap-python-loop", Count: 500, P50: 30, P90: 40, P99: 50, Max: 60, PerSecond: 100},
		{Scenario: "execute-python", Count: 10, P50: 18, P90: 20, P99: 45, Max: 50},
		{Scenario: "execute-bash", Count: 10, P50: 7.5, P90: 8, P99: 9, Max: 10, Note: "a | b"},
		{Scenario: "sustained", Count: 300, P50: 40, P90: 50, P99: 60, Max: 70, PerSecond: 75},
		{Scenario: "create-cold", Count: 10, P50: 60, P90: 70, P99: 80, Max: 90},
		{Scenario: "empty", Count: 0},
	}
}

func TestRatios(t *testing.T) {
	got := map[string]Ratio{}
	for _, r := range ratios(sampleResults()) {
		got[r.Name] = r
	}
	want := map[string]struct{ ratio, diff float64 }{
		"execute-python p50 / floor-bwrap-python p50":   {1.2, 3},
		"execute-python p50 / floor-python p50":         {1.8, 8},
		"execute-bash p50 / floor-bwrap-bash p50":       {1.5, 2.5},
		"sustained rate / floor-bwrap-python-loop rate": {0.75, -25},
		"floor-bwrap-python p50 / floor-python p50":     {1.5, 5},
	}
	for name, w := range want {
		r, ok := got[name]
		if !ok {
			t.Errorf("missing ratio %q in %v", name, got)
			continue
		}
		if math.Abs(r.Ratio-w.ratio) > 1e-9 || math.Abs(r.Diff-w.diff) > 1e-9 {
			t.Errorf("%s = %v (diff %v), want %v (diff %v)", name, r.Ratio, r.Diff, w.ratio, w.diff)
		}
	}
	if len(got) != len(want) {
		t.Errorf("ratios of rows not measured were reported: %v", got)
	}
	if r := got["sustained rate / floor-bwrap-python-loop rate"]; r.Unit != "/s" {
		t.Errorf("rate unit %q", r.Unit)
	}
}

func TestCheckTargets(t *testing.T) {
	rep := &Report{Results: sampleResults(), Memory: &MemoryResult{Containers: 100, MemAvailableMiB: 13}}
	status := map[string]Target{}
	for _, tg := range checkTargets(rep) {
		status[tg.Name] = tg
	}
	for name, want := range map[string]string{
		"warm CreateSession p50":                                             "not measured",
		"cold CreateSession p50":                                             "met",
		"Execute python print(1) p99":                                        "missed",
		"Execute bash p50 <= bare bwrap+bash p50 + 3 ms":                     "met",
		"sustained python executions/s >= 70% of the bare bwrap+python loop": "met",
		"idle warm container, host memory (MemAvailable drop)":               "missed",
	} {
		if got := status[name].Status; got != want {
			t.Errorf("%s: %s (%+v), want %s", name, got, status[name], want)
		}
	}
	if b := status["Execute bash p50 <= bare bwrap+bash p50 + 3 ms"].Bound; b != 8 {
		t.Errorf("bash bound %v, want the floor + 3 = 8", b)
	}
}

func TestMarkdown(t *testing.T) {
	rep := &Report{
		Commit: "0123456789abcdef", Date: "2026-11-27T10:00:00Z", Dirty: true,
		Machine: Machine{CPUs: 2, Kernel: "6.1.0"},
		Config:  RunConfig{Requested: "floors", Scenarios: []string{"floor-python", "floor-bwrap"}, N: 10, Clients: 4, Duration: "10s"},
		Results: sampleResults(),
		Memory:  &MemoryResult{Containers: 100, PoolAfter: 100, Samples: 5, MemAvailableMiB: 9.5, PSSMiB: 8},
		Notes:   []string{"baseline-docker: skipped: no Docker"},
	}
	rep.finish()
	md := rep.markdown()
	for _, want := range []string{
		"# Benchmark, 2026-11-27",
		"0123456789ab (with uncommitted changes)",
		"`go run ./bench -scenario floors -n 10`",
		"| scenario | count | p50 ms | p90 ms | p99 ms | max ms | rate /s | note |",
		"| execute-python | 10 | 18.00 | 20.00 | 45.00 | 50.00 |  |  |",
		"| sustained | 300 | 40.00 | 50.00 | 60.00 | 70.00 | 75.0 |",
		`a \| b`,
		"| MemAvailable drop (median of 5 samples before and after) | 9.50 |",
		"| execute-python p50 / floor-bwrap-python p50 | 18.00 ms | 15.00 ms | 1.20 | +3.00 ms |",
		"| Execute python print(1) p99 | 45.00 ms | 40.00 ms | missed |",
		"- baseline-docker: skipped: no Docker",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
	if strings.Contains(md, "warm CreateSession") {
		t.Errorf("markdown lists a target that was not measured:\n%s", md)
	}
	// Every table row has as many cells as its header.
	var cols int
	for line := range strings.Lines(md) {
		if !strings.HasPrefix(line, "|") {
			cols = 0
			continue
		}
		n := strings.Count(strings.ReplaceAll(line, `\|`, ""), "|")
		if cols == 0 {
			cols = n
		} else if n != cols {
			t.Errorf("row has %d separators, header %d: %q", n, cols, line)
		}
	}
}

func TestLatencySVG(t *testing.T) {
	svg := latencySVG("bench <test> & co", sampleResults())
	dec := xml.NewDecoder(strings.NewReader(svg))
	bars, texts := 0, 0
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("not well-formed XML: %v\n%s", err, svg)
		}
		if se, ok := tok.(xml.StartElement); ok {
			switch se.Name.Local {
			case "title":
				bars++
			case "text":
				texts++
			}
		}
	}
	measured := 0
	for _, r := range sampleResults() {
		if r.Count > 0 {
			measured++
		}
	}
	if bars != 3*measured {
		t.Errorf("%d bars, want p50, p90 and p99 of %d rows", bars, measured)
	}
	if !strings.Contains(svg, "bench &lt;test&gt; &amp; co") || !strings.Contains(svg, "sustained (75/s)") {
		t.Errorf("title or rate label missing:\n%s", svg)
	}
	if empty := latencySVG("none", nil); !strings.Contains(empty, "</svg>") {
		t.Errorf("empty chart: %s", empty)
	}
}

func TestLogAxis(t *testing.T) {
	ax := newLogAxis([]float64{3, 450, 0}, 100, 400)
	if ax.lo != 0 || ax.hi != 3 {
		t.Fatalf("decades %v..%v, want 0..3", ax.lo, ax.hi)
	}
	if ax.x(1) != 100 || ax.x(1000) != 400 || ax.x(10) != 200 || ax.x(0) != 100 {
		t.Errorf("x(1)=%v x(10)=%v x(1000)=%v x(0)=%v", ax.x(1), ax.x(10), ax.x(1000), ax.x(0))
	}
	ticks := ax.ticks()
	if ticks[0] != 1 || ticks[len(ticks)-1] != 1000 || len(ticks) != 10 {
		t.Errorf("ticks %v", ticks)
	}
}

func TestParseMeminfo(t *testing.T) {
	m, err := parseMeminfo("MemTotal:       24683564 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\nHugePages_Total:       0\n")
	if err != nil {
		t.Fatal(err)
	}
	if m["MemTotal"] != 24683564<<10 || m["MemAvailable"] != 20000000<<10 || m["HugePages_Total"] != 0 {
		t.Fatalf("%v", m)
	}
	if _, err := parseMeminfo("MemTotal: 1 kB\n"); err == nil {
		t.Fatal("meminfo without MemAvailable accepted")
	}
	if _, err := parseMeminfo("MemAvailable: x kB\n"); err == nil {
		t.Fatal("bad number accepted")
	}
	b, err := os.ReadFile("/proc/meminfo")
	if err == nil {
		if _, err := parseMeminfo(string(b)); err != nil {
			t.Fatalf("this host's /proc/meminfo: %v", err)
		}
	}
}

func TestParseRollupPss(t *testing.T) {
	text := "55d0c0a00000-7ffd3a9fe000 ---p 00000000 00:00 0  [rollup]\nRss:                1234 kB\nPss:                 567 kB\nPss_Anon:            100 kB\n"
	if n, err := parseRollupPss(text); err != nil || n != 567<<10 {
		t.Fatalf("%d %v", n, err)
	}
	if _, err := parseRollupPss("Rss: 1 kB\n"); err == nil {
		t.Fatal("no Pss line accepted")
	}
	if pss(os.Getpid()) <= 0 {
		t.Error("PSS of this process is not positive")
	}
}

func TestParseTasks(t *testing.T) {
	got := parseTasks("TASK            PID      STATUS\nw-abc    17069    RUNNING\nx    0    STOPPED\ny  12  RUNNING\n")
	if len(got) != 2 || got[0] != (task{"w-abc", 17069}) || got[1] != (task{"y", 12}) {
		t.Fatalf("%v", got)
	}
}

func TestParseCounter(t *testing.T) {
	text := `# HELP sandbox_agent_warm_claims_total Session starts.
# TYPE sandbox_agent_warm_claims_total counter
sandbox_agent_warm_claims_total{result="hit",template="python-basic"} 8
sandbox_agent_warm_claims_total{result="miss",template="nodejs-basic"} 1
sandbox_agent_warm_claims_total{result="miss",template="python-basic"} 30
sandbox_agent_warm_claims_total_other{result="hit",template="python-basic"} 99
sandbox_agent_warm_claims_total{template="a,b",result="hit"} 5
`
	m, err := parseCounter(strings.NewReader(text), "sandbox_agent_warm_claims_total", map[string]string{"template": "python-basic"}, "result")
	if err != nil {
		t.Fatal(err)
	}
	if m["hit"] != 8 || m["miss"] != 30 || len(m) != 2 {
		t.Fatalf("%v", m)
	}
	m, _ = parseCounter(strings.NewReader(text), "sandbox_agent_warm_claims_total", map[string]string{"template": "a,b"}, "result")
	if m["hit"] != 5 {
		t.Fatalf("quoted comma: %v", m)
	}
	if got := claimNote(map[string]float64{"hit": 1}, map[string]float64{"hit": 11, "miss": 2}, true, true); got != "agents counted 10 warm hits, 2 misses" {
		t.Errorf("claimNote: %q", got)
	}
}

func TestSelectScenarios(t *testing.T) {
	names := func(list string) string {
		s, err := selectScenarios(list)
		if err != nil {
			return "error"
		}
		var n []string
		for _, x := range s {
			n = append(n, x.name)
		}
		return strings.Join(n, ",")
	}
	for list, want := range map[string]string{
		"cycle,floor-python": "floor-python,cycle",
		"floors":             "floor-python,floor-bwrap",
		"nonsense":           "error",
		"":                   "error",
	} {
		if got := names(list); got != want {
			t.Errorf("%q: %s, want %s", list, got, want)
		}
	}
	all := names("all")
	if strings.Contains(all, "placement") || !strings.Contains(all, "warm-memory") || !strings.HasPrefix(all, "floor-python") {
		t.Errorf("all = %s", all)
	}
}

// TestPlacementScenario smokes the placement scenario at a small size: it
// asserts only that placements happened and that none overcommitted.
func TestPlacementScenario(t *testing.T) {
	res, err := runPlacement(context.Background(), PlacementConfig{Agents: 100, Concurrency: 16, Duration: 2 * time.Second, Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if res.Latency.Count == 0 || res.Overcommitted != 0 || res.Errors != 0 {
		t.Fatalf("placement scenario: %+v", res)
	}
}

// TestFloorScenarios runs the floors and the runc and ctr baselines a few
// times each against the real bubblewrap, runc and containerd, and renders
// the report: the harness's smoke, so that it cannot rot. It asserts that
// every row was measured, never how fast.
func TestFloorScenarios(t *testing.T) {
	if testing.Short() {
		t.Skip("needs root, containerd, runc, bubblewrap and the template images")
	}
	addr := testenv.RequireContainerd(t)
	for _, b := range []string{"bwrap", "runc", "ctr"} {
		testenv.RequireBinary(t, b)
	}
	cfg := Config{
		N: 3, Warmup: 1, Clients: 2, Duration: 300 * time.Millisecond,
		Template: "python-basic", NodeTemplate: "nodejs-basic",
		ContainerdAddress: addr, Namespace: "sandbox",
	}
	r := &runner{cfg: cfg, report: &Report{Config: RunConfig{N: cfg.N}}}
	t.Cleanup(func() {
		if err := r.close(); err != nil {
			t.Error(err)
		}
	})
	h, err := r.hostEnv()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.imageDigest(context.Background(), imageRef(cfg.Template)); err != nil {
		testenv.Unavailable(t, "needs the template images (make images): %v", err)
	}
	list, err := selectScenarios("floors,baseline-runc,baseline-ctr")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := r.runAll(ctx, list); err != nil {
		t.Fatal(err)
	}
	rows := map[string]Result{}
	for _, x := range r.report.Results {
		rows[x.Scenario] = x
	}
	for _, name := range []string{"floor-python", "floor-bwrap-python", "floor-bwrap-bash", "floor-bwrap-node", "baseline-runc", "baseline-ctr"} {
		if x, ok := rows[name]; !ok || x.Count != cfg.N || x.P50 <= 0 {
			t.Errorf("%s: %+v (ok %v), want %d runs", name, x, ok, cfg.N)
		}
	}
	if x := rows["floor-bwrap-python-loop"]; x.Count == 0 || x.PerSecond <= 0 {
		t.Errorf("floor loop: %+v", x)
	}

	r.report.finish()
	dir := t.TempDir()
	out := outputs{json: filepath.Join(dir, "r.json"), md: filepath.Join(dir, "r.md"), svg: filepath.Join(dir, "r.svg")}
	if err := r.report.write(out); err != nil {
		t.Fatal(err)
	}
	var back Report
	b, err := os.ReadFile(out.json)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &back); err != nil || len(back.Results) != len(r.report.Results) || len(back.Ratios) == 0 {
		t.Fatalf("JSON round trip: %v, %+v", err, back)
	}
	for _, f := range []string{out.md, out.svg} {
		if fi, err := os.Stat(f); err != nil || fi.Size() == 0 {
			t.Errorf("%s: %v", f, err)
		}
	}
}

// fakeAPI is a ClusterService and TemplateService whose agents never fill
// a warm pool, as in a build without the agent side of warm pools.
type fakeAPI struct {
	sandboxv1connect.UnimplementedClusterServiceHandler
	sandboxv1connect.UnimplementedTemplateServiceHandler
	mu      sync.Mutex
	size    int32
	updates []int32
}

func (f *fakeAPI) ListNodes(context.Context, *connect.Request[sandboxv1.ListNodesRequest]) (*connect.Response[sandboxv1.ListNodesResponse], error) {
	return connect.NewResponse(&sandboxv1.ListNodesResponse{Nodes: []*sandboxv1.Node{
		{Id: "a1", WarmPools: []*sandboxv1.WarmPool{{TemplateId: "other", Ready: 3}}},
		{Id: "a2"},
	}}), nil
}

func (f *fakeAPI) GetTemplate(_ context.Context, req *connect.Request[sandboxv1.GetTemplateRequest]) (*connect.Response[sandboxv1.GetTemplateResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return connect.NewResponse(&sandboxv1.GetTemplateResponse{Template: &sandboxv1.Template{Id: req.Msg.GetTemplateId(), WarmPoolSize: f.size}}), nil
}

func (f *fakeAPI) UpdateTemplate(_ context.Context, req *connect.Request[sandboxv1.UpdateTemplateRequest]) (*connect.Response[sandboxv1.UpdateTemplateResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.size = req.Msg.GetWarmPoolSize()
	f.updates = append(f.updates, f.size)
	return connect.NewResponse(&sandboxv1.UpdateTemplateResponse{Template: &sandboxv1.Template{Id: req.Msg.GetTemplateId(), WarmPoolSize: f.size}}), nil
}

func newFakeAPI(t *testing.T, f *fakeAPI) string {
	mux := http.NewServeMux()
	mux.Handle(sandboxv1connect.NewClusterServiceHandler(f))
	mux.Handle(sandboxv1connect.NewTemplateServiceHandler(f))
	srv := httptest.NewUnstartedServer(mux)
	p := new(http.Protocols)
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	srv.Config.Protocols = p
	srv.Start()
	t.Cleanup(srv.Close)
	return srv.URL
}

// TestWarmPoolStalls checks that a pool that never fills fails the wait
// with a message, and that close puts back the pool size it found.
func TestWarmPoolStalls(t *testing.T) {
	f := &fakeAPI{size: 2}
	c := newCluster(newFakeAPI(t, f), "key", time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.setPool(ctx, "python-basic", 4); err != nil {
		t.Fatal(err)
	}
	if err := c.setPool(ctx, "python-basic", 4); err != nil { // already 4: no call
		t.Fatal(err)
	}
	err := c.waitPool(ctx, "python-basic", 4)
	if !errors.Is(err, errPoolStalled) || !strings.Contains(err.Error(), "0 of 4 ready") {
		t.Fatalf("waitPool: %v, want a stalled pool with 0 of 4 ready", err)
	}
	t0 := time.Now()
	if err := c.waitPool(ctx, "python-basic", 8); !errors.Is(err, errPoolStalled) || time.Since(t0) >= time.Second { // did not wait out the timeout again
		t.Fatalf("second wait after a stall: %v after %s, want the stall again at once", err, time.Since(t0))
	}
	if err := c.waitPool(ctx, "python-basic", 0); err != nil {
		t.Fatalf("an empty pool is reached at once: %v", err)
	}
	if err := c.close(ctx); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.size != 2 || len(f.updates) != 2 || f.updates[0] != 4 {
		t.Fatalf("pool size %d after close, updates %v; want 4 then back to 2", f.size, f.updates)
	}
}

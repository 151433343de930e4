package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"time"

	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
)

// Config is one run's settings (the command line).
type Config struct {
	Addr string
	// Direct sends the calls to -addr as given; otherwise to the leader's
	// API address, as a client that follows the leader would.
	Direct bool
	APIKey string
	// N is how many measured runs each latency scenario makes; Warmup how
	// many unmeasured ones come first.
	N, Warmup int
	// Clients and Duration shape the sustained scenario and the floor loop.
	Clients  int
	Duration time.Duration
	// Template is measured for python and bash; NodeTemplate for node.
	Template, NodeTemplate string
	// WarmPool is create-warm's pool size.
	WarmPool int
	// Burst is the burst's size (pool and concurrent creates), with the
	// small limits its sessions ask for so that all fit the agents.
	Burst          int
	BurstCPUMillis int32
	BurstMemoryMiB int64
	// MemGrow is how many warm containers warm-memory adds; Settle how
	// long it lets the host settle before sampling, MemSamples how many
	// MemAvailable samples (a second apart) it takes the median of.
	MemGrow    int
	Settle     time.Duration
	MemSamples int
	// PoolTimeout is how long a warm pool may make no progress.
	PoolTimeout time.Duration
	// ContainerdAddress and Namespace are where the images are (floors and
	// baselines) and where the agents' containers run (warm-memory).
	ContainerdAddress, Namespace string
	// Placement: simulated agents and concurrent placements.
	Agents, Concurrency int
	// Log receives progress lines (stderr).
	Log io.Writer
}

// scenario is one named measurement.
type scenario struct {
	name string
	// cluster is set for scenarios that need a running cluster.
	cluster bool
	run     func(context.Context, *runner) error
}

// scenarios in the order "all" runs them: the floors and baselines first,
// on an idle host, then the cluster, warm pools last (they grow the host's
// container count).
var scenarios = []scenario{
	{"floor-python", false, floorPython},
	{"floor-bwrap", false, floorBwrap},
	{"baseline-runc", false, baselineRunc},
	{"baseline-ctr", false, baselineCtr},
	{"baseline-docker", false, baselineDocker},
	{"create-cold", true, createCold},
	{"execute", true, executeScenario},
	{"cycle", true, cycleScenario},
	{"sustained", true, sustainedScenario},
	{"create-warm", true, createWarm},
	{"burst", true, burstScenario},
	{"warm-memory", true, warmMemory},
	{"placement", false, placementScenario},
}

// groups name several scenarios at once on -scenario.
var groups = map[string][]string{
	"floors":    {"floor-python", "floor-bwrap"},
	"baselines": {"baseline-runc", "baseline-ctr", "baseline-docker"},
	"cluster":   {"create-cold", "execute", "cycle", "sustained", "create-warm", "burst", "warm-memory"},
}

// selectScenarios turns a -scenario list into scenarios, in run order.
// "all" is every scenario but placement (in-process, and minutes long at
// its defaults).
func selectScenarios(list string) ([]scenario, error) {
	want := map[string]bool{}
	for _, name := range strings.Split(list, ",") {
		name = strings.TrimSpace(name)
		switch {
		case name == "":
		case name == "all":
			for _, s := range scenarios {
				want[s.name] = s.name != "placement"
			}
		case groups[name] != nil:
			for _, n := range groups[name] {
				want[n] = true
			}
		case slices.ContainsFunc(scenarios, func(s scenario) bool { return s.name == name }):
			want[name] = true
		default:
			return nil, fmt.Errorf("unknown scenario %q: want all, a group (floors, baselines, cluster) or one of %s",
				name, strings.Join(scenarioNames(), ", "))
		}
	}
	var out []scenario
	for _, s := range scenarios {
		if want[s.name] {
			out = append(out, s)
		}
	}
	if len(out) == 0 {
		return nil, errors.New("no scenario selected")
	}
	return out, nil
}

func scenarioNames() []string {
	var n []string
	for _, s := range scenarios {
		n = append(n, s.name)
	}
	return n
}

// errSkipped marks a scenario that cannot run here (no Docker): a note, not
// a failure.
var errSkipped = errors.New("skipped")

// runner runs scenarios and collects what they measure into one report.
type runner struct {
	cfg    Config
	report *Report
	c      *cluster // set when a selected scenario needs the cluster
	host   *hostEnv // images mounted for the floors and baselines, made on first use
}

// add appends results to the report and prints them as progress.
func (r *runner) add(res ...Result) {
	for _, x := range res {
		r.logf("  %-26s n=%-4d p50 %8.2f  p90 %8.2f  p99 %8.2f  max %8.2f ms%s", x.Scenario, x.Count, x.P50, x.P90, x.P99, x.Max, rateSuffix(x))
	}
	r.report.Results = append(r.report.Results, res...)
}

func rateSuffix(x Result) string {
	if x.PerSecond > 0 {
		return fmt.Sprintf("  %.1f/s", x.PerSecond)
	}
	return ""
}

func (r *runner) logf(format string, args ...any) {
	if r.cfg.Log != nil {
		fmt.Fprintf(r.cfg.Log, format+"\n", args...)
	}
}

// runAll runs each scenario; a failure is noted and the next one runs. It
// returns the failures, joined.
func (r *runner) runAll(ctx context.Context, list []scenario) error {
	var errs []error
	for _, s := range list {
		if ctx.Err() != nil {
			errs = append(errs, ctx.Err())
			break
		}
		r.logf("==> %s", s.name)
		t0 := time.Now()
		err := s.run(ctx, r)
		switch {
		case errors.Is(err, errSkipped):
			r.report.Notes = append(r.report.Notes, fmt.Sprintf("%s: %v", s.name, err))
			r.logf("  %s: %v", s.name, err)
		case err != nil:
			r.report.Notes = append(r.report.Notes, fmt.Sprintf("%s FAILED: %v", s.name, err))
			r.logf("  %s FAILED after %s: %v", s.name, time.Since(t0).Round(time.Millisecond), err)
			errs = append(errs, fmt.Errorf("%s: %w", s.name, err))
		}
	}
	return errors.Join(errs...)
}

// createCold measures CreateSession with the template's pool at 0, so that
// every session starts a container; TerminateSession is measured alongside.
func createCold(ctx context.Context, r *runner) error {
	c, t := r.c, r.cfg.Template
	if err := c.setPool(ctx, t, 0); err != nil {
		return err
	}
	if err := c.waitPool(ctx, t, 0); err != nil {
		return err
	}
	var create, term []time.Duration
	for i := range r.cfg.Warmup + r.cfg.N {
		id, d, err := c.create(ctx, t, nil)
		if err != nil {
			return err
		}
		td, err := c.terminate(ctx, id)
		if err != nil {
			return err
		}
		if i >= r.cfg.Warmup {
			create, term = append(create, d), append(term, td)
		}
	}
	r.add(summarize("create-cold", create), summarize("terminate", term))
	return nil
}

// language is one Execute measurement: code printing 1 in a template.
type language struct {
	name, code string
	template   func(Config) string
}

var languages = []language{
	{"python", "print(1)", func(c Config) string { return c.Template }},
	{"node", "console.log(1)", func(c Config) string { return c.NodeTemplate }},
	{"bash", "echo 1", func(c Config) string { return c.Template }},
}

// executeScenario measures Execute per language in a running session (one
// session per template) after Warmup unmeasured runs.
func executeScenario(ctx context.Context, r *runner) error {
	c := r.c
	sessions := map[string]string{} // template -> session
	defer func() {
		for _, id := range sessions {
			_, _ = c.terminate(context.WithoutCancel(ctx), id)
		}
	}()
	for _, l := range languages {
		t := l.template(r.cfg)
		id, ok := sessions[t]
		if !ok {
			var err error
			if id, _, err = c.create(ctx, t, nil); err != nil {
				return err
			}
			sessions[t] = id
		}
		var d []time.Duration
		for i := range r.cfg.Warmup + r.cfg.N {
			x, err := c.execute(ctx, id, l.name, l.code)
			if err != nil {
				return err
			}
			if i >= r.cfg.Warmup {
				d = append(d, x)
			}
		}
		res := summarize("execute-"+l.name, d)
		res.Note = "in a running " + t + " session"
		r.add(res)
	}
	return nil
}

// cycleScenario measures create, Execute print(1), terminate, end to end,
// with the pool at 0: the platform's answer to "a fresh container per
// execution", as the baselines measure it.
func cycleScenario(ctx context.Context, r *runner) error {
	c, t := r.c, r.cfg.Template
	if err := c.setPool(ctx, t, 0); err != nil {
		return err
	}
	if err := c.waitPool(ctx, t, 0); err != nil {
		return err
	}
	var d []time.Duration
	for i := range r.cfg.Warmup + r.cfg.N {
		t0 := time.Now()
		id, _, err := c.create(ctx, t, nil)
		if err != nil {
			return err
		}
		if _, err := c.execute(ctx, id, "python", "print(1)"); err != nil {
			return err
		}
		if _, err := c.terminate(ctx, id); err != nil {
			return err
		}
		if i >= r.cfg.Warmup {
			d = append(d, time.Since(t0))
		}
	}
	res := summarize("cycle", d)
	res.Note = "cold create + execute python + terminate"
	r.add(res)
	return nil
}

// sustainedScenario runs Clients clients, each executing print(1) in its
// own session back to back for Duration, and reports executions per second.
func sustainedScenario(ctx context.Context, r *runner) error {
	c, t := r.c, r.cfg.Template
	ids := make([]string, r.cfg.Clients)
	defer func() { _ = c.terminateAll(context.WithoutCancel(ctx), ids) }()
	for i := range ids {
		id, _, err := c.create(ctx, t, nil)
		if err != nil {
			return err
		}
		ids[i] = id
		for range r.cfg.Warmup {
			if _, err := c.execute(ctx, id, "python", "print(1)"); err != nil {
				return err
			}
		}
	}
	res, err := loop(ctx, r.cfg.Clients, r.cfg.Duration, func(i int) (time.Duration, error) {
		return c.execute(ctx, ids[i], "python", "print(1)")
	})
	if err != nil {
		return err
	}
	res.Scenario = "sustained"
	res.Note = fmt.Sprintf("%d clients, each in its own session, python print(1), %s", r.cfg.Clients, r.cfg.Duration)
	r.add(res)
	return nil
}

// loop calls op from n goroutines (op gets the goroutine's index) back to
// back for d and returns the latencies and the overall rate. The first
// error stops every goroutine.
func loop(ctx context.Context, n int, d time.Duration, op func(i int) (time.Duration, error)) (Result, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		all   []time.Duration
		first error
	)
	start := time.Now()
	deadline := start.Add(d)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []time.Duration
			for time.Now().Before(deadline) && ctx.Err() == nil {
				x, err := op(i)
				if err != nil {
					mu.Lock()
					first = cmpOr(first, err)
					mu.Unlock()
					cancel()
					return
				}
				mine = append(mine, x)
			}
			mu.Lock()
			all = append(all, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if first != nil {
		return Result{}, first
	}
	res := summarize("", all)
	res.PerSecond = float64(len(all)) / elapsed.Seconds()
	return res, nil
}

// createWarm measures CreateSession claiming a warm container: the pool is
// filled to WarmPool and, before each create, back to full (so that every
// create finds a container and no refill competes with it).
func createWarm(ctx context.Context, r *runner) error {
	c, t, size := r.c, r.cfg.Template, r.cfg.WarmPool
	if err := c.setPool(ctx, t, size); err != nil {
		return err
	}
	defer func() { _ = c.setPool(context.WithoutCancel(ctx), t, 0) }()
	r.logf("  waiting for %d warm %s containers", size, t)
	if err := c.waitPool(ctx, t, size); err != nil {
		return err
	}
	before, okB := c.claimCounts(ctx, t)
	var d []time.Duration
	for i := range r.cfg.Warmup + r.cfg.N {
		if err := c.waitPool(ctx, t, size); err != nil {
			return err
		}
		id, x, err := c.create(ctx, t, nil)
		if err != nil {
			return err
		}
		if _, err := c.terminate(ctx, id); err != nil {
			return err
		}
		if i >= r.cfg.Warmup {
			d = append(d, x)
		}
	}
	after, okA := c.claimCounts(ctx, t)
	res := summarize("create-warm", d)
	res.Note = joinNotes(fmt.Sprintf("pool of %d, refilled before each create", size), claimNote(before, after, okB, okA))
	r.add(res)
	return nil
}

// burstScenario fills a pool of Burst, then starts Burst CreateSession
// calls at once and reports their latencies.
func burstScenario(ctx context.Context, r *runner) error {
	c, t, size := r.c, r.cfg.Template, r.cfg.Burst
	if err := c.setPool(ctx, t, size); err != nil {
		return err
	}
	defer func() { _ = c.setPool(context.WithoutCancel(ctx), t, 0) }()
	r.logf("  waiting for %d warm %s containers", size, t)
	t0 := time.Now()
	if err := c.waitPool(ctx, t, size); err != nil {
		return err
	}
	r.logf("  pool full after %s", time.Since(t0).Round(time.Millisecond))
	limits := &sandboxv1.ResourceLimits{CpuMillis: r.cfg.BurstCPUMillis, MemoryMib: r.cfg.BurstMemoryMiB}
	before, okB := c.claimCounts(ctx, t)
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		d     []time.Duration
		ids   []string
		fails int
		first error
		start = make(chan struct{})
	)
	for range size {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			id, x, err := c.create(ctx, t, limits)
			mu.Lock()
			defer mu.Unlock()
			if id != "" {
				ids = append(ids, id)
			}
			if err != nil {
				fails++
				first = cmpOr(first, err)
				return
			}
			d = append(d, x)
		}()
	}
	close(start)
	wg.Wait()
	after, okA := c.claimCounts(ctx, t)
	res := summarize("burst", d)
	res.Note = joinNotes(fmt.Sprintf("%d concurrent creates against a pool of %d", size, size), claimNote(before, after, okB, okA))
	if fails > 0 {
		res.Note = joinNotes(res.Note, fmt.Sprintf("%d failed", fails))
	}
	r.add(res)
	if err := c.terminateAll(context.WithoutCancel(ctx), ids); err != nil {
		return err
	}
	if first != nil {
		return fmt.Errorf("%d of %d creates failed, the first: %w", fails, size, first)
	}
	return nil
}

func joinNotes(notes ...string) string {
	var out []string
	for _, n := range notes {
		if n != "" {
			out = append(out, n)
		}
	}
	return strings.Join(out, "; ")
}

// placementScenario is the in-process placement measurement (no cluster).
func placementScenario(ctx context.Context, r *runner) error {
	dir, cleanup, err := tempDir()
	if err != nil {
		return err
	}
	defer cleanup()
	res, err := runPlacement(ctx, PlacementConfig{Agents: r.cfg.Agents, Concurrency: r.cfg.Concurrency, Duration: r.cfg.Duration, Dir: dir})
	if err != nil {
		return err
	}
	row := res.Latency
	row.PerSecond = res.PerSecond
	row.Note = fmt.Sprintf("in-process, %d agents, %d concurrent, %d refused, %d errors", res.Agents, res.Concurrency, res.Refused, res.Errors)
	r.add(row)
	if res.Overcommitted > 0 {
		return fmt.Errorf("%d agents overcommitted", res.Overcommitted)
	}
	return nil
}

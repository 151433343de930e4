// Command bench produces the project's performance numbers: named scenarios
// against a running cluster (CreateSession warm and cold, Execute per
// language, a full cycle, sustained executions, a burst against a warm pool,
// host memory per warm container), the floors under them (bare bubblewrap +
// interpreter, bare interpreter) and the baselines a user would otherwise
// pick (runc, ctr, docker), all in one run, side by side and as ratios.
//
// Each latency scenario prints count, p50, p90, p99 and max; -json, -md and
// -svg write the report as JSON (with the commit measured and the machine),
// a Markdown table and a latency chart. See bench/README.md.
//
//	go run ./bench                                  # every scenario, against make cluster
//	go run ./bench -scenario floors,baselines -n 50 # no cluster needed
//	go run ./bench -scenario placement              # in-process placement at 10,000 agents
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strings"
	"syscall"
	"time"
)

func main() {
	cfg, out, err := parseFlags(os.Args[1:])
	if err != nil {
		fatal(err)
	}
	if out.cpuProfile != "" {
		f, err := os.Create(out.cpuProfile)
		if err != nil {
			fatal(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			fatal(err)
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err = run(ctx, cfg, out)
	stop()
	pprof.StopCPUProfile()
	if err != nil {
		fatal(err)
	}
}

// outputs are where the report goes besides stdout.
type outputs struct {
	scenarios     string
	json, md, svg string
	cpuProfile    string
}

func parseFlags(args []string) (Config, outputs, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	var (
		cfg Config
		out outputs
	)
	fs.StringVar(&out.scenarios, "scenario", "all", "comma list of scenarios or groups (floors, baselines, cluster), or all: "+strings.Join(scenarioNames(), ", "))
	fs.StringVar(&cfg.Addr, "addr", envOr("SANDBOX_ADDR", "http://127.0.0.1:7400"), "API address")
	fs.BoolVar(&cfg.Direct, "direct", false, "send the calls to -addr as given (a follower forwards them to the leader); default: to the leader's API address, found through -addr")
	fs.StringVar(&cfg.APIKey, "api-key", os.Getenv("SANDBOX_API_KEY"), "API key (default: .sandbox/api-key)")
	fs.IntVar(&cfg.N, "n", 100, "measured runs per latency scenario")
	fs.IntVar(&cfg.Warmup, "warmup", 5, "unmeasured runs before each latency scenario")
	fs.IntVar(&cfg.Clients, "clients", 4, "sustained and the floor loop: concurrent clients")
	fs.DurationVar(&cfg.Duration, "duration", 10*time.Second, "sustained, the floor loop and placement: how long")
	fs.StringVar(&cfg.Template, "template", "python-basic", "template measured for python and bash")
	fs.StringVar(&cfg.NodeTemplate, "node-template", "nodejs-basic", "template measured for node")
	fs.IntVar(&cfg.WarmPool, "warm-pool", 4, "create-warm: warm pool size")
	fs.IntVar(&cfg.Burst, "burst", 200, "burst: pool size and concurrent creates")
	var burstCPU int
	fs.IntVar(&burstCPU, "burst-cpu-millis", 50, "burst: each session's cpu limit (small, so that all fit the agents)")
	fs.Int64Var(&cfg.BurstMemoryMiB, "burst-memory-mib", 64, "burst: each session's memory limit")
	fs.IntVar(&cfg.MemGrow, "memory-containers", 100, "warm-memory: how many warm containers to add")
	fs.DurationVar(&cfg.Settle, "settle", 5*time.Second, "warm-memory: wait before sampling memory")
	fs.IntVar(&cfg.MemSamples, "memory-samples", 5, "warm-memory: MemAvailable samples (a second apart) per median")
	fs.DurationVar(&cfg.PoolTimeout, "pool-timeout", 120*time.Second, "give up on a warm pool that makes no progress for this long")
	fs.StringVar(&cfg.ContainerdAddress, "containerd-address", envOr("CONTAINERD_ADDRESS", "/run/containerd/containerd.sock"), "containerd socket (floors, baselines, warm-memory)")
	fs.StringVar(&cfg.Namespace, "namespace", "sandbox", "containerd namespace of the images and the agents' containers")
	fs.IntVar(&cfg.Agents, "agents", 10000, "placement: simulated agents")
	fs.IntVar(&cfg.Concurrency, "concurrency", 128, "placement: concurrent placements")
	fs.StringVar(&out.json, "json", "", "write the report as JSON to this file")
	fs.StringVar(&out.md, "md", "", "write the report as Markdown to this file")
	fs.StringVar(&out.svg, "svg", "", "write a latency chart (SVG) to this file")
	fs.StringVar(&out.cpuProfile, "cpuprofile", "", "write a CPU profile of the run to this file")
	if err := fs.Parse(args); err != nil {
		return cfg, out, err
	}
	if fs.NArg() > 0 {
		return cfg, out, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	cfg.BurstCPUMillis = int32(burstCPU)
	cfg.Log = os.Stderr
	if cfg.N < 1 || cfg.Warmup < 0 || cfg.Clients < 1 || cfg.Duration <= 0 || cfg.WarmPool < 1 || cfg.Burst < 1 || cfg.MemGrow < 1 || cfg.MemSamples < 1 {
		return cfg, out, errors.New("-n, -clients, -duration, -warm-pool, -burst, -memory-containers and -memory-samples must be positive, -warmup not negative")
	}
	return cfg, out, nil
}

// run runs the selected scenarios and writes the report. The cluster is
// put back as it was found (sessions terminated, pool sizes restored) and
// the images unmounted, also when a scenario fails or the run is
// interrupted.
func run(ctx context.Context, cfg Config, out outputs) error {
	list, err := selectScenarios(out.scenarios)
	if err != nil {
		return err
	}
	var names []string
	for _, s := range list {
		names = append(names, s.name)
	}
	r := &runner{cfg: cfg, report: newReport(RunConfig{
		Requested: out.scenarios, Scenarios: names, N: cfg.N, Warmup: cfg.Warmup, Clients: cfg.Clients, Duration: cfg.Duration.String(),
		Template: cfg.Template, WarmPool: cfg.WarmPool, Burst: cfg.Burst, MemGrow: cfg.MemGrow,
	})}
	if slices.ContainsFunc(list, func(s scenario) bool { return s.cluster }) {
		key, err := apiKey(cfg.APIKey)
		if err != nil {
			return err
		}
		r.c = newCluster(cfg.Addr, key, cfg.PoolTimeout)
		if err := r.c.check(ctx); err != nil {
			return err
		}
		r.report.Config.Addr = cfg.Addr
		if !cfg.Direct {
			leader, err := r.c.leaderURL(ctx)
			if err != nil {
				return err
			}
			if leader != strings.TrimRight(cfg.Addr, "/") {
				r.c = newCluster(leader, key, cfg.PoolTimeout)
				r.report.Config.Leader = leader
				fmt.Printf("calls go to the leader at %s (-direct: to %s)\n", leader, cfg.Addr)
			}
		}
	}
	runErr := r.runAll(ctx, list)
	cleanupErr := r.close()
	r.report.finish()
	fmt.Println()
	r.report.writeText(os.Stdout)
	if err := r.report.write(out); err != nil {
		return errors.Join(runErr, cleanupErr, err)
	}
	return errors.Join(runErr, cleanupErr)
}

// close puts the cluster back and unmounts the images.
func (r *runner) close() error {
	var errs []error
	if r.c != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := r.c.close(ctx); err != nil {
			errs = append(errs, fmt.Errorf("restoring the cluster: %w", err))
		}
	}
	if r.host != nil {
		if err := r.host.close(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// write writes the files asked for.
func (rep *Report) write(out outputs) error {
	if out.json != "" {
		if err := rep.writeJSON(out.json); err != nil {
			return err
		}
	}
	if out.md != "" {
		if err := writeFile(out.md, []byte(rep.markdown())); err != nil {
			return err
		}
	}
	if out.svg != "" {
		day, _, _ := strings.Cut(rep.Date, "T")
		title := fmt.Sprintf("sandbox bench %s, %d CPUs, commit %.12s", day, rep.Machine.CPUs, rep.Commit)
		if err := writeFile(out.svg, []byte(latencySVG(title, rep.Results))); err != nil {
			return err
		}
	}
	return nil
}

// apiKey is key, or the one make up and make cluster write.
func apiKey(key string) (string, error) {
	if key != "" {
		return key, nil
	}
	b, err := os.ReadFile(filepath.Join(".sandbox", "api-key"))
	if err != nil {
		return "", fmt.Errorf("no API key: set SANDBOX_API_KEY or -api-key, or run from the repository after make cluster: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "bench:", err)
	os.Exit(1)
}

// Command bench produces the project's performance numbers.
//
// The default scenario, latency, measures what a client sees against a
// running cluster: CreateSession, Execute `print(1)` in a running session,
// and TerminateSession. It prints count, p50, p90, p99 and max per scenario
// and, with -json, writes them as JSON.
//
// The placement scenario needs no cluster: it builds three in-process
// servers (in-memory Raft transport, bbolt log stores), registers -agents
// simulated agents and places sessions (pick an agent, commit the session
// through Raft: scheduler.PlaceSession) from -concurrency goroutines for
// -duration, then prints placements per second and their latency.
//
//	go run ./bench -n 100                          # against the make up cluster
//	go run ./bench -scenario placement -json out.json
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/sandboxhq/sandbox/api"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/v1/sandboxv1connect"
)

// Result is one scenario's latency summary, in milliseconds.
type Result struct {
	Scenario string  `json:"scenario"`
	Count    int     `json:"count"`
	P50      float64 `json:"p50_ms"`
	P90      float64 `json:"p90_ms"`
	P99      float64 `json:"p99_ms"`
	Max      float64 `json:"max_ms"`
}

func summarize(name string, d []time.Duration) Result {
	slices.Sort(d)
	q := func(p float64) float64 {
		if len(d) == 0 {
			return 0
		}
		i := int(p*float64(len(d))+0.5) - 1
		i = max(0, min(i, len(d)-1))
		return float64(d[i].Microseconds()) / 1000
	}
	return Result{Scenario: name, Count: len(d), P50: q(.50), P90: q(.90), P99: q(.99), Max: q(1)}
}

func main() {
	var (
		addr     = flag.String("addr", envOr("SANDBOX_ADDR", "http://127.0.0.1:7400"), "API address")
		key      = flag.String("api-key", os.Getenv("SANDBOX_API_KEY"), "API key (default: .sandbox/api-key)")
		n        = flag.Int("n", 100, "runs per scenario")
		template = flag.String("template", "python-basic", "template to measure")
		jsonOut  = flag.String("json", "", "also write the results as JSON to this file")
		scenario = flag.String("scenario", "latency", "latency (against a running cluster) or placement (in-process)")
		agents   = flag.Int("agents", 10000, "placement: simulated agents")
		conc     = flag.Int("concurrency", 128, "placement: concurrent placements")
		duration = flag.Duration("duration", 10*time.Second, "placement: how long to place")
		cpuProf  = flag.String("cpuprofile", "", "write a CPU profile of the run to this file")
	)
	flag.Parse()
	if *cpuProf != "" {
		f, err := os.Create(*cpuProf)
		if err != nil {
			fatal(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			fatal(err)
		}
		defer pprof.StopCPUProfile()
	}
	switch *scenario {
	case "latency":
	case "placement":
		if err := placementMain(*agents, *conc, *duration, *jsonOut); err != nil {
			pprof.StopCPUProfile()
			fatal(err)
		}
		return
	default:
		fatal(fmt.Errorf("unknown scenario %q: want latency or placement", *scenario))
	}
	if *key == "" {
		b, err := os.ReadFile(filepath.Join(".sandbox", "api-key"))
		if err != nil {
			fatal(fmt.Errorf("no API key: set SANDBOX_API_KEY or run from the repository after make up: %w", err))
		}
		*key = strings.TrimSpace(string(b))
	}
	results, err := run(context.Background(), *addr, *key, *template, *n)
	if err != nil {
		fatal(err)
	}
	fmt.Printf("%-28s %6s %9s %9s %9s %9s\n", "scenario", "count", "p50 ms", "p90 ms", "p99 ms", "max ms")
	for _, r := range results {
		fmt.Printf("%-28s %6d %9.2f %9.2f %9.2f %9.2f\n", r.Scenario, r.Count, r.P50, r.P90, r.P99, r.Max)
	}
	if *jsonOut != "" {
		b, _ := json.MarshalIndent(results, "", "  ")
		if err := os.WriteFile(*jsonOut, append(b, '\n'), 0o644); err != nil {
			fatal(err)
		}
	}
}

func run(ctx context.Context, addr, key, template string, n int) ([]Result, error) {
	hc := api.NewH2CClient()
	sessions := sandboxv1connect.NewSessionServiceClient(hc, addr, api.WithBearer(key))
	executions := sandboxv1connect.NewExecutionServiceClient(hc, addr, api.WithBearer(key))

	var create, terminate, execute []time.Duration
	for range n {
		t0 := time.Now()
		resp, err := sessions.CreateSession(ctx, connect.NewRequest(&sandboxv1.CreateSessionRequest{TemplateId: template}))
		if err != nil {
			return nil, fmt.Errorf("CreateSession: %w", err)
		}
		create = append(create, time.Since(t0))
		id := resp.Msg.GetSession().GetId()
		t0 = time.Now()
		if _, err := sessions.TerminateSession(ctx, connect.NewRequest(&sandboxv1.TerminateSessionRequest{SessionId: id})); err != nil {
			return nil, fmt.Errorf("TerminateSession: %w", err)
		}
		terminate = append(terminate, time.Since(t0))
	}

	resp, err := sessions.CreateSession(ctx, connect.NewRequest(&sandboxv1.CreateSessionRequest{TemplateId: template}))
	if err != nil {
		return nil, fmt.Errorf("CreateSession: %w", err)
	}
	id := resp.Msg.GetSession().GetId()
	defer sessions.TerminateSession(context.WithoutCancel(ctx), connect.NewRequest(&sandboxv1.TerminateSessionRequest{SessionId: id}))
	for i := range n + 5 {
		t0 := time.Now()
		r, err := executions.Execute(ctx, connect.NewRequest(&sandboxv1.ExecuteRequest{SessionId: id, Language: "python", Code: "print(1)"}))
		if err != nil {
			return nil, fmt.Errorf("Execute: %w", err)
		}
		if r.Msg.GetExecution().GetStdout() != "1\n" {
			return nil, fmt.Errorf("Execute print(1): %v", r.Msg.GetExecution())
		}
		if i >= 5 { // the first runs warm the page cache
			execute = append(execute, time.Since(t0))
		}
	}
	return []Result{
		summarize("create_session_cold", create),
		summarize("terminate_session", terminate),
		summarize("execute_python_print1", execute),
	}, nil
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

// placementMain runs the placement scenario and reports it.
func placementMain(agents, concurrency int, duration time.Duration, jsonOut string) error {
	dir, cleanup, err := tempDir()
	if err != nil {
		return err
	}
	defer cleanup()
	res, err := runPlacement(context.Background(), PlacementConfig{Agents: agents, Concurrency: concurrency, Duration: duration, Dir: dir})
	if err != nil {
		return err
	}
	fmt.Printf("placement: %d agents, %d concurrent, %.1f s: %.0f placements/s (%d refused, %d errors, %d agents overcommitted)\n",
		res.Agents, res.Concurrency, res.Seconds, res.PerSecond, res.Refused, res.Errors, res.Overcommitted)
	r := res.Latency
	fmt.Printf("%-28s %8s %9s %9s %9s %9s\n", "latency", "count", "p50 ms", "p90 ms", "p99 ms", "max ms")
	fmt.Printf("%-28s %8d %9.2f %9.2f %9.2f %9.2f\n", r.Scenario, r.Count, r.P50, r.P90, r.P99, r.Max)
	if jsonOut != "" {
		out := struct {
			Scenario string          `json:"scenario"`
			Commit   string          `json:"commit"`
			Date     string          `json:"date"`
			Result   PlacementResult `json:"result"`
		}{"placement", gitCommit(), time.Now().UTC().Format(time.RFC3339), res}
		b, _ := json.MarshalIndent(out, "", "  ")
		if err := os.WriteFile(jsonOut, append(b, '\n'), 0o644); err != nil {
			return err
		}
	}
	if res.Overcommitted > 0 {
		return fmt.Errorf("%d agents overcommitted", res.Overcommitted)
	}
	return nil
}

// gitCommit is the commit of the working tree, or "unknown".
func gitCommit() string {
	b, err := exec.Command("git", "rev-parse", "HEAD").Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(b))
}

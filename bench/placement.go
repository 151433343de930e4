package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/sandboxhq/sandbox"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/scheduler"
	"github.com/sandboxhq/sandbox/scheduler/fsm"
	"github.com/sandboxhq/sandbox/scheduler/raftnode"
)

// PlacementConfig sizes the placement scenario.
type PlacementConfig struct {
	// Agents is how many simulated agents register.
	Agents int
	// Concurrency is how many goroutines place sessions at once.
	Concurrency int
	// Duration is how long they keep placing.
	Duration time.Duration
	// Dir holds the servers' Raft state (bbolt); it must exist.
	Dir string
}

// PlacementResult is what the placement scenario measured.
type PlacementResult struct {
	Latency     Result  `json:"latency"`
	Agents      int     `json:"agents"`
	Concurrency int     `json:"concurrency"`
	Seconds     float64 `json:"seconds"`
	PerSecond   float64 `json:"placements_per_second"`
	// Refused counts placements that found no room; Errors, other failures.
	Refused int `json:"refused"`
	Errors  int `json:"errors"`
	// Overcommitted counts agents holding more than their capacity at the
	// end (must be 0).
	Overcommitted int `json:"overcommitted"`
}

// benchAgentCPU and benchAgentMemory are each simulated agent's capacity.
const (
	benchAgentCPU    = 64000
	benchAgentMemory = 262144
)

// runPlacement builds an in-process 3-server cluster (in-memory Raft
// transport, real bbolt log stores, LAN timeouts) with a scheduler on the
// leader, registers the simulated agents, and drives PlaceSession (pick an
// agent, commit the session STARTING through Raft) from cfg.Concurrency
// goroutines for cfg.Duration.
func runPlacement(ctx context.Context, cfg PlacementConfig) (PlacementResult, error) {
	res := PlacementResult{Agents: cfg.Agents, Concurrency: cfg.Concurrency}
	quiet := slog.New(slog.DiscardHandler)
	var (
		nodes      []*raftnode.Node
		fsms       []*fsm.FSM
		transports []*raft.InmemTransport
	)
	defer func() {
		for _, n := range nodes {
			n.Close()
		}
	}()
	for i := range 3 {
		_, tr := raft.NewInmemTransport("")
		rc := raftnode.DefaultConfig()
		rc.ID = fmt.Sprintf("bench-%d", i+1)
		rc.DataDir = filepath.Join(cfg.Dir, rc.ID)
		rc.Transport = tr
		rc.Bootstrap = i == 0
		rc.Logger = quiet
		f := fsm.New(quiet)
		n, err := raftnode.New(rc, f)
		if err != nil {
			return res, err
		}
		nodes, fsms, transports = append(nodes, n), append(fsms, f), append(transports, tr)
	}
	for _, a := range transports {
		for _, b := range transports {
			if a != b {
				a.Connect(b.LocalAddr(), b)
			}
		}
	}
	leader := nodes[0]
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for !leader.IsLeader() {
		if err := leader.WaitForLeader(wctx); err != nil {
			return res, err
		}
		select {
		case <-wctx.Done():
			return res, fmt.Errorf("waiting for %s to lead: %w", leader.ID(), wctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
	for _, n := range nodes[1:] {
		if err := leader.AddVoter(wctx, n.ID(), n.Addr()); err != nil {
			return res, err
		}
	}

	tmpl := &sandboxv1.Template{
		Id: "bench", Image: "bench", Languages: []string{"python"},
		DefaultLimits: limitsProto(sandbox.DefaultLimits), MaxLimits: limitsProto(sandbox.MaxLimits), CreatedAt: timestamppb.Now(),
	}
	if _, err := leader.Apply(wctx, fsm.CreateTemplateType, &statev1.CreateTemplate{Template: tmpl}); err != nil {
		return res, err
	}
	if err := registerAgents(wctx, leader, cfg.Agents); err != nil {
		return res, err
	}

	scfg := scheduler.DefaultConfig()
	scfg.Logger = quiet
	s := scheduler.New(scfg, fsms[0], leader)

	var (
		mu        sync.Mutex
		latencies []time.Duration
		wg        sync.WaitGroup
	)
	start := time.Now()
	deadline := start.Add(cfg.Duration)
	for range cfg.Concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []time.Duration
			refused, failed := 0, 0
			for time.Now().Before(deadline) && ctx.Err() == nil {
				t0 := time.Now()
				_, err := s.PlaceSession(ctx, tmpl, sandbox.DefaultLimits, scheduler.SessionSpec{Tenant: "bench"})
				switch {
				case err == nil:
					mine = append(mine, time.Since(t0))
				case errors.Is(err, sandbox.ErrResourceExhausted):
					refused++
				default:
					failed++
				}
			}
			mu.Lock()
			latencies = append(latencies, mine...)
			res.Refused += refused
			res.Errors += failed
			mu.Unlock()
		}()
	}
	wg.Wait()
	res.Seconds = time.Since(start).Seconds()
	res.Latency = summarize("placement", latencies)
	res.PerSecond = float64(res.Latency.Count) / res.Seconds
	fsms[0].ForEachAgent(func(a *statev1.Agent, cpu, mem int64, _ int32) {
		if cpu > int64(a.GetCpuMillis()) || mem > a.GetMemoryMib() {
			res.Overcommitted++
		}
	})
	return res, nil
}

// registerAgents commits n agents with RegisterAgent, many at a time so that
// Raft batches them.
func registerAgents(ctx context.Context, leader *raftnode.Node, n int) error {
	const workers = 64
	ids := make(chan int)
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range ids {
				_, err := leader.Apply(ctx, fsm.RegisterAgentType, &statev1.RegisterAgent{Agent: &statev1.Agent{
					Id: fmt.Sprintf("agent-%05d", i), Address: fmt.Sprintf("10.%d.%d.%d:7500", i>>16&255, i>>8&255, i&255),
					CpuMillis: benchAgentCPU, MemoryMib: benchAgentMemory, RegisteredAt: timestamppb.Now(),
				}})
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	var err error
feed:
	for i := range n {
		select {
		case ids <- i:
		case err = <-errs:
			break feed
		}
	}
	close(ids)
	wg.Wait()
	close(errs)
	if err != nil {
		return fmt.Errorf("register agents: %w", err)
	}
	if err := <-errs; err != nil {
		return fmt.Errorf("register agents: %w", err)
	}
	return nil
}

func limitsProto(l sandbox.Limits) *sandboxv1.ResourceLimits {
	return &sandboxv1.ResourceLimits{
		CpuMillis: l.CPUMillis, MemoryMib: l.MemoryMiB, Pids: l.Pids, DiskMib: l.DiskMiB,
		MaxExecutionTimeoutSeconds: l.MaxExecutionTimeoutSeconds,
	}
}

// tempDir makes a directory for the scenario's Raft state.
func tempDir() (string, func(), error) {
	dir, err := os.MkdirTemp("", "sandbox-bench-placement-")
	if err != nil {
		return "", nil, err
	}
	return dir, func() { os.RemoveAll(dir) }, nil
}

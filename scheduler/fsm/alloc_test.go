package fsm

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/sandboxhq/sandbox"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
)

func registerSized(id string, cpu int32, mem int64) cmd {
	return cmd{RegisterAgentType, &statev1.RegisterAgent{Agent: &statev1.Agent{Id: id, CpuMillis: cpu, MemoryMib: mem, RegisteredAt: ts(1)}}}
}

func placeSession(id, agent string, cpu int32, mem int64, state sandboxv1.SessionState) cmd {
	return cmd{CreateSessionType, &statev1.CreateSession{Session: &sandboxv1.Session{
		Id: id, TemplateId: "custom", State: state, AgentId: agent, CreatedAt: ts(40), Tenant: "t1",
		ResourceLimits: &sandboxv1.ResourceLimits{CpuMillis: cpu, MemoryMib: mem},
	}}}
}

// alloc is one agent's row of ForEachAgent.
type alloc struct {
	cpu, mem int64
	n        int32
}

func allocs(f *FSM) map[string]alloc {
	out := map[string]alloc{}
	f.ForEachAgent(func(a *statev1.Agent, cpu, mem int64, n int32) {
		out[a.GetId()] = alloc{cpu, mem, n}
	})
	return out
}

// placed returns the seeded fixture with agents "big" (4000 millis, 4096
// MiB) holding sessions "p1" (RUNNING, 1000/1024) and "p2" (STARTING,
// 2000/1024), and "small" (1000 millis, 1024 MiB) holding nothing.
func placed(t *testing.T) *FSM {
	t.Helper()
	f := seeded(t)
	mustApply(t, f,
		registerSized("big", 4000, 4096), registerSized("small", 1000, 1024),
		placeSession("p1", "big", 1000, 1024, sRunning),
		placeSession("p2", "big", 2000, 1024, sStarting),
	)
	return f
}

func wantAllocs(t *testing.T, f *FSM, want map[string]alloc) {
	t.Helper()
	got := allocs(f)
	for id, w := range want {
		if got[id] != w {
			t.Errorf("agent %s holds %+v, want %+v", id, got[id], w)
		}
	}
}

func TestAllocationRules(t *testing.T) {
	runRules(t, placed, []ruleCase{
		{
			name: "create counts a live session",
			cmd:  placeSession("p3", "small", 500, 256, sStarting),
			check: func(t *testing.T, f *FSM) {
				wantAllocs(t, f, map[string]alloc{"small": {500, 256, 1}, "big": {3000, 2048, 2}})
			},
		},
		{
			name:  "exactly full fits",
			cmd:   placeSession("p3", "big", 1000, 2048, sStarting),
			check: func(t *testing.T, f *FSM) { wantAllocs(t, f, map[string]alloc{"big": {4000, 4096, 3}}) },
		},
		{name: "over cpu is refused", cmd: placeSession("p3", "big", 1001, 1, sStarting), wantErr: sandbox.ErrResourceExhausted},
		{name: "over memory is refused", cmd: placeSession("p3", "small", 1, 1025, sPending), wantErr: sandbox.ErrResourceExhausted},
		{
			name:  "an ended session is not checked nor counted",
			cmd:   placeSession("p3", "big", 9000, 9000, sTerminated),
			check: func(t *testing.T, f *FSM) { wantAllocs(t, f, map[string]alloc{"big": {3000, 2048, 2}}) },
		},
		{
			name:  "an unknown agent is not checked",
			cmd:   placeSession("p3", "ghost", 9000, 9000, sStarting),
			check: func(t *testing.T, f *FSM) { wantAllocs(t, f, map[string]alloc{"big": {3000, 2048, 2}}) },
		},
		{
			name:  "terminal releases",
			cmd:   updateSession("p2", sFailed, 50),
			check: func(t *testing.T, f *FSM) { wantAllocs(t, f, map[string]alloc{"big": {1000, 1024, 1}}) },
		},
		{
			name:  "terminating still holds",
			cmd:   updateSession("p1", sTerminating, 50),
			check: func(t *testing.T, f *FSM) { wantAllocs(t, f, map[string]alloc{"big": {3000, 2048, 2}}) },
		},
		{
			name:  "same state is a no-op that keeps",
			cmd:   updateSession("p1", sRunning, 50),
			same:  true,
			check: func(t *testing.T, f *FSM) { wantAllocs(t, f, map[string]alloc{"big": {3000, 2048, 2}}) },
		},
		{
			name: "moving a session moves what it holds",
			cmd:  cmd{UpdateSessionType, &statev1.UpdateSession{SessionId: "p1", State: sRunning, AgentId: "small", At: ts(50)}},
			check: func(t *testing.T, f *FSM) {
				wantAllocs(t, f, map[string]alloc{"big": {2000, 1024, 1}, "small": {1000, 1024, 1}})
			},
		},
		{
			name:  "re-registering keeps what an agent holds",
			cmd:   registerSized("big", 8000, 8192),
			check: func(t *testing.T, f *FSM) { wantAllocs(t, f, map[string]alloc{"big": {3000, 2048, 2}}) },
		},
	})
}

func TestAllocationAfterPurgeAndRestore(t *testing.T) {
	f := placed(t)
	mustApply(t, f, updateSession("p2", sFailed, 50))
	if resp := apply(t, f, purge("p2")); resp != (Purged{Sessions: 1}) {
		t.Fatalf("purge = %#v", resp)
	}
	wantAllocs(t, f, map[string]alloc{"big": {1000, 1024, 1}, "small": {}})

	// A session placed before its agent registers counts once it does.
	mustApply(t, f, placeSession("early", "late", 100, 100, sStarting), registerSized("late", 1000, 1000))
	wantAllocs(t, f, map[string]alloc{"late": {100, 100, 1}})

	g := New(nil)
	mustApply(t, g, putTemplate("custom", false), registerSized("big", 1, 1), placeSession("stale", "big", 1, 1, sRunning))
	if err := g.Restore(io.NopCloser(bytes.NewReader(persist(t, f)))); err != nil {
		t.Fatal(err)
	}
	want := allocs(f)
	if got := allocs(g); len(got) != len(want) {
		t.Fatalf("restored %v, want %v", got, want)
	}
	wantAllocs(t, g, want)
	// The restored index keeps enforcing capacity.
	if err, _ := apply(t, g, placeSession("p9", "big", 3001, 1, sStarting)).(error); !errors.Is(err, sandbox.ErrResourceExhausted) {
		t.Errorf("over capacity after restore: %v, want ErrResourceExhausted", err)
	}
	mustApply(t, g, placeSession("p9", "big", 3000, 3072, sStarting))
	wantAllocs(t, g, map[string]alloc{"big": {4000, 4096, 2}})
	if cpu, mem, n := g.AgentUsage("big"); cpu != 4000 || mem != 4096 || n != 2 {
		t.Errorf("AgentUsage(big) = %d %d %d", cpu, mem, n)
	}
}

// bruteFit is what ForEachFit's first agent must be: the READY agent with
// room for cpu and mem and the least free memory, then cpu, then the
// earliest registration, found by scanning every agent.
func bruteFit(f *FSM, cpu, mem int64) string {
	best, bestMem, bestCPU := "", int64(0), int64(0)
	f.ForEachAgentLoad(func(a *statev1.Agent, l *AgentLoad) {
		fm, fc := l.MemoryMiB-l.MemoryUsed, l.CPUMillis-l.CPUUsed
		if l.State != sandboxv1.NodeState_NODE_STATE_READY || fm < mem || fc < cpu {
			return
		}
		if best == "" || fm < bestMem || (fm == bestMem && fc < bestCPU) {
			best, bestMem, bestCPU = a.GetId(), fm, fc
		}
	})
	return best
}

func firstFit(f *FSM, cpu, mem int64) string {
	got := ""
	f.ForEachFit(cpu, mem, func(a *statev1.Agent, _ *AgentLoad) bool {
		got = a.GetId()
		return false
	})
	return got
}

// TestFitIndexMatchesScan drives random registrations, drains, sessions,
// ends, purges and a restore, and checks after every step that the fit
// index yields what a scan of every agent finds.
func TestFitIndexMatchesScan(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	f := seeded(t)
	var live, ended []string
	check := func(step int) {
		t.Helper()
		for range 5 {
			cpu, mem := int64(rng.IntN(3000)), int64(rng.IntN(3000))
			if got, want := firstFit(f, cpu, mem), bruteFit(f, cpu, mem); got != want {
				t.Fatalf("step %d: best fit for %d millis %d MiB: index says %q, scan says %q", step, cpu, mem, got, want)
			}
		}
	}
	for step := range 2000 {
		switch r := rng.IntN(10); {
		case r == 0:
			id := fmt.Sprintf("a%d", rng.IntN(40))
			apply(t, f, registerSized(id, int32(1000+rng.IntN(4000)), int64(1000+rng.IntN(4000))))
		case r == 1:
			states := []sandboxv1.NodeState{sandboxv1.NodeState_NODE_STATE_READY, sandboxv1.NodeState_NODE_STATE_DRAINING, sandboxv1.NodeState_NODE_STATE_DEAD}
			apply(t, f, cmd{SetAgentStateType, &statev1.SetAgentState{AgentId: fmt.Sprintf("a%d", rng.IntN(40)), State: states[rng.IntN(len(states))], At: ts(2)}})
		case r < 6:
			id := fmt.Sprintf("s%d", step)
			if err, _ := apply(t, f, placeSession(id, fmt.Sprintf("a%d", rng.IntN(40)), int32(rng.IntN(1500)), int64(rng.IntN(1500)), sStarting)).(error); err == nil {
				live = append(live, id)
			}
		case r < 9 && len(live) > 0:
			i := rng.IntN(len(live))
			mustApply(t, f, updateSession(live[i], sFailed, 50))
			ended = append(ended, live[i])
			live = slices.Delete(live, i, i+1)
		case len(ended) > 0:
			apply(t, f, purge(ended...))
			ended = nil
		}
		check(step)
	}
	g := New(nil)
	if err := g.Restore(io.NopCloser(bytes.NewReader(persist(t, f)))); err != nil {
		t.Fatal(err)
	}
	f = g
	check(-1)
}

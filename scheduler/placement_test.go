package scheduler

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/sandboxhq/sandbox"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/scheduler/fsm"
)

func TestPickAgent(t *testing.T) {
	agent := func(id string, cpu int32, mem int64) *statev1.Agent {
		return &statev1.Agent{Id: id, CpuMillis: cpu, MemoryMib: mem}
	}
	req := sandbox.Limits{CPUMillis: 1000, MemoryMiB: 512}
	cases := []struct {
		name    string
		cands   []candidate
		want    string
		wantErr error
	}{
		{"no agents", nil, "", sandbox.ErrUnavailable},
		{"one that fits", []candidate{{agent: agent("a", 2000, 1024)}}, "a", nil},
		{"exactly full fits", []candidate{{agent: agent("a", 1000, 512)}}, "a", nil},
		{"never over capacity", []candidate{{agent: agent("a", 2000, 1024), cpuUsed: 1500}}, "", sandbox.ErrResourceExhausted},
		{"memory counts too", []candidate{{agent: agent("a", 8000, 1024), memoryUse: 600}}, "", sandbox.ErrResourceExhausted},
		{"best fit: least memory left", []candidate{
			{agent: agent("big", 8000, 8192)},
			{agent: agent("small", 8000, 1024)},
		}, "small", nil},
		{"a warm container wins over a better fit", []candidate{
			{agent: agent("small", 8000, 1024)},
			{agent: agent("big-warm", 8000, 8192), warm: 2},
		}, "big-warm", nil},
		{"warm but full loses", []candidate{
			{agent: agent("full-warm", 8000, 1024), memoryUse: 1024, warm: 3},
			{agent: agent("free", 8000, 8192)},
		}, "free", nil},
		{"skips the full one", []candidate{
			{agent: agent("full", 8000, 1024), memoryUse: 1024},
			{agent: agent("free", 8000, 8192)},
		}, "free", nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := pickAgent(c.cands, req)
			if c.wantErr != nil {
				if !errors.Is(err, c.wantErr) {
					t.Fatalf("err %v, want %v", err, c.wantErr)
				}
				return
			}
			if err != nil || got.GetId() != c.want {
				t.Fatalf("got %v %v, want %s", got.GetId(), err, c.want)
			}
		})
	}
}

func TestPaginate(t *testing.T) {
	all := []int{1, 2, 3, 4, 5}
	page, next, err := paginate(all, 2, "")
	if err != nil || len(page) != 2 || next == "" {
		t.Fatalf("%v %q %v", page, next, err)
	}
	page, next, err = paginate(all, 2, next)
	if err != nil || page[0] != 3 || next == "" {
		t.Fatalf("%v %q %v", page, next, err)
	}
	page, next, err = paginate(all, 2, next)
	if err != nil || len(page) != 1 || next != "" {
		t.Fatalf("%v %q %v", page, next, err)
	}
	if _, _, err := paginate(all, 2, "garbage!"); !errors.Is(err, sandbox.ErrInvalidArgument) {
		t.Fatalf("bad token: %v", err)
	}
	if _, _, err := paginate(all, -1, ""); !errors.Is(err, sandbox.ErrInvalidArgument) {
		t.Fatalf("negative size: %v", err)
	}
}

// TestPlaceSessionNeverOvercommits races placements from two schedulers
// over one Raft node: their reservations do not see each other, so only the
// FSM's capacity check keeps them apart, and a refused pick is placed again.
func TestPlaceSessionNeverOvercommits(t *testing.T) {
	s1, f := newTestScheduler(t)
	s2 := New(s1.cfg, f, s1.raft)
	ctx := context.Background()
	const perAgent = 8
	limits := sandbox.Limits{CPUMillis: 500, MemoryMiB: 256}
	for _, id := range []string{"a1", "a2"} {
		if err := s1.apply(ctx, fsm.RegisterAgentType, &statev1.RegisterAgent{Agent: &statev1.Agent{
			Id: id, Address: "127.0.0.1:1", CpuMillis: perAgent * 500, MemoryMib: perAgent * 256 * 4, RegisteredAt: timestamppb.Now(),
		}}); err != nil {
			t.Fatal(err)
		}
	}
	tmpl, ok := f.Template("python-basic")
	if !ok {
		t.Fatal("no python-basic template")
	}
	const tries = 3 * 2 * perAgent
	var wg sync.WaitGroup
	errs := make(chan error, tries)
	for i := range tries {
		s := s1
		if i%2 == 1 {
			s = s2
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := s.PlaceSession(ctx, tmpl, limits, SessionSpec{Tenant: "t"})
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	placed := 0
	for err := range errs {
		switch {
		case err == nil:
			placed++
		case !errors.Is(err, sandbox.ErrResourceExhausted):
			t.Errorf("PlaceSession: %v, want success or ErrResourceExhausted", err)
		}
	}
	if placed != 2*perAgent {
		t.Errorf("placed %d sessions, want %d (every slot filled)", placed, 2*perAgent)
	}
	f.ForEachAgent(func(a *statev1.Agent, cpu, mem int64, n int32) {
		if cpu > int64(a.GetCpuMillis()) || mem > a.GetMemoryMib() || n != perAgent {
			t.Errorf("agent %s holds %d millis, %d MiB in %d sessions; capacity %d millis", a.GetId(), cpu, mem, n, a.GetCpuMillis())
		}
	})
}

func TestPlaceSkipsSilentAgents(t *testing.T) {
	s, _ := newTestScheduler(t)
	ctx := context.Background()
	for _, id := range []string{"quiet", "talking"} {
		if err := s.apply(ctx, fsm.RegisterAgentType, &statev1.RegisterAgent{Agent: &statev1.Agent{
			Id: id, CpuMillis: 4000, MemoryMib: 4096, RegisteredAt: timestamppb.Now(),
		}}); err != nil {
			t.Fatal(err)
		}
	}
	s.mu.Lock()
	s.agentSeen["quiet"] = time.Now().Add(-2 * s.cfg.AgentTimeout)
	s.agentSeen["talking"] = time.Now()
	s.mu.Unlock()
	// "quiet" has less room left after the session, so best fit would take it.
	if err := s.apply(ctx, fsm.RegisterAgentType, &statev1.RegisterAgent{Agent: &statev1.Agent{
		Id: "quiet", CpuMillis: 1000, MemoryMib: 1024, RegisteredAt: timestamppb.Now(),
	}}); err != nil {
		t.Fatal(err)
	}
	s.refreshLiveness(time.Now(), nil)
	a, release, err := s.place(sandbox.Limits{CPUMillis: 500, MemoryMiB: 512}, "python-basic")
	if err != nil {
		t.Fatal(err)
	}
	release()
	if a.GetId() != "talking" {
		t.Errorf("placed on %s, want talking", a.GetId())
	}
}

// TestPlaceAgreesWithPicker checks that place, which looks at warm agents
// and then walks the FSM's fit index, picks what the picker's rules pick
// from a scan of every agent: random fleets, usage, silent agents and warm
// pools.
func TestPlaceAgreesWithPicker(t *testing.T) {
	s, f := newTestScheduler(t)
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(3, 4))
	const agents = 60
	for i := range agents {
		id := fmt.Sprintf("a%02d", i)
		if err := s.apply(ctx, fsm.RegisterAgentType, &statev1.RegisterAgent{Agent: &statev1.Agent{
			Id: id, CpuMillis: int32(1000 + 500*rng.IntN(8)), MemoryMib: int64(1024 * (1 + rng.IntN(8))), RegisteredAt: timestamppb.Now(),
		}}); err != nil {
			t.Fatal(err)
		}
	}
	for round := range 40 {
		// Some usage, placed straight through the FSM.
		for range 10 {
			sess := &sandboxv1.Session{
				Id: newID("ses"), TemplateId: "python-basic", State: sandboxv1.SessionState_SESSION_STATE_RUNNING, Tenant: "t",
				AgentId: fmt.Sprintf("a%02d", rng.IntN(agents)), CreatedAt: timestamppb.Now(),
				ResourceLimits: &sandboxv1.ResourceLimits{CpuMillis: int32(250 * rng.IntN(4)), MemoryMib: int64(256 * rng.IntN(4))},
			}
			_ = s.apply(ctx, fsm.CreateSessionType, &statev1.CreateSession{Session: sess}) // over capacity is refused; fine
		}
		view := &liveness{at: time.Now().Add(time.Hour), mesh: true, alive: map[string]bool{}}
		warm := map[string]int32{}
		for i := range agents {
			id := fmt.Sprintf("a%02d", i)
			view.alive[id] = rng.IntN(8) != 0
			ready := map[string]int32{}
			if rng.IntN(10) == 0 {
				warm[id] = int32(1 + rng.IntN(3))
				ready["python-basic"] = warm[id]
			}
			s.noteWarm(id, "boot", uint64(round+1), ready)
		}
		s.placement.live.Store(view)
		l := sandbox.Limits{CPUMillis: int32(250 * (1 + rng.IntN(8))), MemoryMiB: int64(256 * (1 + rng.IntN(16)))}
		var cands []candidate
		f.ForEachAgentLoad(func(a *statev1.Agent, ld *fsm.AgentLoad) {
			if ld.State == sandboxv1.NodeState_NODE_STATE_READY && view.ok(a.GetId()) {
				cands = append(cands, candidate{agent: a, cpuUsed: ld.CPUUsed, memoryUse: ld.MemoryUsed, warm: warm[a.GetId()]})
			}
		})
		want, wantErr := pickAgent(cands, l)
		got, release, err := s.place(l, "python-basic")
		if (err == nil) != (wantErr == nil) {
			t.Fatalf("round %d, %+v: place err %v, picker err %v", round, l, err, wantErr)
		}
		if err != nil {
			continue
		}
		release()
		// Warm agents tie in a map's order; the fit among them must match.
		if got.GetId() != want.GetId() {
			g, w := warm[got.GetId()], warm[want.GetId()]
			gc, gm, _ := f.AgentUsage(got.GetId())
			wc, wm, _ := f.AgentUsage(want.GetId())
			if (g > 0) != (w > 0) || got.GetMemoryMib()-gm != want.GetMemoryMib()-wm || int64(got.GetCpuMillis())-gc != int64(want.GetCpuMillis())-wc {
				t.Fatalf("round %d, %+v: place chose %s (warm %d), the picker %s (warm %d)", round, l, got.GetId(), g, want.GetId(), w)
			}
		}
	}
}

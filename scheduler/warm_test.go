package scheduler

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/sandboxhq/sandbox"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/scheduler/fsm"
)

func TestWarmShares(t *testing.T) {
	agents := []*statev1.Agent{{Id: "a", MemoryMib: 1000}, {Id: "b", MemoryMib: 3000}, {Id: "c", MemoryMib: 1000}}
	tmpls := []*sandboxv1.Template{{Id: "py", WarmPoolSize: 10}, {Id: "none"}, {Id: "one", WarmPoolSize: 1}}
	got := warmShares(tmpls, agents)
	if got["a"]["py"] != 2 || got["b"]["py"] != 6 || got["c"]["py"] != 2 {
		t.Errorf("py spread %v %v %v, want 2 6 2 (by memory)", got["a"]["py"], got["b"]["py"], got["c"]["py"])
	}
	sum := got["a"]["one"] + got["b"]["one"] + got["c"]["one"]
	if sum != 1 || got["b"]["one"] != 1 {
		t.Errorf("a pool of one: %v, want it on the largest agent", got)
	}
	if got["a"]["none"] != 0 || got["b"]["none"] != 0 {
		t.Errorf("a template without a pool got shares: %v", got)
	}
	for _, size := range []int32{1, 7, 199, 200} {
		g := warmShares([]*sandboxv1.Template{{Id: "x", WarmPoolSize: size}}, agents)
		if s := g["a"]["x"] + g["b"]["x"] + g["c"]["x"]; s != size {
			t.Errorf("size %d spread into %d", size, s)
		}
	}
	if g := warmShares(tmpls, nil); len(g) != 0 {
		t.Errorf("no agents: %v", g)
	}
}

// TestSyncWarmPools: a template's pool goes to the live agent; a change is
// sent, an unchanged target is not sent again until the resend interval,
// and a drained agent is told to keep nothing.
func TestSyncWarmPools(t *testing.T) {
	s, f := newTestScheduler(t)
	ctx := context.Background()
	agent := &fakeAgent{}
	addr := serveFakeAgent(t, agent)
	if err := s.apply(ctx, fsm.RegisterAgentType, &statev1.RegisterAgent{Agent: &statev1.Agent{
		Id: "a1", Address: addr, CpuMillis: 8000, MemoryMib: 8192, BootId: "b1", RegisteredAt: timestamppb.Now(),
	}}); err != nil {
		t.Fatal(err)
	}
	sent := func() [][]string {
		agent.mu.Lock()
		defer agent.mu.Unlock()
		var out [][]string
		for _, ps := range agent.pools {
			var row []string
			for _, p := range ps {
				row = append(row, p.GetTemplateId()+"="+string(rune('0'+p.GetSize())))
			}
			out = append(out, row)
		}
		return out
	}
	now := time.Now()
	s.syncWarmPools(ctx, now)
	if got := sent(); len(got) != 0 {
		t.Fatalf("sent %v before any template has a pool", got)
	}
	size := int32(3)
	if _, err := s.UpdateTemplate(ctx, &sandboxv1.UpdateTemplateRequest{TemplateId: "python-basic", WarmPoolSize: &size}); err != nil {
		t.Fatal(err)
	}
	s.syncWarmPools(ctx, now)
	s.syncWarmPools(ctx, now.Add(time.Second))
	if got := sent(); len(got) != 1 || len(got[0]) != 1 || got[0][0] != "python-basic=3" {
		t.Fatalf("sent %v, want one SetWarmPools with python-basic=3", got)
	}
	agent.mu.Lock()
	p := agent.pools[0][0]
	agent.mu.Unlock()
	tmpl, _ := f.Template("python-basic")
	if p.GetImage() != tmpl.GetImage() || p.GetLimits().GetMemoryMib() != tmpl.GetDefaultLimits().GetMemoryMib() {
		t.Errorf("target %v does not carry the template's image and default limits", p)
	}
	s.syncWarmPools(ctx, now.Add(warmResendInterval+time.Second))
	if got := sent(); len(got) != 2 {
		t.Fatalf("after the resend interval: sent %v, want the targets again", got)
	}
	if _, err := s.DrainNode(ctx, "a1"); err != nil {
		t.Fatal(err)
	}
	s.syncWarmPools(ctx, now.Add(warmResendInterval+2*time.Second))
	if got := sent(); len(got) != 3 || len(got[2]) != 0 {
		t.Fatalf("after a drain: sent %v, want empty targets last", got)
	}
	// Bad sizes are refused and change nothing.
	for _, bad := range []int32{-1, MaxWarmPoolSize + 1} {
		if _, err := s.UpdateTemplate(ctx, &sandboxv1.UpdateTemplateRequest{TemplateId: "python-basic", WarmPoolSize: &bad}); err == nil {
			t.Errorf("UpdateTemplate warm_pool_size %d accepted", bad)
		}
	}
	if _, err := s.UpdateTemplate(ctx, &sandboxv1.UpdateTemplateRequest{TemplateId: "nope", WarmPoolSize: &size}); err == nil {
		t.Error("UpdateTemplate of an unknown template accepted")
	}
	if tmpl, _ := f.Template("python-basic"); tmpl.GetWarmPoolSize() != 3 {
		t.Errorf("warm_pool_size %d after refused updates, want 3", tmpl.GetWarmPoolSize())
	}
}

// TestCreateSessionClaimsWarm: with an agent advertising a warm container
// of the template, CreateSession has the agent start the session first and
// commits it once, RUNNING on the agent's container; a retry with the same
// idempotency key gets the same session.
func TestCreateSessionClaimsWarm(t *testing.T) {
	s, _ := newTestScheduler(t)
	ctx := context.Background()
	agent := &fakeAgent{}
	addr := serveFakeAgent(t, agent)
	if err := s.apply(ctx, fsm.RegisterAgentType, &statev1.RegisterAgent{Agent: &statev1.Agent{
		Id: "a1", Address: addr, CpuMillis: 8000, MemoryMib: 8192, BootId: "b1", RegisteredAt: timestamppb.Now(),
	}}); err != nil {
		t.Fatal(err)
	}
	s.placement.live.Store(&liveness{at: time.Now().Add(time.Hour), stale: map[string]bool{}})
	s.noteWarm("a1", "b1", 1, map[string]int32{"python-basic": 5})
	before := settledIndex(t, s)
	sess, err := s.CreateSession(ctx, &sandboxv1.CreateSessionRequest{TemplateId: "python-basic", IdempotencyKey: "k1"})
	if err != nil {
		t.Fatal(err)
	}
	if sess.GetState() != sandboxv1.SessionState_SESSION_STATE_RUNNING || sess.GetContainerId() != "c-"+sess.GetId() || sess.GetAgentId() != "a1" {
		t.Fatalf("warm session %v", sess)
	}
	if n := settledIndex(t, s) - before; n != 1 {
		t.Errorf("a warm start took %d commits, want 1", n)
	}
	again, err := s.CreateSession(ctx, &sandboxv1.CreateSessionRequest{TemplateId: "python-basic", IdempotencyKey: "k1"})
	if err != nil || again.GetId() != sess.GetId() {
		t.Fatalf("retry with the key: %v, %v; want session %s", again, err, sess.GetId())
	}
	agent.mu.Lock()
	started := len(agent.started)
	agent.mu.Unlock()
	if started != 1 {
		t.Errorf("the agent started %d sessions, want 1", started)
	}
}

// TestWarmPicksSpreadAndVersions: warm picks not answered yet count against
// an agent's advertised pool, so a burst spreads over the pools and no pick
// counts on a container another pick took; an older count never replaces a
// newer one, and a new boot's count replaces any.
func TestWarmPicksSpreadAndVersions(t *testing.T) {
	s, _ := newTestScheduler(t)
	ctx := context.Background()
	for _, id := range []string{"a1", "a2"} {
		if err := s.apply(ctx, fsm.RegisterAgentType, &statev1.RegisterAgent{Agent: &statev1.Agent{
			Id: id, Address: "127.0.0.1:1", CpuMillis: 64000, MemoryMib: 65536, BootId: "b", RegisteredAt: timestamppb.Now(),
		}}); err != nil {
			t.Fatal(err)
		}
	}
	s.placement.live.Store(&liveness{at: time.Now().Add(time.Hour), stale: map[string]bool{}})
	s.noteWarm("a1", "b", 5, map[string]int32{"python-basic": 2})
	s.noteWarm("a2", "b", 5, map[string]int32{"python-basic": 2})
	l := sandbox.Limits{CPUMillis: 100, MemoryMiB: 64}
	got := map[string]int{}
	var releases []func()
	for range 4 {
		a, h, err := s.placeWarm(l, "python-basic")
		if err != nil || !h.pickedWarm {
			t.Fatalf("pick: %v, hold %+v", err, h)
		}
		got[a.GetId()]++
		releases = append(releases, h.release)
	}
	if got["a1"] != 2 || got["a2"] != 2 {
		t.Errorf("4 warm picks went %v, want 2 and 2", got)
	}
	if _, h, _ := s.placeWarm(l, "python-basic"); h.pickedWarm {
		t.Error("a fifth pick counted on a warm container four unanswered picks hold")
	} else {
		h.release()
	}
	// The answers come: a1 has none left. An older gossip count is ignored.
	s.noteWarm("a1", "", 7, map[string]int32{})
	s.noteWarm("a1", "b", 6, map[string]int32{"python-basic": 2})
	for _, r := range releases {
		r()
	}
	if a, h, _ := s.placeWarm(l, "python-basic"); !h.pickedWarm || a.GetId() != "a2" {
		t.Errorf("after a1's pool emptied: picked %s warm %v, want a2 warm", a.GetId(), h.pickedWarm)
	} else {
		h.release()
	}
	// A restarted agent starts counting again (and a2's pool is empty now).
	s.noteWarm("a2", "", 9, map[string]int32{})
	s.noteWarm("a1", "b2", 1, map[string]int32{"python-basic": 9})
	if a, h, _ := s.placeWarm(l, "python-basic"); !h.pickedWarm || a.GetId() != "a1" {
		t.Errorf("after a1 restarted with 9 ready: picked %s warm %v, want a1", a.GetId(), h.pickedWarm)
	} else {
		h.release()
	}
}

// TestWarmPickAnswered: once an agent has answered a warm pick, its
// answer's count stands alone, even while the pick still waits for its
// commit: the pick is not subtracted again from a count that already left
// it out, so the agent's remaining warm container is still picked.
func TestWarmPickAnswered(t *testing.T) {
	s, _ := newTestScheduler(t)
	if err := s.apply(context.Background(), fsm.RegisterAgentType, &statev1.RegisterAgent{Agent: &statev1.Agent{
		Id: "a1", Address: "127.0.0.1:1", CpuMillis: 64000, MemoryMib: 65536, BootId: "b", RegisteredAt: timestamppb.Now(),
	}}); err != nil {
		t.Fatal(err)
	}
	s.placement.live.Store(&liveness{at: time.Now().Add(time.Hour), stale: map[string]bool{}})
	s.noteWarm("a1", "b", 5, map[string]int32{"python-basic": 2})
	l := sandbox.Limits{CPUMillis: 100, MemoryMiB: 64}
	_, first, err := s.placeWarm(l, "python-basic")
	if err != nil || !first.pickedWarm {
		t.Fatalf("first pick: %v, hold %+v", err, first)
	}
	first.answered(6, map[string]int32{"python-basic": 1}) // its commit is still under way
	_, second, err := s.placeWarm(l, "python-basic")
	if err != nil || !second.pickedWarm {
		t.Fatalf("second pick while the first awaits its commit: %v, warm %v; want the agent's last warm container", err, second != nil && second.pickedWarm)
	}
	first.release()
	first.release() // twice is harmless
	_, third, _ := s.placeWarm(l, "python-basic")
	if third.pickedWarm {
		t.Error("a third pick counted on a warm container the second holds")
	}
	second.release()
	third.release()
	if n := len(s.placement.warmInflight) + len(s.placement.inflight); n != 0 {
		t.Errorf("%d holds left after every release", n)
	}
}

// TestWarmStartFailure: a warm start whose claim fails after its commit
// ends FAILED with the reason, its container stopped, and the call fails
// unavailable.
func TestWarmStartFailure(t *testing.T) {
	s, f := newTestScheduler(t)
	ctx := context.Background()
	agent := &fakeAgent{startErr: connect.NewError(connect.CodeInternal, errors.New("no room in the runtime"))}
	addr := serveFakeAgent(t, agent)
	if err := s.apply(ctx, fsm.RegisterAgentType, &statev1.RegisterAgent{Agent: &statev1.Agent{
		Id: "a1", Address: addr, CpuMillis: 8000, MemoryMib: 8192, BootId: "b1", RegisteredAt: timestamppb.Now(),
	}}); err != nil {
		t.Fatal(err)
	}
	s.placement.live.Store(&liveness{at: time.Now().Add(time.Hour), stale: map[string]bool{}})
	s.noteWarm("a1", "b1", 1, map[string]int32{"python-basic": 5})
	_, err := s.CreateSession(ctx, &sandboxv1.CreateSessionRequest{TemplateId: "python-basic"})
	if !errors.Is(err, sandbox.ErrUnavailable) {
		t.Fatalf("CreateSession = %v, want unavailable", err)
	}
	agent.mu.Lock()
	started, stopped := slices.Clone(agent.started), slices.Clone(agent.stopped)
	agent.mu.Unlock()
	if len(started) != 1 || !slices.Equal(stopped, started) {
		t.Fatalf("started %v, stopped %v: want the failed start stopped", started, stopped)
	}
	if sess, ok := f.Session(started[0]); !ok || sess.GetState() != sandboxv1.SessionState_SESSION_STATE_FAILED || !strings.Contains(sess.GetStateReason(), "no room") {
		t.Fatalf("session after a failed warm start: %v", sess)
	}
}

package scheduler

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/sandboxhq/sandbox"
	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/internal/membership"
	"github.com/sandboxhq/sandbox/scheduler/fsm"
)

// maxPlaceAttempts bounds how often PlaceSession picks again after the FSM
// refused its pick for lack of room (another placement took it first).
const maxPlaceAttempts = 5

// livenessTTL is how old the liveness snapshot placement uses may get.
const livenessTTL = agentSweepInterval

// candidate is an agent with what its live sessions already hold.
type candidate struct {
	agent     *statev1.Agent
	cpuUsed   int64
	memoryUse int64
	// warm is how many ready containers of the session's template the agent
	// advertises.
	warm int32
}

// picker keeps the best candidate seen so far for a session with limits l:
// among the agents that can hold it without going over their capacity, one
// with a warm container of its template if any, then the best fit (the one
// left with the least free memory, then cpu), so that large holes stay open
// for large sessions. It never overcommits.
type picker struct {
	l                sandbox.Limits
	found            bool
	best             candidate
	bestMem, bestCPU int64
}

// better reports whether c fits and beats the best so far.
func (p *picker) better(c candidate) bool {
	return p.beats(int64(c.agent.GetCpuMillis())-c.cpuUsed, c.agent.GetMemoryMib()-c.memoryUse, c.warm)
}

// beats reports whether an agent with cpu and memory free and warm ready
// containers fits and beats the best so far.
func (p *picker) beats(cpuFree, memFree int64, warm int32) bool {
	freeCPU := cpuFree - int64(p.l.CPUMillis)
	freeMem := memFree - p.l.MemoryMiB
	if freeCPU < 0 || freeMem < 0 {
		return false
	}
	return !p.found ||
		(warm > 0 && p.best.warm == 0) ||
		((warm > 0) == (p.best.warm > 0) && (freeMem < p.bestMem || (freeMem == p.bestMem && freeCPU < p.bestCPU)))
}

// take makes c the best; the caller checked better(c).
func (p *picker) take(c candidate) {
	p.found, p.best = true, c
	p.bestCPU = int64(c.agent.GetCpuMillis()) - c.cpuUsed - int64(p.l.CPUMillis)
	p.bestMem = c.agent.GetMemoryMib() - c.memoryUse - p.l.MemoryMiB
}

// pickAgent chooses where a session with limits l goes among cands (see picker).
func pickAgent(cands []candidate, l sandbox.Limits) (*statev1.Agent, error) {
	p := picker{l: l}
	for _, c := range cands {
		if p.better(c) {
			p.take(c)
		}
	}
	if !p.found {
		return nil, noRoom(len(cands), l)
	}
	return p.best.agent, nil
}

func noRoom(alive int, l sandbox.Limits) error {
	if alive == 0 {
		return fmt.Errorf("%w: no agent is registered and alive; start sandbox-agent on a host", sandbox.ErrUnavailable)
	}
	return fmt.Errorf("%w: no agent has room for %d cpu millis and %d MiB (%d agents alive)", sandbox.ErrResourceExhausted, l.CPUMillis, l.MemoryMiB, alive)
}

// liveness is a snapshot of which agents may take new sessions and what
// their warm pools hold, so that a placement does not ask the mesh (or
// lock the scheduler) once per agent.
type liveness struct {
	at   time.Time
	mesh bool
	// alive (with a mesh) holds the agents the mesh sees alive or suspect.
	alive map[string]bool
	// stale (without a mesh) holds the agents that registered with this
	// server and then went silent for AgentTimeout; one this server has not
	// heard from yet counts as alive, since the replicated state says READY.
	stale map[string]bool
}

func (v *liveness) ok(agentID string) bool {
	if v.mesh {
		return v.alive[agentID]
	}
	return !v.stale[agentID]
}

// placementState is the leader's view that placement keeps between calls.
type placementState struct {
	live   atomic.Pointer[liveness]
	liveMu sync.Mutex // serialises rebuilding live

	// mu serialises picking, so that the reservations below count every
	// pick this server has made but not yet committed.
	mu sync.Mutex
	// inflight is what picks not yet committed hold, by agent id.
	inflight map[string]*reservation
	// warm is the newest count of each agent's ready warm containers this
	// server heard (gossip or a StartSession answer, by version), indexed
	// by template in warmIdx; warmInflight counts this server's warm picks
	// (by agent and template) whose StartSession has not answered yet, so a
	// burst spreads over the pools instead of piling on one agent.
	warm         map[string]agentWarm
	warmIdx      map[string]map[string]int32
	warmInflight map[string]int32
}

// agentWarm is one agent's warm pools as last heard.
type agentWarm struct {
	boot    string
	version uint64
	ready   map[string]int32
}

// noteWarm records an agent's warm pool count if it is newer than the one
// held: a higher version, or any version of a new boot (boot empty: the
// same boot as held, from a StartSession answer).
func (s *Scheduler) noteWarm(agentID, boot string, version uint64, ready map[string]int32) {
	ps := &s.placement
	ps.mu.Lock()
	defer ps.mu.Unlock()
	ps.noteWarmLocked(agentID, boot, version, ready)
}

func (ps *placementState) noteWarmLocked(agentID, boot string, version uint64, ready map[string]int32) {
	cur, known := ps.warm[agentID]
	if boot == "" {
		boot = cur.boot
	}
	if known && boot == cur.boot && version <= cur.version {
		return
	}
	if ps.warm == nil {
		ps.warm, ps.warmIdx = map[string]agentWarm{}, map[string]map[string]int32{}
	}
	for t := range cur.ready {
		delete(ps.warmIdx[t], agentID)
	}
	for t, n := range ready {
		if n <= 0 {
			continue
		}
		if ps.warmIdx[t] == nil {
			ps.warmIdx[t] = map[string]int32{}
		}
		ps.warmIdx[t][agentID] = n
	}
	ps.warm[agentID] = agentWarm{boot: boot, version: version, ready: ready}
}

func warmKeyOf(agentID, templateID string) string { return agentID + "\x00" + templateID }

type reservation struct {
	cpuMillis, memoryMiB int64
	n                    int
}

// liveView returns a liveness snapshot at most livenessTTL old.
func (s *Scheduler) liveView(now time.Time) *liveness {
	if v := s.placement.live.Load(); v != nil && now.Sub(v.at) < livenessTTL {
		return v
	}
	s.placement.liveMu.Lock()
	defer s.placement.liveMu.Unlock()
	if v := s.placement.live.Load(); v != nil && now.Sub(v.at) < livenessTTL {
		return v
	}
	return s.refreshLiveness(now, nil)
}

// refreshLiveness rebuilds the liveness snapshot, from members when given
// (the mesh's member list a sweep already fetched), and stores it.
func (s *Scheduler) refreshLiveness(now time.Time, members []membership.Member) *liveness {
	v := &liveness{at: now, mesh: s.cfg.Mesh != nil}
	if v.mesh {
		if members == nil {
			members = s.cfg.Mesh.Members()
		}
		v.alive = make(map[string]bool, len(members))
		for _, m := range members {
			if m.Meta.GetRole() != agentv1.NodeMeta_ROLE_AGENT {
				continue
			}
			id := m.Meta.GetId()
			if m.State == membership.StateAlive || m.State == membership.StateSuspect {
				v.alive[id] = true
			}
			s.noteWarm(id, m.Meta.GetBootId(), m.Meta.GetWarmVersion(), m.Meta.GetWarm())
		}
	} else {
		v.stale = map[string]bool{}
		s.mu.Lock()
		for id, seen := range s.agentSeen {
			if now.Sub(seen) >= s.cfg.AgentTimeout {
				v.stale[id] = true
			}
		}
		s.mu.Unlock()
	}
	s.placement.live.Store(v)
	return v
}

// place picks an agent for a session with limits l of a template and
// reserves its room until release is called (once the pick is committed or
// abandoned). Agents advertising a warm container of the template are
// considered first (there are few); when none fits, the FSM's fit index
// yields the agents in best-fit order and the first that is alive and
// still fits with this server's reservations wins. So a placement visits a
// handful of agents however many there are, and allocates nothing per
// agent. A reservation is checked for fit; ranking uses committed usage.
func (s *Scheduler) place(l sandbox.Limits, templateID string) (*statev1.Agent, func(), error) {
	agent, h, err := s.placeWarm(l, templateID)
	if err != nil {
		return nil, nil, err
	}
	return agent, h.release, nil
}

// placeWarm is place, returning the hold, which says whether the agent was
// picked for a warm container of the template.
func (s *Scheduler) placeWarm(l sandbox.Limits, templateID string) (*statev1.Agent, *hold, error) {
	view := s.liveView(time.Now())
	ps := &s.placement
	ps.mu.Lock()
	defer ps.mu.Unlock()
	p := picker{l: l}
	var bestID string
	consider := func(a *statev1.Agent, ld *fsm.AgentLoad, w int32) {
		if ld.State != sandboxv1.NodeState_NODE_STATE_READY {
			return
		}
		if !p.beats(ld.CPUMillis-ld.CPUUsed, ld.MemoryMiB-ld.MemoryUsed, w) || !view.ok(a.GetId()) {
			return
		}
		c := candidate{agent: a, cpuUsed: ld.CPUUsed, memoryUse: ld.MemoryUsed, warm: w}
		if r, ok := ps.inflight[a.GetId()]; ok {
			c.cpuUsed += r.cpuMillis
			c.memoryUse += r.memoryMiB
			if !p.better(c) {
				return
			}
		}
		p.take(c)
		bestID = a.GetId()
	}
	for id, w := range ps.warmIdx[templateID] {
		if w -= ps.warmInflight[warmKeyOf(id, templateID)]; w <= 0 {
			continue
		}
		s.fsm.WithAgentLoad(id, func(a *statev1.Agent, ld *fsm.AgentLoad) { consider(a, ld, w) })
	}
	if !p.found {
		s.fsm.ForEachFit(int64(l.CPUMillis), l.MemoryMiB, func(a *statev1.Agent, ld *fsm.AgentLoad) bool {
			consider(a, ld, 0)
			return !p.found
		})
	}
	if !p.found {
		alive := 0
		s.fsm.ForEachAgent(func(a *statev1.Agent, _, _ int64, _ int32) {
			if a.GetState() == sandboxv1.NodeState_NODE_STATE_READY && view.ok(a.GetId()) {
				alive++
			}
		})
		return nil, nil, noRoom(alive, l)
	}
	agent, ok := s.fsm.Agent(bestID)
	if !ok {
		return nil, nil, fmt.Errorf("%w: agent %s vanished during placement", sandbox.ErrUnavailable, bestID)
	}
	warm := p.best.warm > 0
	wk := warmKeyOf(bestID, templateID)
	if warm {
		if ps.warmInflight == nil {
			ps.warmInflight = map[string]int32{}
		}
		ps.warmInflight[wk]++
	}
	if ps.inflight == nil {
		ps.inflight = map[string]*reservation{}
	}
	r := ps.inflight[bestID]
	if r == nil {
		r = &reservation{}
		ps.inflight[bestID] = r
	}
	r.cpuMillis += int64(l.CPUMillis)
	r.memoryMiB += l.MemoryMiB
	r.n++
	return agent, &hold{s: s, agentID: bestID, wk: wk, l: l, r: r, pickedWarm: warm, warm: warm}, nil
}

// hold is a placement's reservation of room on an agent and, for a warm
// pick, of one of its warm containers.
type hold struct {
	s       *Scheduler
	agentID string
	wk      string
	l       sandbox.Limits
	r       *reservation
	// pickedWarm: the agent was picked for a warm container; warm: the
	// pick still counts on it (until answered or released).
	pickedWarm, warm bool
	done             bool
}

// release gives the reservation back (once the pick is committed or
// abandoned).
func (h *hold) release() {
	ps := &h.s.placement
	ps.mu.Lock()
	defer ps.mu.Unlock()
	if h.done {
		return
	}
	h.done = true
	h.r.cpuMillis -= int64(h.l.CPUMillis)
	h.r.memoryMiB -= h.l.MemoryMiB
	if h.r.n--; h.r.n == 0 {
		delete(ps.inflight, h.agentID)
	}
	h.dropWarmLocked()
}

// answered takes the agent's warm counts from its answer to the start
// (version, ready) and, in the same step, stops counting on the warm
// container: the answer's counts no longer include it. Doing the two
// apart would leave a moment in which the pick is subtracted twice, and a
// concurrent placement, seeing no warm container on the agent, would go to
// the best fit instead, which may have none left.
func (h *hold) answered(version uint64, ready map[string]int32) {
	ps := &h.s.placement
	ps.mu.Lock()
	defer ps.mu.Unlock()
	ps.noteWarmLocked(h.agentID, "", version, ready)
	h.dropWarmLocked()
}

func (h *hold) dropWarmLocked() {
	if !h.warm {
		return
	}
	h.warm = false
	ps := &h.s.placement
	if ps.warmInflight[h.wk]--; ps.warmInflight[h.wk] <= 0 {
		delete(ps.warmInflight, h.wk)
	}
}

// SessionSpec is what a new session carries besides its template and limits.
type SessionSpec struct {
	Env         map[string]string
	Labels      map[string]string
	IdleTimeout time.Duration
	MaxLifetime time.Duration
	Tenant      string
	// IdempotencyKey, when set, makes a retried request find the session
	// the first one created.
	IdempotencyKey string
}

// Placement is the outcome of PlaceSession.
type Placement struct {
	// Session is the committed session, STARTING on Agent.
	Session *sandboxv1.Session
	Agent   *statev1.Agent
	// Existing, when not empty, is the id of the session an earlier request
	// with the same idempotency key created; Session and Agent are then nil.
	Existing string
}

// newSession is the record of a new session of tmpl with limits and spec,
// in state st, placed nowhere yet.
func newSession(tmpl *sandboxv1.Template, limits sandbox.Limits, spec SessionSpec, st sandboxv1.SessionState) *sandboxv1.Session {
	now := timestamppb.Now()
	return &sandboxv1.Session{
		Id:                 newID("ses"),
		TemplateId:         tmpl.GetId(),
		State:              st,
		CreatedAt:          now,
		LastActiveAt:       now,
		ResourceLimits:     limitsToProto(limits),
		Env:                spec.Env,
		Labels:             spec.Labels,
		IdleTimeoutSeconds: int32(spec.IdleTimeout / time.Second),
		MaxLifetimeSeconds: int32(spec.MaxLifetime / time.Second),
		Tenant:             spec.Tenant,
	}
}

// PlaceSession is the part of creating a session before any agent is
// called: it picks an agent (see place) and commits the session STARTING
// there through Raft. Should the FSM refuse the commit because another
// placement took the room first, it picks again, a bounded number of times.
// Leader only: placement trusts this server's view of the committed state.
func (s *Scheduler) PlaceSession(ctx context.Context, tmpl *sandboxv1.Template, limits sandbox.Limits, spec SessionSpec) (*Placement, error) {
	sess := newSession(tmpl, limits, spec, sandboxv1.SessionState_SESSION_STATE_STARTING)
	var err error
	for attempt := 1; attempt <= maxPlaceAttempts; attempt++ {
		agent, release, perr := s.place(limits, tmpl.GetId())
		if perr != nil {
			return nil, perr
		}
		sess.AgentId = agent.GetId()
		var resp any
		resp, err = s.raft.Apply(ctx, fsm.CreateSessionType, &statev1.CreateSession{Session: sess, IdempotencyKey: spec.IdempotencyKey})
		release()
		switch {
		case err == nil:
			if ex, ok := resp.(fsm.Existing); ok {
				return &Placement{Existing: ex.ID}, nil
			}
			return &Placement{Session: sess, Agent: agent}, nil
		case !errors.Is(err, sandbox.ErrResourceExhausted):
			return nil, err
		}
		s.log.Debug("placement lost a race for room; picking again", "session", sess.GetId(), "agent", agent.GetId(), "attempt", attempt)
	}
	return nil, fmt.Errorf("session %s: gave up placing after %d attempts: %w", sess.GetId(), maxPlaceAttempts, err)
}

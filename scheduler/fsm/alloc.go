package fsm

import (
	"fmt"
	"math"

	"github.com/sandboxhq/sandbox"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
)

// usage is what the live sessions placed on one agent hold. It is derived
// from the sessions alone, so every server computes the same values and a
// snapshot need not store it: Restore rebuilds it.
type usage struct {
	cpuMillis int64
	memoryMiB int64
	sessions  int32
}

// AgentLoad is one agent's capacity, state and what the live sessions
// placed on it hold, laid out flat so that placement scans thousands of them
// without chasing pointers.
type AgentLoad struct {
	State sandboxv1.NodeState
	// CPUMillis and MemoryMiB are the agent's capacity.
	CPUMillis, MemoryMiB int64
	// CPUUsed, MemoryUsed and Sessions are what its live sessions hold.
	CPUUsed, MemoryUsed int64
	Sessions            int32
}

// agentSlot is one registered agent in the dense list that placement scans.
type agentSlot struct {
	agent *statev1.Agent
	load  AgentLoad
	// key is the agent's entry in the fit index, when indexed is set.
	key     fitKey
	indexed bool
}

// fitKey orders agents for best-fit placement: least free memory first,
// then least free cpu, then registration order.
type fitKey struct {
	memFree, cpuFree int64
	slot             int
}

func (a fitKey) less(b fitKey) bool {
	if a.memFree != b.memFree {
		return a.memFree < b.memFree
	}
	if a.cpuFree != b.cpuFree {
		return a.cpuFree < b.cpuFree
	}
	return a.slot < b.slot
}

// reindex puts slot i's agent in the fit index under its current free
// resources, or takes it out when it is not READY.
func (f *FSM) reindex(i int) {
	s := &f.agentList[i]
	if s.indexed {
		f.fit.Delete(s.key)
		s.indexed = false
	}
	if s.load.State != sandboxv1.NodeState_NODE_STATE_READY {
		return
	}
	s.key = fitKey{memFree: s.load.MemoryMiB - s.load.MemoryUsed, cpuFree: s.load.CPUMillis - s.load.CPUUsed, slot: i}
	s.indexed = true
	f.fit.ReplaceOrInsert(s.key)
}

// usageOf returns the usage record of an agent id, creating it; an id that no
// registered agent has yet still gets one (in orphans), so that a session
// placed before its agent registers is counted once the agent does. The
// pointer is valid until the next storeAgent.
func (f *FSM) usageOf(agentID string) *usage {
	if i, ok := f.agentPos[agentID]; ok {
		l := &f.agentList[i].load
		return &usage{cpuMillis: l.CPUUsed, memoryMiB: l.MemoryUsed, sessions: l.Sessions}
	}
	u, ok := f.orphans[agentID]
	if !ok {
		u = &usage{}
		f.orphans[agentID] = u
	}
	return u
}

// addUsage adds to what an agent id holds.
func (f *FSM) addUsage(agentID string, cpu, mem int64, n int32) {
	if i, ok := f.agentPos[agentID]; ok {
		l := &f.agentList[i].load
		l.CPUUsed += cpu
		l.MemoryUsed += mem
		l.Sessions += n
		f.reindex(i)
		return
	}
	u := f.usageOf(agentID)
	u.cpuMillis += cpu
	u.memoryMiB += mem
	u.sessions += n
}

// storeAgent records an agent and keeps the dense list in step. Agents are
// never deleted, so slots only grow.
func (f *FSM) storeAgent(a *statev1.Agent) {
	id := a.GetId()
	f.agents[id] = a
	i, ok := f.agentPos[id]
	if !ok {
		var l AgentLoad
		if u, ok := f.orphans[id]; ok {
			l.CPUUsed, l.MemoryUsed, l.Sessions = u.cpuMillis, u.memoryMiB, u.sessions
			delete(f.orphans, id)
		}
		i = len(f.agentList)
		f.agentPos[id] = i
		f.agentList = append(f.agentList, agentSlot{load: l})
	}
	s := &f.agentList[i]
	s.agent = a
	s.load.State = a.GetState()
	s.load.CPUMillis = int64(a.GetCpuMillis())
	s.load.MemoryMiB = a.GetMemoryMib()
	f.reindex(i)
}

// holds reports whether a session counts against its agent's capacity.
func holds(s *sandboxv1.Session) bool {
	return s.GetAgentId() != "" && sandbox.SessionState(s.GetState()).Live()
}

// account adds (sign 1) or removes (sign -1) what a session holds on its agent.
func (f *FSM) account(s *sandboxv1.Session, sign int64) {
	if !holds(s) {
		return
	}
	f.addUsage(s.GetAgentId(), sign*int64(s.GetResourceLimits().GetCpuMillis()), sign*s.GetResourceLimits().GetMemoryMib(), int32(sign))
}

// checkRoom refuses a live session that would take its registered agent over
// the agent's cpu or memory capacity. A session on an agent this state does
// not know is not checked.
func (f *FSM) checkRoom(s *sandboxv1.Session) error {
	if !holds(s) {
		return nil
	}
	a, ok := f.agents[s.GetAgentId()]
	if !ok {
		return nil
	}
	u := f.usageOf(a.GetId())
	cpu, mem := int64(s.GetResourceLimits().GetCpuMillis()), s.GetResourceLimits().GetMemoryMib()
	if u.cpuMillis+cpu > int64(a.GetCpuMillis()) || u.memoryMiB+mem > a.GetMemoryMib() {
		return fmt.Errorf("%w: session %q needs %d cpu millis and %d MiB, but agent %q has %d of %d cpu millis and %d of %d MiB free",
			sandbox.ErrResourceExhausted, s.GetId(), cpu, mem, a.GetId(),
			int64(a.GetCpuMillis())-u.cpuMillis, a.GetCpuMillis(), a.GetMemoryMib()-u.memoryMiB, a.GetMemoryMib())
	}
	return nil
}

// ForEachAgent calls fn for every registered agent, in registration order,
// with what the live sessions placed on it hold: cpu millis, memory MiB and
// their number. It copies nothing, so that placement can scan thousands of
// agents cheaply. fn runs under the FSM's read lock and sees the stored
// record: it must neither modify a nor keep it after it returns, nor call
// back into the FSM.
func (f *FSM) ForEachAgent(fn func(a *statev1.Agent, cpuUsed, memoryUsed int64, sessions int32)) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	for i := range f.agentList {
		s := &f.agentList[i]
		fn(s.agent, s.load.CPUUsed, s.load.MemoryUsed, s.load.Sessions)
	}
}

// ForEachAgentLoad is ForEachAgent with the agent's state and capacity
// copied beside its usage, so that fn need not read the agent record. The
// same rules hold: fn must not modify or keep a or l, nor call back into the
// FSM.
func (f *FSM) ForEachAgentLoad(fn func(a *statev1.Agent, l *AgentLoad)) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	for i := range f.agentList {
		fn(f.agentList[i].agent, &f.agentList[i].load)
	}
}

// ForEachFit calls fn for the READY agents with at least memoryMiB memory
// and cpuMillis cpu free, in best-fit order (least free memory, then least
// free cpu, then registration order), until fn returns false. Only the
// agents it visits cost anything, so a placement among thousands of agents
// usually looks at a handful. The rules of ForEachAgentLoad hold for fn.
func (f *FSM) ForEachFit(cpuMillis, memoryMiB int64, fn func(a *statev1.Agent, l *AgentLoad) bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	f.fit.AscendGreaterOrEqual(fitKey{memFree: memoryMiB, cpuFree: math.MinInt64, slot: -1}, func(k fitKey) bool {
		if k.cpuFree < cpuMillis {
			return true
		}
		s := &f.agentList[k.slot]
		return fn(s.agent, &s.load)
	})
}

// WithAgentLoad calls fn with an agent's record and load; it is false for an agent
// that is not registered. The rules of ForEachAgentLoad hold for fn.
func (f *FSM) WithAgentLoad(agentID string, fn func(a *statev1.Agent, l *AgentLoad)) bool {
	f.mu.RLock()
	defer f.mu.RUnlock()
	i, ok := f.agentPos[agentID]
	if !ok {
		return false
	}
	fn(f.agentList[i].agent, &f.agentList[i].load)
	return true
}

// AgentUsage returns what the live sessions placed on an agent hold.
func (f *FSM) AgentUsage(agentID string) (cpuUsed, memoryUsed int64, sessions int32) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if _, ok := f.agentPos[agentID]; !ok {
		if _, ok := f.orphans[agentID]; !ok {
			return 0, 0, 0
		}
	}
	u := f.usageOf(agentID)
	return u.cpuMillis, u.memoryMiB, u.sessions
}

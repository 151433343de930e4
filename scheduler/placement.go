package scheduler

import (
	"fmt"
	"time"

	"github.com/sandboxhq/sandbox"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
)

// candidate is an agent with what its live sessions already hold.
type candidate struct {
	agent     *statev1.Agent
	cpuUsed   int64
	memoryUse int64
	// warm is how many ready containers of the session's template the agent
	// advertises.
	warm int32
}

// pickAgent chooses where a session with limits l goes: among the agents that
// can hold it without going over their capacity, one with a warm container
// of its template if any, then the best fit (the one left with the least
// free memory, then cpu), so that large holes stay open for large sessions.
// It never overcommits.
func pickAgent(cands []candidate, l sandbox.Limits) (*statev1.Agent, error) {
	if len(cands) == 0 {
		return nil, fmt.Errorf("%w: no agent is registered and alive; start sandbox-agent on a host", sandbox.ErrUnavailable)
	}
	var best *candidate
	var bestMem, bestCPU int64
	for i := range cands {
		c := &cands[i]
		freeCPU := int64(c.agent.GetCpuMillis()) - c.cpuUsed - int64(l.CPUMillis)
		freeMem := c.agent.GetMemoryMib() - c.memoryUse - l.MemoryMiB
		if freeCPU < 0 || freeMem < 0 {
			continue
		}
		better := best == nil ||
			(c.warm > 0 && best.warm == 0) ||
			((c.warm > 0) == (best.warm > 0) && (freeMem < bestMem || (freeMem == bestMem && freeCPU < bestCPU)))
		if better {
			best, bestMem, bestCPU = c, freeMem, freeCPU
		}
	}
	if best == nil {
		return nil, fmt.Errorf("%w: no agent has room for %d cpu millis and %d MiB (%d agents alive)", sandbox.ErrResourceExhausted, l.CPUMillis, l.MemoryMiB, len(cands))
	}
	return best.agent, nil
}

// place picks an agent for a new session from the live agents and the live sessions.
func (s *Scheduler) place(l sandbox.Limits, templateID string) (*statev1.Agent, error) {
	now := time.Now()
	var cands []candidate
	idx := map[string]int{}
	for _, a := range s.fsm.Agents() {
		if a.GetState() != sandboxv1.NodeState_NODE_STATE_READY || !s.agentAlive(a.GetId(), now) {
			continue
		}
		idx[a.GetId()] = len(cands)
		cands = append(cands, candidate{agent: a, warm: s.warmContainers(a.GetId(), templateID)})
	}
	for _, sess := range s.fsm.Sessions(func(sess *sandboxv1.Session) bool {
		return sandbox.SessionState(sess.GetState()).Live()
	}) {
		i, ok := idx[sess.GetAgentId()]
		if !ok {
			continue
		}
		cands[i].cpuUsed += int64(sess.GetResourceLimits().GetCpuMillis())
		cands[i].memoryUse += sess.GetResourceLimits().GetMemoryMib()
	}
	return pickAgent(cands, l)
}

// agentAlive reports whether the gossip mesh sees the agent alive; without a
// mesh, whether the agent has not gone silent on this server (one this
// server has not heard from yet counts as alive: the replicated state says
// READY).
func (s *Scheduler) agentAlive(id string, now time.Time) bool {
	if s.cfg.Mesh != nil {
		return s.meshAlive(id)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	seen, ok := s.agentSeen[id]
	return !ok || now.Sub(seen) < s.cfg.AgentTimeout
}

// warmContainers is what the mesh says an agent holds ready for a template.
func (s *Scheduler) warmContainers(agentID, templateID string) int32 {
	if s.cfg.Mesh == nil {
		return 0
	}
	return s.meshAgents()[agentID].Meta.GetWarm()[templateID]
}

package scheduler

import (
	"context"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/internal/membership"
	"github.com/sandboxhq/sandbox/scheduler/fsm"
)

// Mesh is the scheduler's view of the gossip mesh (membership.Mesh).
type Mesh interface {
	Members() []membership.Member
}

// meshEvents is a mesh that also reports changes as they happen
// (membership.Mesh does).
type meshEvents interface {
	Events() <-chan membership.Event
}

// followMesh reads the mesh's changes until ctx ends: an agent's new
// metadata updates the warm pool counts placement uses at once, instead of
// at the next sweep (a session claimed right after a pool refilled would
// otherwise miss it). Reading also keeps the mesh's event queue empty.
func (s *Scheduler) followMesh(ctx context.Context, events <-chan membership.Event) {
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-events:
			if !ok {
				return
			}
			m := ev.Member.Meta
			if m.GetRole() != agentv1.NodeMeta_ROLE_AGENT {
				continue
			}
			switch ev.Type {
			case membership.EventJoined, membership.EventUpdated:
				s.noteWarm(m.GetId(), m.GetBootId(), m.GetWarmVersion(), m.GetWarm())
			}
		}
	}
}

// agentSweepInterval is how often the leader checks the mesh for dead agents.
const agentSweepInterval = 200 * time.Millisecond

// watchAgents sweeps the mesh's verdicts while this server leads, until ctx ends.
func (s *Scheduler) watchAgents(ctx context.Context) {
	if s.cfg.Mesh == nil {
		return
	}
	if ev, ok := s.cfg.Mesh.(meshEvents); ok {
		done := make(chan struct{})
		defer func() { <-done }()
		go func() {
			defer close(done)
			s.followMesh(ctx, ev.Events())
		}()
	}
	t := time.NewTicker(agentSweepInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			// Placement reads liveness from this snapshot instead of asking
			// the mesh once per agent.
			members := s.cfg.Mesh.Members()
			s.refreshLiveness(now, members)
			if s.raft.IsLeader() {
				s.sweepAgents(ctx, now, members)
			}
		}
	}
}

// meshAgents returns the mesh's state of every agent member by agent id.
func (s *Scheduler) meshAgents() map[string]membership.Member {
	return agentMembers(s.cfg.Mesh.Members())
}

// agentMembers returns the state of every agent member by agent id.
func agentMembers(members []membership.Member) map[string]membership.Member {
	out := map[string]membership.Member{}
	for _, m := range members {
		if m.Meta.GetRole() == agentv1.NodeMeta_ROLE_AGENT {
			out[m.Meta.GetId()] = m
		}
	}
	return out
}

// sweepAgents (leader only) turns the mesh's verdicts into replicated state.
// An agent the mesh reports failed, left or unknown for longer than
// AgentDeadGrace is committed DEAD or LEFT and its sessions and unfinished
// executions LOST. The grace (1 s by default: with about 1 s of detection a
// dead agent's sessions end LOST within about 2-3 s) lets an agent that is
// restarted at once (kill -9, then start) come back and re-adopt its
// containers instead.
func (s *Scheduler) sweepAgents(ctx context.Context, now time.Time, all []membership.Member) {
	if s.cfg.Mesh == nil {
		return
	}
	members := agentMembers(all)
	for _, a := range s.fsm.Agents() {
		st := a.GetState()
		if st != sandboxv1.NodeState_NODE_STATE_READY && st != sandboxv1.NodeState_NODE_STATE_DRAINING {
			continue
		}
		m, known := members[a.GetId()]
		if known && (m.State == membership.StateAlive || m.State == membership.StateSuspect) {
			s.mu.Lock()
			delete(s.agentDown, a.GetId())
			s.mu.Unlock()
			continue
		}
		if !known && now.Sub(s.started) < s.cfg.AgentDeadGrace*2 {
			continue // this server's mesh may not know everyone yet
		}
		s.mu.Lock()
		since, ok := s.agentDown[a.GetId()]
		if !ok {
			s.agentDown[a.GetId()] = now
			since = now
		}
		s.mu.Unlock()
		if now.Sub(since) < s.cfg.AgentDeadGrace {
			continue
		}
		state, reason := sandboxv1.NodeState_NODE_STATE_DEAD, "declared dead by the gossip mesh"
		switch {
		case known && m.State == membership.StateLeft:
			state, reason = sandboxv1.NodeState_NODE_STATE_LEFT, "left the gossip mesh"
		case !known:
			reason = "not a member of the gossip mesh"
		}
		s.log.Warn("agent down", "agent", a.GetId(), "state", state, "reason", reason)
		if err := s.apply(ctx, fsm.SetAgentStateType, &statev1.SetAgentState{
			AgentId: a.GetId(), State: state, Reason: reason, At: timestamppb.Now(),
		}); err != nil {
			s.log.Warn("recording agent state", "agent", a.GetId(), "err", err)
			continue
		}
		if err := s.loseAgentSessions(ctx, a.GetId(), "agent "+a.GetId()+" "+reason); err != nil {
			s.log.Warn("losing sessions of a down agent", "agent", a.GetId(), "err", err)
		}
		s.mu.Lock()
		delete(s.agentDown, a.GetId())
		s.mu.Unlock()
	}
}

package scheduler

import (
	"context"
	"fmt"
	"slices"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/sandboxhq/sandbox"
	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/scheduler/fsm"
)

// redispatchAfter is how long a QUEUED execution the agent does not hold may
// wait before the leader hands it over again (it never started, so a retry
// cannot run it twice; the executor also refuses a known execution id).
const redispatchAfter = 3 * time.Second

// redispatchPendingAfter is how long a QUEUED execution the agent lists as
// pending may wait before it is handed over again: the agent's hand-over
// may have failed without an answer (so nobody knows whether the executor
// took it), or the executor's status report was lost. Handing over an id
// the executor holds changes nothing there.
const redispatchPendingAfter = 10 * time.Second

// A session left STARTING by a previous leader is RUNNING once its container
// runs orphanedStartGrace after creation, and FAILED when no container runs
// orphanedStartFail after creation.
const (
	orphanedStartGrace = 2 * time.Second
	orphanedStartFail  = 10 * time.Second
)

// isStarting reports whether this server is driving the session's start.
func (s *Scheduler) isStarting(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.starting[id]
}

func (s *Scheduler) setStarting(id string, on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if on {
		s.starting[id] = true
	} else {
		delete(s.starting, id)
	}
}

// reconcileAll compares every live agent with the replicated state.
func (s *Scheduler) reconcileAll(ctx context.Context) {
	for _, a := range s.fsm.Agents() {
		switch a.GetState() {
		case sandboxv1.NodeState_NODE_STATE_DEAD, sandboxv1.NodeState_NODE_STATE_LEFT:
			continue
		}
		if err := s.reconcileAgent(ctx, a); err != nil {
			s.log.Warn("reconcile agent", "agent", a.GetId(), "err", err)
		}
	}
}

// reconcileAgent asks an agent what it runs and makes the replicated state
// and the agent agree: sessions whose container is gone end LOST, sessions
// caught mid-start finish starting or fail, containers no live session owns
// are stopped, and executions that never reached the executor are handed
// over again. Every command carries this leader's fence.
func (s *Scheduler) reconcileAgent(ctx context.Context, a *statev1.Agent) error {
	// Read the sessions before asking the agent: a session that becomes
	// RUNNING after the agent answered must not look like one whose
	// container is gone.
	live := s.fsm.Sessions(func(x *sandboxv1.Session) bool {
		return x.GetAgentId() == a.GetId() && sandbox.SessionState(x.GetState()).Live()
	})
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	client := s.agents.get(a.GetAddress())
	resp, err := client.ListContainers(cctx, connect.NewRequest(&agentv1.ListContainersRequest{Fence: s.fence()}))
	if err != nil {
		return fmt.Errorf("list containers: %w", err)
	}
	running := map[string]*agentv1.Container{}
	for _, c := range resp.Msg.GetContainers() {
		if c.GetRunning() {
			running[c.GetSessionId()] = c
		}
	}
	now := time.Now()
	owned := map[string]bool{}
	for _, sess := range live {
		owned[sess.GetId()] = true
		c := running[sess.GetId()]
		switch sandbox.SessionState(sess.GetState()) {
		case sandbox.SessionPending, sandbox.SessionStarting:
			// A start this leader drives finishes on its own. One a previous
			// leader began (it died before recording the result) is decided
			// here: a running container after orphanedStartGrace means the
			// agent finished it (a start takes tens of milliseconds).
			age := now.Sub(sess.GetCreatedAt().AsTime())
			if s.isStarting(sess.GetId()) || age < orphanedStartGrace {
				continue
			}
			if c == nil && !agentHolds(resp.Msg.GetContainers(), sess.GetId()) {
				// The agent never heard of it: the previous leader died
				// between recording the start and asking for it. Start it now.
				if tmpl, ok := s.fsm.Template(sess.GetTemplateId()); ok {
					s.log.Info("starting a session a previous leader recorded but never started", "session", sess.GetId(), "agent", a.GetId())
					if err := s.startOnAgent(ctx, a, tmpl, sess); err != nil {
						s.log.Warn("restarting an orphaned start", "session", sess.GetId(), "err", err)
					}
					continue
				}
			}
			if c == nil && age < orphanedStartFail {
				continue // the agent is still starting it
			}
			if c != nil {
				err = s.apply(ctx, fsm.UpdateSessionType, &statev1.UpdateSession{
					SessionId: sess.GetId(), State: sandboxv1.SessionState_SESSION_STATE_RUNNING,
					ContainerId: c.GetContainerId(), At: timestamppb.Now(),
				})
			} else {
				err = s.apply(ctx, fsm.UpdateSessionType, &statev1.UpdateSession{
					SessionId: sess.GetId(), State: sandboxv1.SessionState_SESSION_STATE_FAILED,
					Reason: "its container never came up (the start was interrupted)", At: timestamppb.Now(),
				})
			}
		case sandbox.SessionRunning:
			if cur, ok := s.fsm.Session(sess.GetId()); c == nil && (!ok || cur.GetState() != sandboxv1.SessionState_SESSION_STATE_RUNNING) {
				continue // it moved on (a termination) since it was read
			}
			if c == nil && s.isStarting(sess.GetId()) {
				continue // a warm start of this server's, committed before its claim
			}
			if c == nil {
				reason := "its container is gone from agent " + a.GetId()
				s.log.Warn("session lost", "session", sess.GetId(), "agent", a.GetId())
				if err := s.endExecutions(ctx, sess.GetId(), sandboxv1.ExecutionState_EXECUTION_STATE_LOST, reason); err != nil {
					return err
				}
				err = s.apply(ctx, fsm.UpdateSessionType, &statev1.UpdateSession{
					SessionId: sess.GetId(), State: sandboxv1.SessionState_SESSION_STATE_LOST, Reason: reason, At: timestamppb.Now(),
				})
				break
			}
			s.redispatch(ctx, a, sess, c.GetPendingExecutionIds(), now)
		case sandbox.SessionTerminating:
			err = s.stopSession(ctx, sess, sess.GetStateReason())
		}
		if err := ignoreStale(err); err != nil {
			return err
		}
	}
	for sid, c := range running {
		if owned[sid] {
			continue
		}
		if cur, ok := s.fsm.Session(sid); ok && sandbox.SessionState(cur.GetState()).Live() {
			continue // created after the sessions were read
		}
		if s.isStarting(sid) {
			continue // a warm start of this server's, not committed yet
		}
		s.log.Warn("stopping a container no live session owns", "agent", a.GetId(), "session", sid, "container", c.GetContainerId())
		if _, err := client.StopSession(cctx, connect.NewRequest(&agentv1.StopSessionRequest{Fence: s.fence(), SessionId: sid})); err != nil {
			return fmt.Errorf("stop orphan container %s: %w", c.GetContainerId(), err)
		}
	}
	return nil
}

// redispatch hands QUEUED executions over to their agent again: those it
// does not hold after redispatchAfter, those it lists as pending after
// redispatchPendingAfter. Once the executor has taken one (again, or
// before), it is RUNNING, so that it is not handed over once more.
func (s *Scheduler) redispatch(ctx context.Context, a *statev1.Agent, sess *sandboxv1.Session, pending []string, now time.Time) {
	for _, e := range s.fsm.ExecutionsBySession(sess.GetId()) {
		wait := redispatchAfter
		if slices.Contains(pending, e.GetId()) {
			wait = redispatchPendingAfter
		}
		if e.GetState() != sandboxv1.ExecutionState_EXECUTION_STATE_QUEUED || now.Sub(e.GetCreatedAt().AsTime()) < wait {
			continue
		}
		s.log.Info("handing a queued execution over again", "execution", e.GetId(), "session", sess.GetId(), "agent", a.GetId(), "agent_holds_it", wait == redispatchPendingAfter)
		if err := s.dispatch(ctx, a, sess, e, nil); err != nil {
			s.log.Warn("redispatch", "execution", e.GetId(), "err", err)
			continue
		}
		err := s.apply(ctx, fsm.UpdateExecutionType, &statev1.UpdateExecution{Execution: &sandboxv1.Execution{
			Id: e.GetId(), State: sandboxv1.ExecutionState_EXECUTION_STATE_RUNNING,
		}})
		if err := ignoreStale(err); err != nil {
			s.log.Warn("recording a handed-over execution RUNNING", "execution", e.GetId(), "err", err)
		}
	}
}

// agentHolds reports whether the agent lists a session at all (running or not).
func agentHolds(cs []*agentv1.Container, sessionID string) bool {
	for _, c := range cs {
		if c.GetSessionId() == sessionID {
			return true
		}
	}
	return false
}

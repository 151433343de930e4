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
	live := s.fsm.Sessions(func(x *sandboxv1.Session) bool {
		return x.GetAgentId() == a.GetId() && sandbox.SessionState(x.GetState()).Live()
	})
	owned := map[string]bool{}
	for _, sess := range live {
		owned[sess.GetId()] = true
		c := running[sess.GetId()]
		switch sandbox.SessionState(sess.GetState()) {
		case sandbox.SessionPending, sandbox.SessionStarting:
			if now.Sub(sess.GetCreatedAt().AsTime()) < s.cfg.StartTimeout {
				continue // a start may still be under way
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
		s.log.Warn("stopping a container no live session owns", "agent", a.GetId(), "session", sid, "container", c.GetContainerId())
		if _, err := client.StopSession(cctx, connect.NewRequest(&agentv1.StopSessionRequest{Fence: s.fence(), SessionId: sid})); err != nil {
			return fmt.Errorf("stop orphan container %s: %w", c.GetContainerId(), err)
		}
	}
	return nil
}

// redispatch hands QUEUED executions the agent does not hold to it again.
func (s *Scheduler) redispatch(ctx context.Context, a *statev1.Agent, sess *sandboxv1.Session, pending []string, now time.Time) {
	for _, e := range s.fsm.ExecutionsBySession(sess.GetId()) {
		if e.GetState() != sandboxv1.ExecutionState_EXECUTION_STATE_QUEUED || slices.Contains(pending, e.GetId()) ||
			now.Sub(e.GetCreatedAt().AsTime()) < redispatchAfter {
			continue
		}
		s.log.Info("handing a queued execution over again", "execution", e.GetId(), "session", sess.GetId(), "agent", a.GetId())
		if err := s.dispatch(ctx, a, sess, e, nil); err != nil {
			s.log.Warn("redispatch", "execution", e.GetId(), "err", err)
		}
	}
}

package scheduler

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/api"
	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1/agentv1connect"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/scheduler/fsm"
)

// ControlPlaneHandler returns the internal port's handler: the
// ControlPlaneService the agents call, authenticated by the cluster token.
func (s *Scheduler) ControlPlaneHandler() http.Handler {
	keys := &api.Keys{}
	keys.AddAdmin("cluster", s.cfg.ClusterToken)
	mux := http.NewServeMux()
	mux.Handle(agentv1connect.NewControlPlaneServiceHandler(&controlPlane{s: s},
		connect.WithInterceptors(api.NewAuthInterceptor(keys)),
		connect.WithReadMaxBytes(16<<20),
		connect.WithCompressMinBytes(api.CompressMinBytes)))
	return mux
}

type controlPlane struct{ s *Scheduler }

func (c *controlPlane) RegisterAgent(ctx context.Context, req *connect.Request[agentv1.RegisterAgentRequest]) (*connect.Response[agentv1.RegisterAgentResponse], error) {
	if err := c.s.registerAgent(ctx, req.Msg); err != nil {
		return nil, api.Error(err)
	}
	return connect.NewResponse(&agentv1.RegisterAgentResponse{}), nil
}

func (c *controlPlane) ReportExecution(ctx context.Context, req *connect.Request[agentv1.ReportExecutionRequest]) (*connect.Response[agentv1.ReportExecutionResponse], error) {
	if err := c.s.reportExecution(ctx, req.Msg); err != nil {
		return nil, api.Error(err)
	}
	return connect.NewResponse(&agentv1.ReportExecutionResponse{}), nil
}

func (c *controlPlane) ReportSessionExit(ctx context.Context, req *connect.Request[agentv1.ReportSessionExitRequest]) (*connect.Response[agentv1.ReportSessionExitResponse], error) {
	if err := c.s.reportSessionExit(ctx, req.Msg); err != nil {
		return nil, api.Error(err)
	}
	return connect.NewResponse(&agentv1.ReportSessionExitResponse{}), nil
}

func (s *Scheduler) registerAgent(ctx context.Context, req *agentv1.RegisterAgentRequest) error {
	if req.GetAgentId() == "" || req.GetAddress() == "" || req.GetBootId() == "" {
		return fmt.Errorf("%w: agent_id, address and boot_id are required", sandbox.ErrInvalidArgument)
	}
	a := &statev1.Agent{
		Id: req.GetAgentId(), Address: req.GetAddress(), CpuMillis: req.GetCpuMillis(),
		MemoryMib: req.GetMemoryMib(), BootId: req.GetBootId(),
	}
	prev, known := s.fsm.Agent(a.GetId())
	if !known || prev.GetAddress() != a.GetAddress() || prev.GetBootId() != a.GetBootId() ||
		prev.GetCpuMillis() != a.GetCpuMillis() || prev.GetMemoryMib() != a.GetMemoryMib() {
		a.RegisteredAt = timestamppb.Now()
		if err := s.apply(ctx, fsm.RegisterAgentType, &statev1.RegisterAgent{Agent: a}); err != nil {
			return err
		}
		s.log.Info("agent registered", "agent", a.GetId(), "address", a.GetAddress(), "boot", a.GetBootId())
	}
	s.mu.Lock()
	s.agentSeen[a.GetId()] = time.Now()
	s.mu.Unlock()
	if !known || prev.GetBootId() != a.GetBootId() {
		s.forgetWarmSent(a.GetId()) // a new or restarted agent holds no pools yet
	}
	if known && prev.GetBootId() != a.GetBootId() {
		// A restarted agent re-adopted what still runs: compare it with the
		// replicated state now, so sessions whose container is gone end LOST
		// and nothing the agent runs is left without an owner.
		cur, _ := s.fsm.Agent(a.GetId())
		if err := s.reconcileAgent(ctx, cur); err != nil {
			s.log.Warn("reconcile restarted agent", "agent", a.GetId(), "err", err)
		}
	}
	return nil
}

// loseAgentSessions commits every live session of an agent LOST, and their
// unfinished executions LOST.
func (s *Scheduler) loseAgentSessions(ctx context.Context, agentID, reason string) error {
	now := timestamppb.Now()
	for _, sess := range s.fsm.Sessions(func(x *sandboxv1.Session) bool {
		return x.GetAgentId() == agentID && sandbox.SessionState(x.GetState()).Live()
	}) {
		if err := s.endExecutions(ctx, sess.GetId(), sandboxv1.ExecutionState_EXECUTION_STATE_LOST, reason); err != nil {
			return err
		}
		err := s.apply(ctx, fsm.UpdateSessionType, &statev1.UpdateSession{
			SessionId: sess.GetId(), State: sandboxv1.SessionState_SESSION_STATE_LOST, Reason: reason, At: now,
		})
		if err := ignoreStale(err); err != nil {
			return err
		}
	}
	return nil
}

// endExecutions moves a session's unfinished executions to a terminal state.
func (s *Scheduler) endExecutions(ctx context.Context, sessionID string, state sandboxv1.ExecutionState, reason string) error {
	now := timestamppb.Now()
	for _, e := range s.fsm.ExecutionsBySession(sessionID) {
		if terminal(e) {
			continue
		}
		err := s.apply(ctx, fsm.UpdateExecutionType, &statev1.UpdateExecution{Execution: &sandboxv1.Execution{
			Id: e.GetId(), State: state, ExitCode: -1, StateReason: reason, FinishedAt: now,
		}})
		if err := ignoreStale(err); err != nil {
			return err
		}
	}
	return nil
}

func (s *Scheduler) reportExecution(ctx context.Context, req *agentv1.ReportExecutionRequest) error {
	e, err := s.GetExecution(ctx, req.GetExecutionId())
	if errors.Is(err, sandbox.ErrNotFound) {
		if handled, err := s.reportOneShot(ctx, req); handled {
			return err
		}
	}
	if err != nil {
		return err
	}
	sess, ok := s.fsm.Session(e.GetSessionId())
	if !ok || sess.GetId() != req.GetSessionId() || sess.GetAgentId() != req.GetAgentId() {
		return fmt.Errorf("%w: execution %s does not belong to session %q on agent %q", sandbox.ErrPermissionDenied, e.GetId(), req.GetSessionId(), req.GetAgentId())
	}
	switch req.GetKind() {
	case agentv1.ReportKind_REPORT_KIND_HEARTBEAT:
		s.mu.Lock()
		s.heartbeats[e.GetId()] = time.Now()
		s.mu.Unlock()
		return nil
	case agentv1.ReportKind_REPORT_KIND_STATUS:
		if req.GetState() != sandboxv1.ExecutionState_EXECUTION_STATE_RUNNING {
			return fmt.Errorf("%w: a status report must say RUNNING, got %v", sandbox.ErrInvalidArgument, req.GetState())
		}
		return ignoreStale(s.apply(ctx, fsm.UpdateExecutionType, &statev1.UpdateExecution{Execution: &sandboxv1.Execution{
			Id: e.GetId(), State: req.GetState(),
		}}))
	case agentv1.ReportKind_REPORT_KIND_RESULT:
		if !sandbox.ExecutionState(req.GetState()).Terminal() {
			return fmt.Errorf("%w: a result must have a terminal state, got %v", sandbox.ErrInvalidArgument, req.GetState())
		}
		err := s.apply(ctx, fsm.UpdateExecutionType, &statev1.UpdateExecution{Execution: &sandboxv1.Execution{
			Id:              e.GetId(),
			State:           req.GetState(),
			ExitCode:        req.GetExitCode(),
			Stdout:          req.GetStdout(),
			Stderr:          req.GetStderr(),
			StdoutTruncated: req.GetStdoutTruncated(),
			StderrTruncated: req.GetStderrTruncated(),
			DurationMs:      req.GetDurationMs(),
			Artifacts:       req.GetArtifacts(),
			StateReason:     req.GetError(),
			FinishedAt:      timestamppb.Now(),
		}})
		s.mu.Lock()
		delete(s.heartbeats, e.GetId())
		s.mu.Unlock()
		return ignoreStale(err)
	}
	return fmt.Errorf("%w: unknown report kind %v", sandbox.ErrInvalidArgument, req.GetKind())
}

func (s *Scheduler) reportSessionExit(ctx context.Context, req *agentv1.ReportSessionExitRequest) error {
	sess, err := s.GetSession(ctx, req.GetSessionId())
	if err != nil {
		return err
	}
	if sess.GetAgentId() != req.GetAgentId() {
		return fmt.Errorf("%w: session %s is not on agent %q", sandbox.ErrPermissionDenied, sess.GetId(), req.GetAgentId())
	}
	st := sandbox.SessionState(sess.GetState())
	if st.Terminal() || st == sandbox.SessionTerminating {
		return nil // an exit we caused, or already recorded
	}
	reason := "executor exited: " + req.GetReason()
	if err := s.endExecutions(ctx, sess.GetId(), sandboxv1.ExecutionState_EXECUTION_STATE_FAILED, reason); err != nil {
		return err
	}
	s.log.Warn("session failed", "session", sess.GetId(), "agent", req.GetAgentId(), "reason", reason)
	return ignoreStale(s.apply(ctx, fsm.UpdateSessionType, &statev1.UpdateSession{
		SessionId: sess.GetId(), State: sandboxv1.SessionState_SESSION_STATE_FAILED, Reason: reason, At: timestamppb.Now(),
	}))
}

// housekeep is the leader's periodic sweep: idle and over-age sessions are
// terminated, stuck terminations retried, executions that can no longer
// report declared LOST, and ended sessions past retention purged.
func (s *Scheduler) housekeep(ctx context.Context, now time.Time) {
	defer s.purge(ctx, now)
	for _, sess := range s.fsm.Sessions(func(x *sandboxv1.Session) bool {
		st := sandbox.SessionState(x.GetState())
		return st == sandbox.SessionRunning || st == sandbox.SessionTerminating
	}) {
		if sandbox.SessionState(sess.GetState()) == sandbox.SessionTerminating {
			if now.Sub(sess.GetLastActiveAt().AsTime()) > stopTimeout {
				if err := s.stopSession(ctx, sess, sess.GetStateReason()); err != nil {
					s.log.Warn("retrying session stop", "session", sess.GetId(), "err", err)
				}
			}
			continue
		}
		idle := time.Duration(sess.GetIdleTimeoutSeconds()) * time.Second
		if life := time.Duration(sess.GetMaxLifetimeSeconds()) * time.Second; life > 0 && now.Sub(sess.GetCreatedAt().AsTime()) >= life {
			s.log.Info("terminating session at its maximum lifetime", "session", sess.GetId(), "max_lifetime", life)
			if err := s.stopSession(ctx, sess, fmt.Sprintf("reached its maximum lifetime of %s", life)); err != nil {
				s.log.Warn("lifetime session stop", "session", sess.GetId(), "err", err)
			}
			continue
		}
		if idle <= 0 || now.Sub(sess.GetLastActiveAt().AsTime()) < idle || s.busy(sess.GetId()) {
			continue
		}
		reason := fmt.Sprintf("idle for more than %s", idle)
		s.log.Info("terminating idle session", "session", sess.GetId(), "idle_timeout", idle)
		if err := s.stopSession(ctx, sess, reason); err != nil {
			s.log.Warn("idle session stop", "session", sess.GetId(), "err", err)
		}
	}
	stuck := map[string]bool{} // agents holding work a previous leader may have left half done
	for _, sess := range s.fsm.Sessions(func(x *sandboxv1.Session) bool {
		st := sandbox.SessionState(x.GetState())
		return (st == sandbox.SessionStarting || st == sandbox.SessionPending) && now.Sub(x.GetCreatedAt().AsTime()) >= orphanedStartGrace
	}) {
		if !s.isStarting(sess.GetId()) {
			stuck[sess.GetAgentId()] = true
		}
	}
	for _, sess := range s.fsm.Sessions(func(x *sandboxv1.Session) bool {
		return sandbox.SessionState(x.GetState()) == sandbox.SessionRunning
	}) {
		for _, e := range s.fsm.ExecutionsBySession(sess.GetId()) {
			if terminal(e) {
				continue
			}
			if e.GetState() == sandboxv1.ExecutionState_EXECUTION_STATE_QUEUED && now.Sub(e.GetCreatedAt().AsTime()) >= redispatchAfter {
				stuck[sess.GetAgentId()] = true
			}
			deadline := e.GetCreatedAt().AsTime().Add(time.Duration(e.GetTimeoutSeconds())*time.Second + s.cfg.ExecutionGrace)
			if now.Before(deadline) {
				continue
			}
			err := s.apply(ctx, fsm.UpdateExecutionType, &statev1.UpdateExecution{Execution: &sandboxv1.Execution{
				Id: e.GetId(), State: sandboxv1.ExecutionState_EXECUTION_STATE_LOST, ExitCode: -1, FinishedAt: timestamppb.Now(),
				StateReason: fmt.Sprintf("no result from the executor within its timeout (%ds) plus %s", e.GetTimeoutSeconds(), s.cfg.ExecutionGrace),
			}})
			if err := ignoreStale(err); err != nil && !errors.Is(err, context.Canceled) {
				s.log.Warn("marking execution lost", "execution", e.GetId(), "err", err)
			}
		}
	}
	// A QUEUED execution whose leader died before handing it over waits for
	// nobody: ask its agent what it holds and hand over what it lacks.
	for id := range stuck {
		if a, ok := s.fsm.Agent(id); ok {
			if err := s.reconcileAgent(ctx, a); err != nil {
				s.log.Warn("reconcile agent with queued executions", "agent", id, "err", err)
			}
		}
	}
}

// purge deletes sessions (and their executions) that ended more than the
// retention period ago, a bounded batch per sweep.
func (s *Scheduler) purge(ctx context.Context, now time.Time) {
	if s.cfg.Retention <= 0 {
		return
	}
	var ids []string
	for _, sess := range s.fsm.Sessions(func(x *sandboxv1.Session) bool {
		return sandbox.SessionState(x.GetState()).Terminal() && x.GetEndedAt() != nil && now.Sub(x.GetEndedAt().AsTime()) > s.cfg.Retention
	}) {
		ids = append(ids, sess.GetId())
		if len(ids) == 256 {
			break
		}
	}
	if len(ids) == 0 {
		return
	}
	if err := s.apply(ctx, fsm.PurgeSessionsType, &statev1.PurgeSessions{SessionIds: ids}); err != nil {
		s.log.Warn("purge", "err", err)
		return
	}
	s.log.Info("purged ended sessions past retention", "sessions", len(ids), "retention", s.cfg.Retention)
}

// busy reports whether a session has an unfinished execution.
func (s *Scheduler) busy(sessionID string) bool {
	for _, e := range s.fsm.ExecutionsBySession(sessionID) {
		if !terminal(e) {
			return true
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, o := range s.oneShots {
		if o.exec.GetSessionId() == sessionID {
			return true
		}
	}
	return false
}

func (c *controlPlane) GetServerInfo(context.Context, *connect.Request[agentv1.GetServerInfoRequest]) (*connect.Response[agentv1.GetServerInfoResponse], error) {
	return connect.NewResponse(&agentv1.GetServerInfoResponse{Server: c.s.cfg.Self, HasState: c.s.raft.HadState()}), nil
}

func (c *controlPlane) AddServer(ctx context.Context, req *connect.Request[agentv1.AddServerRequest]) (*connect.Response[agentv1.AddServerResponse], error) {
	if err := c.s.addServer(ctx, req.Msg.GetServer()); err != nil {
		return nil, api.Error(err)
	}
	return connect.NewResponse(&agentv1.AddServerResponse{}), nil
}

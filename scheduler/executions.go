package scheduler

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/api"
	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/scheduler/fsm"
)

// cancelWait bounds how long CancelExecution waits for the executor to confirm.
const cancelWait = 15 * time.Second

func terminal(e *sandboxv1.Execution) bool { return sandbox.ExecutionState(e.GetState()).Terminal() }

// Execute records an execution, hands it to the session's agent and, unless
// async, waits for its result to be committed (by the executor's callback,
// relayed by the agent) without polling.
func (s *Scheduler) Execute(ctx context.Context, req *sandboxv1.ExecuteRequest) (*sandboxv1.Execution, error) {
	if req.GetSessionId() == "" {
		return nil, fmt.Errorf("%w: session_id is required", sandbox.ErrInvalidArgument)
	}
	if req.GetTimeoutSeconds() < 0 {
		return nil, fmt.Errorf("%w: timeout_seconds must not be negative, got %d", sandbox.ErrInvalidArgument, req.GetTimeoutSeconds())
	}
	if err := sandbox.ValidateLanguage(req.GetLanguage(), nil); err != nil {
		return nil, err
	}
	if len(req.GetCode()) > sandbox.MaxCodeBytes {
		return nil, fmt.Errorf("%w: code is %d bytes, at most %d are allowed", sandbox.ErrInvalidArgument, len(req.GetCode()), sandbox.MaxCodeBytes)
	}
	if err := sandbox.ValidateEnv("env", req.GetEnv()); err != nil {
		return nil, err
	}
	// A retry of an acknowledged request gets its execution, even when the
	// session has ended since.
	tenant := api.Principal(ctx)
	if key := req.GetIdempotencyKey(); key != "" {
		if id, ok := s.fsm.IdempotentID(fsm.KindExecution, tenant, key); ok {
			s.log.Debug("execution retried", "execution", id, "idempotency_key", key)
			return s.awaitExecution(ctx, id, req.GetAsync())
		}
	}
	sess, err := s.GetSession(ctx, req.GetSessionId())
	if err != nil {
		return nil, err
	}
	if st := sandbox.SessionState(sess.GetState()); st != sandbox.SessionRunning {
		return nil, fmt.Errorf("%w: session %s is %s, not RUNNING", sandbox.ErrFailedPrecondition, sess.GetId(), st)
	}
	if tmpl, ok := s.fsm.Template(sess.GetTemplateId()); ok {
		if err := sandbox.ValidateLanguage(req.GetLanguage(), tmpl.GetLanguages()); err != nil {
			return nil, err
		}
	}
	timeout, err := sandbox.ResolveExecutionTimeout(req.GetTimeoutSeconds(), limitsFromProto(sess.GetResourceLimits()))
	if err != nil {
		return nil, err
	}
	agent, ok := s.fsm.Agent(sess.GetAgentId())
	if !ok {
		return nil, fmt.Errorf("%w: session %s is on agent %q, which is not registered", sandbox.ErrUnavailable, sess.GetId(), sess.GetAgentId())
	}

	exec := &sandboxv1.Execution{
		Id:             newID("exe"),
		SessionId:      sess.GetId(),
		Language:       req.GetLanguage(),
		Code:           req.GetCode(),
		State:          sandboxv1.ExecutionState_EXECUTION_STATE_QUEUED,
		TimeoutSeconds: int32(timeout / time.Second),
		CreatedAt:      timestamppb.Now(),
		Tenant:         tenant,
	}
	if !req.GetAsync() && req.GetIdempotencyKey() == "" {
		return s.executeOneShot(ctx, agent, sess, exec, req.GetEnv())
	}
	resp, err := s.raft.Apply(ctx, fsm.CreateExecutionType, &statev1.CreateExecution{Execution: exec, IdempotencyKey: req.GetIdempotencyKey()})
	if err != nil {
		return nil, err
	}
	if ex, ok := resp.(fsm.Existing); ok {
		return s.awaitExecution(ctx, ex.ID, req.GetAsync())
	}
	s.log.Debug("execution recorded", "execution", exec.GetId(), "session", sess.GetId(), "idempotency_key", req.GetIdempotencyKey())

	// The execution is recorded: hand it over even if the client goes away;
	// dispatch records a failure to do so, so it always reaches a terminal state.
	if err := s.dispatch(context.WithoutCancel(ctx), agent, sess, exec, req.GetEnv()); err != nil {
		return nil, err
	}
	return s.awaitExecution(ctx, exec.GetId(), req.GetAsync())
}

// awaitExecution returns an execution at once when async, else once it is terminal.
func (s *Scheduler) awaitExecution(ctx context.Context, id string, async bool) (*sandboxv1.Execution, error) {
	if async {
		return s.GetExecution(ctx, id)
	}
	return s.fsm.WaitExecution(ctx, id, terminal)
}

// dispatch hands an execution to its session's agent; when the agent cannot
// take it, the execution is committed FAILED with the reason.
func (s *Scheduler) dispatch(ctx context.Context, agent *statev1.Agent, sess *sandboxv1.Session, exec *sandboxv1.Execution, env map[string]string) error {
	bg, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	err := s.handOver(bg, agent, sess, exec, env)
	if err == nil {
		s.log.Debug("execution dispatched", "execution", exec.GetId(), "session", sess.GetId(), "agent", agent.GetId())
		return nil
	}
	s.log.Warn("execution dispatch failed", "execution", exec.GetId(), "session", sess.GetId(), "agent", agent.GetId(), "err", err)
	return ignoreStale(s.apply(bg, fsm.UpdateExecutionType, &statev1.UpdateExecution{Execution: &sandboxv1.Execution{
		Id: exec.GetId(), State: sandboxv1.ExecutionState_EXECUTION_STATE_FAILED, ExitCode: -1,
		StateReason: fmt.Sprintf("agent %s could not start the execution: %v", agent.GetId(), err),
		FinishedAt:  timestamppb.Now(),
	}}))
}

// handOver asks the session's agent to run an execution (30 s at most).
func (s *Scheduler) handOver(ctx context.Context, agent *statev1.Agent, sess *sandboxv1.Session, exec *sandboxv1.Execution, env map[string]string) error {
	bg, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	_, err := s.agents.get(agent.GetAddress()).Execute(bg, connect.NewRequest(&agentv1.ExecuteRequest{
		Fence:          s.fence(),
		ExecutionId:    exec.GetId(),
		SessionId:      sess.GetId(),
		Language:       exec.GetLanguage(),
		Code:           exec.GetCode(),
		TimeoutSeconds: exec.GetTimeoutSeconds(),
		Env:            env,
	}))
	return err
}

// GetExecution returns one execution; another tenant's does not exist for
// the caller (see GetSession).
func (s *Scheduler) GetExecution(ctx context.Context, id string) (*sandboxv1.Execution, error) {
	if id == "" {
		return nil, fmt.Errorf("%w: execution_id is required", sandbox.ErrInvalidArgument)
	}
	e, ok := s.fsm.Execution(id)
	if !ok || !api.CanSee(ctx, e.GetTenant()) {
		return nil, fmt.Errorf("%w: execution %q does not exist", sandbox.ErrNotFound, id)
	}
	return e, nil
}

// ListExecutions returns a session's executions, oldest first.
func (s *Scheduler) ListExecutions(ctx context.Context, req *sandboxv1.ListExecutionsRequest) ([]*sandboxv1.Execution, string, error) {
	if _, err := s.GetSession(ctx, req.GetSessionId()); err != nil {
		return nil, "", err
	}
	return paginate(s.fsm.ExecutionsBySession(req.GetSessionId()), req.GetPageSize(), req.GetPageToken())
}

// CancelExecution asks the executor to stop an execution and waits (briefly)
// for it to end CANCELED. A terminal execution is returned unchanged.
func (s *Scheduler) CancelExecution(ctx context.Context, id string) (*sandboxv1.Execution, error) {
	e, err := s.GetExecution(ctx, id)
	if err != nil {
		return nil, err
	}
	if terminal(e) {
		return e, nil
	}
	sess, ok := s.fsm.Session(e.GetSessionId())
	if !ok {
		return nil, fmt.Errorf("%w: session %q of execution %s does not exist", sandbox.ErrNotFound, e.GetSessionId(), id)
	}
	agent, ok := s.fsm.Agent(sess.GetAgentId())
	if !ok {
		return nil, fmt.Errorf("%w: execution %s is on agent %q, which is not registered", sandbox.ErrUnavailable, id, sess.GetAgentId())
	}
	_, err = s.agents.get(agent.GetAddress()).CancelExecution(ctx, connect.NewRequest(&agentv1.CancelExecutionRequest{Fence: s.fence(), ExecutionId: id, SessionId: sess.GetId()}))
	if err != nil && connect.CodeOf(err) != connect.CodeNotFound {
		return nil, fmt.Errorf("%w: agent %s could not cancel execution %s: %v", sandbox.ErrUnavailable, agent.GetId(), id, err)
	}
	if err != nil {
		// The executor no longer knows it: it finished or never started.
		// Record the cancel unless its result is already in.
		uerr := s.apply(ctx, fsm.UpdateExecutionType, &statev1.UpdateExecution{Execution: &sandboxv1.Execution{
			Id: id, State: sandboxv1.ExecutionState_EXECUTION_STATE_CANCELED, ExitCode: -1,
			StateReason: "canceled by client", FinishedAt: timestamppb.Now(),
		}})
		if err := ignoreStale(uerr); err != nil {
			return nil, err
		}
	}
	wctx, cancel := context.WithTimeout(ctx, cancelWait)
	defer cancel()
	out, err := s.fsm.WaitExecution(wctx, id, terminal)
	if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
		return s.GetExecution(ctx, id)
	}
	return out, err
}

// DownloadArtifact streams an artifact from the agent that stored it.
func (s *Scheduler) DownloadArtifact(ctx context.Context, executionID, path string, send func(*sandboxv1.Artifact, []byte) error) error {
	if path == "" {
		return fmt.Errorf("%w: path is required", sandbox.ErrInvalidArgument)
	}
	e, err := s.GetExecution(ctx, executionID)
	if err != nil {
		return err
	}
	found := false
	for _, a := range e.GetArtifacts() {
		if a.GetPath() == path {
			found = true
		}
	}
	if !found {
		return fmt.Errorf("%w: execution %s has no artifact %q", sandbox.ErrNotFound, executionID, path)
	}
	sess, ok := s.fsm.Session(e.GetSessionId())
	if !ok {
		return fmt.Errorf("%w: session %q of execution %s does not exist", sandbox.ErrNotFound, e.GetSessionId(), executionID)
	}
	agent, ok := s.fsm.Agent(sess.GetAgentId())
	if !ok {
		return fmt.Errorf("%w: artifact is on agent %q, which is not registered", sandbox.ErrUnavailable, sess.GetAgentId())
	}
	stream, err := s.agents.get(agent.GetAddress()).DownloadArtifact(ctx, connect.NewRequest(&agentv1.DownloadArtifactRequest{ExecutionId: executionID, Path: path}))
	if err != nil {
		return fmt.Errorf("%w: agent %s: %v", sandbox.ErrUnavailable, agent.GetId(), err)
	}
	defer stream.Close()
	for stream.Receive() {
		m := stream.Msg()
		if err := send(m.GetArtifact(), m.GetChunk()); err != nil {
			return err
		}
	}
	if err := stream.Err(); err != nil && !errors.Is(err, io.EOF) {
		if connect.CodeOf(err) == connect.CodeNotFound {
			return fmt.Errorf("%w: agent %s no longer holds artifact %q of execution %s", sandbox.ErrNotFound, agent.GetId(), path, executionID)
		}
		return fmt.Errorf("%w: agent %s: %v", sandbox.ErrUnavailable, agent.GetId(), err)
	}
	return nil
}

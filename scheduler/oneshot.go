package scheduler

import (
	"context"
	"errors"
	"fmt"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/sandboxhq/sandbox"
	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/scheduler/fsm"
)

// One-commit executions. A synchronous Execute without an idempotency key
// has nothing to deduplicate and no client that could look it up before it
// ends, so the leader hands it to the agent at once, keeps it in memory
// while it runs, and commits it once, with its result: one Raft commit on
// the call's path instead of two. The price, which a caller avoids by
// sending an idempotency key (sandboxctl always does): while it runs it is
// not listed, and should the leader change meanwhile, its result is not
// recorded and the call fails unavailable.

// oneShotCheck is how often a waiting one-shot execution checks that this
// server still leads and its session still runs.
const oneShotCheck = 250 * time.Millisecond

// oneShot is an execution handed over and not yet recorded.
type oneShot struct {
	exec *sandboxv1.Execution
	// done is closed once the result is recorded (out) or refused (err).
	done chan struct{}
	out  *sandboxv1.Execution
	err  error
}

// executeOneShot runs a synchronous, keyless execution with one commit.
func (s *Scheduler) executeOneShot(ctx context.Context, agent *statev1.Agent, sess *sandboxv1.Session, exec *sandboxv1.Execution, env map[string]string) (*sandboxv1.Execution, error) {
	o := &oneShot{exec: exec, done: make(chan struct{})}
	s.mu.Lock()
	s.oneShots[exec.GetId()] = o
	s.mu.Unlock()
	if err := s.handOver(context.WithoutCancel(ctx), agent, sess, exec, env); err != nil {
		s.dropOneShot(exec.GetId())
		return nil, fmt.Errorf("%w: agent %s could not start the execution: %v", sandbox.ErrUnavailable, agent.GetId(), err)
	}
	t := time.NewTicker(oneShotCheck)
	defer t.Stop()
	for {
		select {
		case <-o.done:
			return o.out, o.err
		case <-ctx.Done():
			// The result is still recorded when it comes.
			return nil, ctx.Err()
		case <-t.C:
		}
		if !s.raft.IsLeader() {
			s.dropOneShot(exec.GetId())
			return nil, fmt.Errorf("%w: the leader changed while execution %s ran; its result is not recorded (send an idempotency key to have it kept across leader changes)", sandbox.ErrUnavailable, exec.GetId())
		}
		if cur, ok := s.fsm.Session(sess.GetId()); !ok || !sandbox.SessionState(cur.GetState()).Live() {
			s.dropOneShot(exec.GetId())
			return nil, fmt.Errorf("%w: session %s ended while execution %s ran", sandbox.ErrFailedPrecondition, sess.GetId(), exec.GetId())
		}
	}
}

// dropOneShot forgets a one-shot execution whose result no longer matters.
func (s *Scheduler) dropOneShot(id string) {
	s.mu.Lock()
	delete(s.oneShots, id)
	s.mu.Unlock()
}

// takeOneShot removes and returns a one-shot execution, if this server holds it.
func (s *Scheduler) takeOneShot(id string) (*oneShot, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	o, ok := s.oneShots[id]
	if ok {
		delete(s.oneShots, id)
	}
	return o, ok
}

// reportOneShot handles an agent's report of an execution the replicated
// state does not hold: a one-shot of this server's gets its result
// committed (creating the record in its final state); its status and
// heartbeats need no record. handled is false when the execution is none
// of this server's.
func (s *Scheduler) reportOneShot(ctx context.Context, req *agentv1.ReportExecutionRequest) (handled bool, err error) {
	s.mu.Lock()
	o, ok := s.oneShots[req.GetExecutionId()]
	s.mu.Unlock()
	if !ok {
		return false, nil
	}
	if o.exec.GetSessionId() != req.GetSessionId() {
		return true, fmt.Errorf("%w: execution %s does not belong to session %q", sandbox.ErrPermissionDenied, req.GetExecutionId(), req.GetSessionId())
	}
	if sess, ok := s.fsm.Session(req.GetSessionId()); !ok || sess.GetAgentId() != req.GetAgentId() {
		return true, fmt.Errorf("%w: execution %s does not belong to session %q on agent %q", sandbox.ErrPermissionDenied, req.GetExecutionId(), req.GetSessionId(), req.GetAgentId())
	}
	switch req.GetKind() {
	case agentv1.ReportKind_REPORT_KIND_HEARTBEAT, agentv1.ReportKind_REPORT_KIND_STATUS:
		return true, nil
	case agentv1.ReportKind_REPORT_KIND_RESULT:
	default:
		return true, fmt.Errorf("%w: unknown report kind %v", sandbox.ErrInvalidArgument, req.GetKind())
	}
	if !sandbox.ExecutionState(req.GetState()).Terminal() {
		return true, fmt.Errorf("%w: a result must have a terminal state, got %v", sandbox.ErrInvalidArgument, req.GetState())
	}
	o, ok = s.takeOneShot(req.GetExecutionId())
	if !ok {
		return false, nil // another report of it took it meanwhile
	}
	e := proto.CloneOf(o.exec)
	e.State = req.GetState()
	e.ExitCode = req.GetExitCode()
	e.Stdout, e.Stderr = req.GetStdout(), req.GetStderr()
	e.StdoutTruncated, e.StderrTruncated = req.GetStdoutTruncated(), req.GetStderrTruncated()
	e.DurationMs = req.GetDurationMs()
	e.Artifacts = req.GetArtifacts()
	e.StateReason = req.GetError()
	e.FinishedAt = timestamppb.Now()
	begin := time.Now()
	err = s.apply(ctx, fsm.CreateExecutionType, &statev1.CreateExecution{Execution: e})
	s.log.Debug("one-shot result committed", "execution", e.GetId(), "commit", time.Since(begin), "err", err)
	if err == nil {
		o.out, _ = s.fsm.Execution(e.GetId())
		if o.out == nil {
			o.out = e
		}
	} else {
		o.err = err
	}
	close(o.done)
	if errors.Is(err, sandbox.ErrFailedPrecondition) {
		// The session ended meanwhile: nothing to record, and nothing the
		// agent should retry.
		return true, nil
	}
	return true, err
}

// expireOneShots gives up on one-shot executions whose result did not come
// within their timeout and the grace: their agent or container is gone.
func (s *Scheduler) expireOneShots(now time.Time) {
	s.mu.Lock()
	var late []*oneShot
	for id, o := range s.oneShots {
		deadline := o.exec.GetCreatedAt().AsTime().Add(time.Duration(o.exec.GetTimeoutSeconds())*time.Second + s.cfg.ExecutionGrace)
		if now.After(deadline) {
			delete(s.oneShots, id)
			late = append(late, o)
		}
	}
	s.mu.Unlock()
	for _, o := range late {
		o.err = fmt.Errorf("%w: no result from the executor within the execution's timeout (%ds) plus %s", sandbox.ErrUnavailable, o.exec.GetTimeoutSeconds(), s.cfg.ExecutionGrace)
		close(o.done)
	}
}

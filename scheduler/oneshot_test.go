package scheduler

import (
	"context"
	"errors"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/sandboxhq/sandbox"
	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/scheduler/fsm"
)

// runningSession registers agent a1 (a fake) and commits a RUNNING session on it.
func runningSession(t *testing.T, s *Scheduler) (*fakeAgent, *sandboxv1.Session) {
	t.Helper()
	ctx := context.Background()
	agent := &fakeAgent{}
	addr := serveFakeAgent(t, agent)
	if err := s.apply(ctx, fsm.RegisterAgentType, &statev1.RegisterAgent{Agent: &statev1.Agent{
		Id: "a1", Address: addr, CpuMillis: 8000, MemoryMib: 8192, BootId: "b1", RegisteredAt: timestamppb.Now(),
	}}); err != nil {
		t.Fatal(err)
	}
	sess := &sandboxv1.Session{Id: "ses_1", TemplateId: "python-basic", State: sandboxv1.SessionState_SESSION_STATE_RUNNING,
		AgentId: "a1", ContainerId: "c1", CreatedAt: timestamppb.Now(), LastActiveAt: timestamppb.Now(),
		ResourceLimits: limitsToProto(sandbox.DefaultLimits)}
	if err := s.apply(ctx, fsm.CreateSessionType, &statev1.CreateSession{Session: sess}); err != nil {
		t.Fatal(err)
	}
	return agent, sess
}

// handedOver waits for the fake agent's next Execute and returns its id.
func handedOver(t *testing.T, agent *fakeAgent, n int) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		agent.mu.Lock()
		if len(agent.executed) >= n {
			id := agent.executed[n-1]
			agent.mu.Unlock()
			return id
		}
		agent.mu.Unlock()
		if time.Now().After(deadline) {
			t.Fatal("the agent was never handed the execution")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestOneShotExecute: a synchronous Execute without an idempotency key is
// handed over at once and committed once, with its result; status and
// heartbeat reports of it need no record.
func TestOneShotExecute(t *testing.T) {
	s, f := newTestScheduler(t)
	ctx := context.Background()
	agent, sess := runningSession(t, s)
	before := settledIndex(t, s)
	type outcome struct {
		e   *sandboxv1.Execution
		err error
	}
	done := make(chan outcome, 1)
	go func() {
		e, err := s.Execute(ctx, &sandboxv1.ExecuteRequest{SessionId: sess.GetId(), Language: "python", Code: "print(1)"})
		done <- outcome{e, err}
	}()
	id := handedOver(t, agent, 1)
	if _, ok := f.Execution(id); ok {
		t.Fatal("a one-shot execution was recorded before its result")
	}
	report := func(kind agentv1.ReportKind, st sandboxv1.ExecutionState) error {
		return s.reportExecution(ctx, &agentv1.ReportExecutionRequest{AgentId: "a1", SessionId: sess.GetId(), ExecutionId: id,
			Kind: kind, State: st, Stdout: "1\n", DurationMs: 3})
	}
	if err := report(agentv1.ReportKind_REPORT_KIND_STATUS, sandboxv1.ExecutionState_EXECUTION_STATE_RUNNING); err != nil {
		t.Fatalf("status report: %v", err)
	}
	if err := s.reportExecution(ctx, &agentv1.ReportExecutionRequest{AgentId: "a2", SessionId: sess.GetId(), ExecutionId: id,
		Kind: agentv1.ReportKind_REPORT_KIND_RESULT, State: sandboxv1.ExecutionState_EXECUTION_STATE_COMPLETED}); !errors.Is(err, sandbox.ErrPermissionDenied) {
		t.Fatalf("a foreign agent's result: %v, want permission denied", err)
	}
	if err := report(agentv1.ReportKind_REPORT_KIND_RESULT, sandboxv1.ExecutionState_EXECUTION_STATE_COMPLETED); err != nil {
		t.Fatalf("result report: %v", err)
	}
	o := <-done
	if o.err != nil || o.e.GetId() != id || o.e.GetStdout() != "1\n" || o.e.GetState() != sandboxv1.ExecutionState_EXECUTION_STATE_COMPLETED {
		t.Fatalf("Execute = %v, %v", o.e, o.err)
	}
	if n := settledIndex(t, s) - before; n != 1 {
		t.Errorf("a one-shot execution took %d commits, want 1", n)
	}
	if e, ok := f.Execution(id); !ok || e.GetCode() != "print(1)" || e.GetFinishedAt() == nil {
		t.Errorf("recorded %v", e)
	}
	// A repeated result finds the record: nothing changes.
	if err := report(agentv1.ReportKind_REPORT_KIND_RESULT, sandboxv1.ExecutionState_EXECUTION_STATE_COMPLETED); err != nil {
		t.Errorf("repeated result: %v", err)
	}
}

// TestOneShotSessionEnds: a one-shot execution whose session ends while it
// runs fails the call with failed_precondition, and its late result
// records nothing.
func TestOneShotSessionEnds(t *testing.T) {
	s, f := newTestScheduler(t)
	ctx := context.Background()
	agent, sess := runningSession(t, s)
	done := make(chan error, 1)
	go func() {
		_, err := s.Execute(ctx, &sandboxv1.ExecuteRequest{SessionId: sess.GetId(), Language: "python", Code: "import time; time.sleep(60)"})
		done <- err
	}()
	id := handedOver(t, agent, 1)
	if err := s.apply(ctx, fsm.UpdateSessionType, &statev1.UpdateSession{SessionId: sess.GetId(), State: sandboxv1.SessionState_SESSION_STATE_FAILED, Reason: "test", At: timestamppb.Now()}); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, sandbox.ErrFailedPrecondition) {
		t.Fatalf("Execute after its session ended: %v, want failed precondition", err)
	}
	err := s.reportExecution(ctx, &agentv1.ReportExecutionRequest{AgentId: "a1", SessionId: sess.GetId(), ExecutionId: id,
		Kind: agentv1.ReportKind_REPORT_KIND_RESULT, State: sandboxv1.ExecutionState_EXECUTION_STATE_CANCELED})
	if !errors.Is(err, sandbox.ErrNotFound) {
		t.Errorf("late result: %v, want not found", err)
	}
	if _, ok := f.Execution(id); ok {
		t.Error("a late result of an abandoned one-shot was recorded")
	}
}

// settledIndex is the applied index once every committed entry is applied
// (Raft reports an entry applied a moment after its Apply returns).
func settledIndex(t *testing.T, s *Scheduler) uint64 {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for s.raft.AppliedIndex() != s.raft.CommitIndex() {
		if time.Now().After(deadline) {
			t.Fatalf("applied index %d never reached commit index %d", s.raft.AppliedIndex(), s.raft.CommitIndex())
		}
		time.Sleep(time.Millisecond)
	}
	return s.raft.AppliedIndex()
}

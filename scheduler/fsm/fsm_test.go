package fsm

import (
	"bytes"
	"context"
	"errors"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/sandboxhq/sandbox"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
)

// cmd is one command for a test to apply.
type cmd struct {
	t   MessageType
	msg proto.Message
}

func apply(t *testing.T, f *FSM, c cmd) any {
	t.Helper()
	b, err := Encode(c.t, c.msg)
	if err != nil {
		t.Fatalf("Encode(%v): %v", c.t, err)
	}
	return f.Apply(&raft.Log{Index: 1, Term: 1, Type: raft.LogCommand, Data: b})
}

func mustApply(t *testing.T, f *FSM, cmds ...cmd) {
	t.Helper()
	for _, c := range cmds {
		if resp := apply(t, f, c); resp != nil {
			t.Fatalf("apply %v: got response %v, want nil", c.t, resp)
		}
	}
}

func ts(sec int64) *timestamppb.Timestamp { return &timestamppb.Timestamp{Seconds: sec} }

func putTemplate(id string, builtin bool) cmd {
	return cmd{PutTemplateType, &statev1.PutTemplate{Template: &sandboxv1.Template{
		Id: id, Image: "img/" + id, Languages: []string{"python"}, Builtin: builtin, CreatedAt: ts(1),
	}}}
}

func createSession(id, template string, state sandboxv1.SessionState, created int64) cmd {
	return cmd{CreateSessionType, &statev1.CreateSession{Session: &sandboxv1.Session{
		Id: id, TemplateId: template, State: state, CreatedAt: ts(created), Tenant: "t1",
		Labels: map[string]string{"k": "v"},
	}}}
}

func updateSession(id string, state sandboxv1.SessionState, at int64) cmd {
	return cmd{UpdateSessionType, &statev1.UpdateSession{SessionId: id, State: state, At: ts(at)}}
}

func createExecution(id, session string, created int64) cmd {
	return cmd{CreateExecutionType, &statev1.CreateExecution{Execution: &sandboxv1.Execution{
		Id: id, SessionId: session, Language: "python", Code: "print(1)",
		State: sandboxv1.ExecutionState_EXECUTION_STATE_QUEUED, CreatedAt: ts(created),
	}}}
}

func updateExecution(id string, state sandboxv1.ExecutionState) cmd {
	return cmd{UpdateExecutionType, &statev1.UpdateExecution{Execution: &sandboxv1.Execution{Id: id, State: state}}}
}

func finishExecution(id string, state sandboxv1.ExecutionState, stdout string, finished int64) cmd {
	return cmd{UpdateExecutionType, &statev1.UpdateExecution{Execution: &sandboxv1.Execution{
		Id: id, State: state, ExitCode: 3, Stdout: stdout, Stderr: "err", StdoutTruncated: true,
		DurationMs: 42, FinishedAt: ts(finished), StateReason: "done",
		Artifacts: []*sandboxv1.Artifact{{Path: "out.txt", SizeBytes: 5, Sha256: "abc"}},
	}}}
}

const (
	sPending     = sandboxv1.SessionState_SESSION_STATE_PENDING
	sStarting    = sandboxv1.SessionState_SESSION_STATE_STARTING
	sRunning     = sandboxv1.SessionState_SESSION_STATE_RUNNING
	sTerminating = sandboxv1.SessionState_SESSION_STATE_TERMINATING
	sTerminated  = sandboxv1.SessionState_SESSION_STATE_TERMINATED
	sFailed      = sandboxv1.SessionState_SESSION_STATE_FAILED
	sLost        = sandboxv1.SessionState_SESSION_STATE_LOST

	eQueued    = sandboxv1.ExecutionState_EXECUTION_STATE_QUEUED
	eRunning   = sandboxv1.ExecutionState_EXECUTION_STATE_RUNNING
	eCompleted = sandboxv1.ExecutionState_EXECUTION_STATE_COMPLETED
	eFailed    = sandboxv1.ExecutionState_EXECUTION_STATE_FAILED
	eTimedOut  = sandboxv1.ExecutionState_EXECUTION_STATE_TIMED_OUT
	eCanceled  = sandboxv1.ExecutionState_EXECUTION_STATE_CANCELED
	eLost      = sandboxv1.ExecutionState_EXECUTION_STATE_LOST
)

// seeded returns an FSM holding:
//   - templates "builtin" (built in), "custom", "unused", "old"
//   - sessions "run" (RUNNING, custom), "pend" (PENDING, custom),
//     "term" (TERMINATING, custom), "dead" (TERMINATED, old)
//   - executions "q" (QUEUED), "r" (RUNNING), "done" (COMPLETED), all in "run"
//   - agent "a1"
func seeded(t *testing.T) *FSM {
	t.Helper()
	f := New(nil)
	mustApply(t, f,
		putTemplate("builtin", true), putTemplate("custom", false), putTemplate("unused", false), putTemplate("old", false),
		createSession("run", "custom", sRunning, 10),
		createSession("pend", "custom", sPending, 11),
		createSession("term", "custom", sRunning, 12),
		updateSession("term", sTerminating, 13),
		createSession("dead", "old", sRunning, 9),
		updateSession("dead", sTerminating, 14),
		updateSession("dead", sTerminated, 15),
		createExecution("q", "run", 20),
		createExecution("r", "run", 21),
		updateExecution("r", eRunning),
		createExecution("done", "run", 22),
		finishExecution("done", eCompleted, "first", 23),
		cmd{RegisterAgentType, &statev1.RegisterAgent{Agent: &statev1.Agent{Id: "a1", Address: "10.0.0.1:7400", CpuMillis: 2000}}},
	)
	return f
}

// ruleCase is one command applied to a fresh fixture, with what it must do.
type ruleCase struct {
	name    string
	cmd     cmd
	want    any   // the response of a successful command (nil by default)
	wantErr error // nil: success; otherwise the state must be unchanged
	same    bool  // a success that must leave the state unchanged
	check   func(t *testing.T, f *FSM)
}

// runRules applies each case's command to its own fixture.
func runRules(t *testing.T, fixture func(*testing.T) *FSM, tests []ruleCase) {
	t.Helper()
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := fixture(t)
			before := f.State()
			resp := apply(t, f, tc.cmd)
			if tc.wantErr == nil {
				if resp != tc.want {
					t.Fatalf("response = %#v, want %#v", resp, tc.want)
				}
			} else {
				err, ok := resp.(error)
				if !ok || !errors.Is(err, tc.wantErr) {
					t.Fatalf("response = %v, want an error wrapping %v", resp, tc.wantErr)
				}
			}
			if tc.wantErr != nil || tc.same {
				if after := f.State(); !proto.Equal(before, after) {
					t.Errorf("command changed the state:\nbefore %v\nafter  %v", before, after)
				}
			}
			if tc.check != nil {
				tc.check(t, f)
			}
		})
	}
}

func TestApplyRules(t *testing.T) {
	tests := []ruleCase{
		{
			name: "put template creates",
			cmd:  putTemplate("new", false),
			check: func(t *testing.T, f *FSM) {
				if tp, ok := f.Template("new"); !ok || tp.GetImage() != "img/new" {
					t.Errorf("Template(new) = %v, %v", tp, ok)
				}
			},
		},
		{
			name: "put template replaces",
			cmd: cmd{PutTemplateType, &statev1.PutTemplate{Template: &sandboxv1.Template{
				Id: "custom", Image: "img/v2", WarmPoolSize: 3,
			}}},
			check: func(t *testing.T, f *FSM) {
				if tp, _ := f.Template("custom"); tp.GetImage() != "img/v2" || tp.GetWarmPoolSize() != 3 {
					t.Errorf("Template(custom) = %v", tp)
				}
			},
		},
		{
			name:    "put template without id",
			cmd:     cmd{PutTemplateType, &statev1.PutTemplate{Template: &sandboxv1.Template{Image: "x"}}},
			wantErr: sandbox.ErrInvalidArgument,
		},
		{
			name:    "delete missing template",
			cmd:     cmd{DeleteTemplateType, &statev1.DeleteTemplate{TemplateId: "nope"}},
			wantErr: sandbox.ErrNotFound,
		},
		{
			name:    "delete builtin template",
			cmd:     cmd{DeleteTemplateType, &statev1.DeleteTemplate{TemplateId: "builtin"}},
			wantErr: sandbox.ErrFailedPrecondition,
		},
		{
			name:    "delete template used by live session",
			cmd:     cmd{DeleteTemplateType, &statev1.DeleteTemplate{TemplateId: "custom"}},
			wantErr: sandbox.ErrFailedPrecondition,
		},
		{
			name: "delete unused template",
			cmd:  cmd{DeleteTemplateType, &statev1.DeleteTemplate{TemplateId: "unused"}},
			check: func(t *testing.T, f *FSM) {
				if _, ok := f.Template("unused"); ok {
					t.Error("template still there")
				}
			},
		},
		{
			name: "delete template used only by ended sessions",
			cmd:  cmd{DeleteTemplateType, &statev1.DeleteTemplate{TemplateId: "old"}},
			check: func(t *testing.T, f *FSM) {
				if _, ok := f.Template("old"); ok {
					t.Error("template still there")
				}
			},
		},
		{
			name: "create session",
			cmd:  createSession("s2", "custom", sPending, 30),
			check: func(t *testing.T, f *FSM) {
				s, ok := f.Session("s2")
				if !ok || s.GetState() != sPending || s.GetTemplateId() != "custom" || s.GetLabels()["k"] != "v" {
					t.Errorf("Session(s2) = %v, %v", s, ok)
				}
			},
		},
		{
			name:    "create existing session",
			cmd:     createSession("run", "custom", sPending, 30),
			wantErr: sandbox.ErrAlreadyExists,
		},
		{
			name:    "create session with missing template",
			cmd:     createSession("s2", "nope", sPending, 30),
			wantErr: sandbox.ErrNotFound,
		},
		{
			name:    "create session without id",
			cmd:     createSession("", "custom", sPending, 30),
			wantErr: sandbox.ErrInvalidArgument,
		},
		{
			name:    "update missing session",
			cmd:     updateSession("nope", sRunning, 30),
			wantErr: sandbox.ErrNotFound,
		},
		{
			name: "update session pending to starting with placement",
			cmd: cmd{UpdateSessionType, &statev1.UpdateSession{
				SessionId: "pend", State: sStarting, AgentId: "a1", ContainerId: "c1", Reason: "placed", At: ts(30),
			}},
			check: func(t *testing.T, f *FSM) {
				s, _ := f.Session("pend")
				if s.GetState() != sStarting || s.GetAgentId() != "a1" || s.GetContainerId() != "c1" ||
					s.GetStateReason() != "placed" || s.GetEndedAt() != nil {
					t.Errorf("Session(pend) = %v", s)
				}
			},
		},
		{
			name: "update session to same state fills placement",
			cmd: cmd{UpdateSessionType, &statev1.UpdateSession{
				SessionId: "run", State: sRunning, AgentId: "a2", ContainerId: "c2", At: ts(30),
			}},
			check: func(t *testing.T, f *FSM) {
				s, _ := f.Session("run")
				if s.GetState() != sRunning || s.GetAgentId() != "a2" || s.GetContainerId() != "c2" || s.GetEndedAt() != nil {
					t.Errorf("Session(run) = %v", s)
				}
			},
		},
		{
			name: "update terminal session to same state is a no-op",
			cmd:  updateSession("dead", sTerminated, 99),
			check: func(t *testing.T, f *FSM) {
				if s, _ := f.Session("dead"); !proto.Equal(s.GetEndedAt(), ts(15)) {
					t.Errorf("ended_at = %v, want 15s", s.GetEndedAt())
				}
			},
		},
		{
			name: "update session running to terminating",
			cmd:  updateSession("run", sTerminating, 30),
			check: func(t *testing.T, f *FSM) {
				if s, _ := f.Session("run"); s.GetState() != sTerminating || s.GetEndedAt() != nil {
					t.Errorf("Session(run) = %v", s)
				}
			},
		},
		{
			name: "update session terminating to terminated sets ended_at",
			cmd:  updateSession("term", sTerminated, 31),
			check: func(t *testing.T, f *FSM) {
				if s, _ := f.Session("term"); s.GetState() != sTerminated || !proto.Equal(s.GetEndedAt(), ts(31)) {
					t.Errorf("Session(term) = %v", s)
				}
			},
		},
		{
			name: "update session running to lost sets ended_at and reason",
			cmd:  cmd{UpdateSessionType, &statev1.UpdateSession{SessionId: "run", State: sLost, Reason: "agent a1 died", At: ts(32)}},
			check: func(t *testing.T, f *FSM) {
				s, _ := f.Session("run")
				if s.GetState() != sLost || !proto.Equal(s.GetEndedAt(), ts(32)) || s.GetStateReason() != "agent a1 died" {
					t.Errorf("Session(run) = %v", s)
				}
			},
		},
		{
			name: "update session pending to failed",
			cmd:  updateSession("pend", sFailed, 33),
			check: func(t *testing.T, f *FSM) {
				if s, _ := f.Session("pend"); s.GetState() != sFailed {
					t.Errorf("Session(pend) = %v", s)
				}
			},
		},
		{
			name:    "update session terminated to running",
			cmd:     updateSession("dead", sRunning, 30),
			wantErr: sandbox.ErrFailedPrecondition,
		},
		{
			name:    "update session running to pending",
			cmd:     updateSession("run", sPending, 30),
			wantErr: sandbox.ErrFailedPrecondition,
		},
		{
			name:    "update session running to terminated skipping terminating",
			cmd:     updateSession("run", sTerminated, 30),
			wantErr: sandbox.ErrFailedPrecondition,
		},
		{
			name: "create execution touches session",
			cmd:  createExecution("e2", "run", 40),
			check: func(t *testing.T, f *FSM) {
				if e, ok := f.Execution("e2"); !ok || e.GetState() != eQueued || e.GetCode() != "print(1)" {
					t.Errorf("Execution(e2) = %v, %v", e, ok)
				}
				if s, _ := f.Session("run"); !proto.Equal(s.GetLastActiveAt(), ts(40)) {
					t.Errorf("last_active_at = %v, want 40s", s.GetLastActiveAt())
				}
				if got := len(f.ExecutionsBySession("run")); got != 4 {
					t.Errorf("ExecutionsBySession(run) has %d, want 4", got)
				}
			},
		},
		{
			name:    "create existing execution",
			cmd:     createExecution("q", "run", 40),
			wantErr: sandbox.ErrAlreadyExists,
		},
		{
			name:    "create execution in missing session",
			cmd:     createExecution("e2", "nope", 40),
			wantErr: sandbox.ErrNotFound,
		},
		{
			name:    "create execution in pending session",
			cmd:     createExecution("e2", "pend", 40),
			wantErr: sandbox.ErrFailedPrecondition,
		},
		{
			name:    "create execution in terminated session",
			cmd:     createExecution("e2", "dead", 40),
			wantErr: sandbox.ErrFailedPrecondition,
		},
		{
			name:    "create execution without id",
			cmd:     createExecution("", "run", 40),
			wantErr: sandbox.ErrInvalidArgument,
		},
		{
			name:    "update missing execution",
			cmd:     updateExecution("nope", eRunning),
			wantErr: sandbox.ErrNotFound,
		},
		{
			name: "update execution queued to running",
			cmd:  updateExecution("q", eRunning),
			check: func(t *testing.T, f *FSM) {
				if e, _ := f.Execution("q"); e.GetState() != eRunning || e.GetCode() != "print(1)" {
					t.Errorf("Execution(q) = %v", e)
				}
			},
		},
		{
			name: "update execution running to completed records result",
			cmd:  finishExecution("r", eCompleted, "hello", 50),
			check: func(t *testing.T, f *FSM) {
				e, _ := f.Execution("r")
				want := &sandboxv1.Execution{
					Id: "r", SessionId: "run", Language: "python", Code: "print(1)", State: eCompleted,
					CreatedAt: ts(21), ExitCode: 3, Stdout: "hello", Stderr: "err", StdoutTruncated: true,
					DurationMs: 42, FinishedAt: ts(50), StateReason: "done",
					Artifacts: []*sandboxv1.Artifact{{Path: "out.txt", SizeBytes: 5, Sha256: "abc"}},
				}
				if !proto.Equal(e, want) {
					t.Errorf("Execution(r) = %v, want %v", e, want)
				}
				if s, _ := f.Session("run"); !proto.Equal(s.GetLastActiveAt(), ts(50)) {
					t.Errorf("last_active_at = %v, want 50s", s.GetLastActiveAt())
				}
			},
		},
		{
			name: "update execution queued to canceled",
			cmd:  finishExecution("q", eCanceled, "", 51),
			check: func(t *testing.T, f *FSM) {
				if e, _ := f.Execution("q"); e.GetState() != eCanceled || !proto.Equal(e.GetFinishedAt(), ts(51)) {
					t.Errorf("Execution(q) = %v", e)
				}
			},
		},
		{
			name: "update execution running to timed out",
			cmd:  finishExecution("r", eTimedOut, "partial", 52),
			check: func(t *testing.T, f *FSM) {
				if e, _ := f.Execution("r"); e.GetState() != eTimedOut || e.GetStdout() != "partial" {
					t.Errorf("Execution(r) = %v", e)
				}
			},
		},
		{
			name: "duplicate terminal report is a no-op",
			cmd:  finishExecution("done", eCompleted, "second", 60),
			check: func(t *testing.T, f *FSM) {
				if e, _ := f.Execution("done"); e.GetStdout() != "first" || !proto.Equal(e.GetFinishedAt(), ts(23)) {
					t.Errorf("Execution(done) = %v, want the first result kept", e)
				}
			},
		},
		{
			name:    "late terminal report with another state is refused",
			cmd:     finishExecution("done", eFailed, "second", 60),
			wantErr: sandbox.ErrFailedPrecondition,
		},
		{
			name:    "terminal execution cannot run again",
			cmd:     updateExecution("done", eRunning),
			wantErr: sandbox.ErrFailedPrecondition,
		},
		{
			name:    "terminal execution cannot be lost",
			cmd:     updateExecution("done", eLost),
			wantErr: sandbox.ErrFailedPrecondition,
		},
		{
			name:    "running execution cannot go back to queued",
			cmd:     updateExecution("r", eQueued),
			wantErr: sandbox.ErrFailedPrecondition,
		},
		{
			name: "register new agent",
			cmd:  cmd{RegisterAgentType, &statev1.RegisterAgent{Agent: &statev1.Agent{Id: "a0", Address: "10.0.0.2:7400"}}},
			check: func(t *testing.T, f *FSM) {
				as := f.Agents()
				if len(as) != 2 || as[0].GetId() != "a0" || as[1].GetId() != "a1" {
					t.Errorf("Agents() = %v", as)
				}
			},
		},
		{
			name: "register known agent replaces it",
			cmd:  cmd{RegisterAgentType, &statev1.RegisterAgent{Agent: &statev1.Agent{Id: "a1", Address: "10.0.0.9:7400", BootId: "b2"}}},
			check: func(t *testing.T, f *FSM) {
				if a, _ := f.Agent("a1"); a.GetAddress() != "10.0.0.9:7400" || a.GetBootId() != "b2" || a.GetCpuMillis() != 0 {
					t.Errorf("Agent(a1) = %v", a)
				}
			},
		},
		{
			name:    "register agent without id",
			cmd:     cmd{RegisterAgentType, &statev1.RegisterAgent{Agent: &statev1.Agent{Address: "x"}}},
			wantErr: sandbox.ErrInvalidArgument,
		},
	}
	runRules(t, seeded, tests)
}

func TestSessionTransitionsFollowDomain(t *testing.T) {
	// Every (from, to) pair: the FSM agrees with sandbox.SessionState.CanTransition.
	for from := sPending; from <= sLost; from++ {
		for to := sPending; to <= sLost; to++ {
			f := New(nil)
			mustApply(t, f, putTemplate("tp", false), createSession("s", "tp", from, 1))
			resp := apply(t, f, updateSession("s", to, 2))
			legal := from == to || sandbox.SessionState(from).CanTransition(sandbox.SessionState(to))
			if legal && resp != nil {
				t.Errorf("%v -> %v: response %v, want nil", from, to, resp)
			}
			if !legal {
				if err, ok := resp.(error); !ok || !errors.Is(err, sandbox.ErrFailedPrecondition) {
					t.Errorf("%v -> %v: response %v, want ErrFailedPrecondition", from, to, resp)
				}
			}
		}
	}
}

func TestExecutionTransitionsFollowDomain(t *testing.T) {
	for from := eQueued; from <= eLost; from++ {
		for to := eQueued; to <= eLost; to++ {
			f := New(nil)
			mustApply(t, f, putTemplate("tp", false), createSession("s", "tp", sRunning, 1), createExecution("e", "s", 2))
			if from != eQueued {
				mustApply(t, f, updateExecution("e", from))
			}
			resp := apply(t, f, updateExecution("e", to))
			legal := from == to || sandbox.ExecutionState(from).CanTransition(sandbox.ExecutionState(to))
			if legal && resp != nil {
				t.Errorf("%v -> %v: response %v, want nil", from, to, resp)
			}
			if !legal {
				if err, ok := resp.(error); !ok || !errors.Is(err, sandbox.ErrFailedPrecondition) {
					t.Errorf("%v -> %v: response %v, want ErrFailedPrecondition", from, to, resp)
				}
			}
		}
	}
}

func TestUnknownType(t *testing.T) {
	payload, err := proto.Marshal(&statev1.RegisterAgent{Agent: &statev1.Agent{Id: "x"}})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name      string
		data      []byte
		wantPanic bool
	}{
		{"ignorable unknown type", append([]byte{byte(IgnoreUnknownTypeFlag | 100)}, payload...), false},
		{"ignorable unknown type without payload", []byte{byte(IgnoreUnknownTypeFlag | 100)}, false},
		{"unknown type", append([]byte{100}, payload...), true},
		{"ignorable next type", append([]byte{byte(IgnoreUnknownTypeFlag | (UpdateTemplateType + 1))}, payload...), false},
		{"next type", append([]byte{byte(UpdateTemplateType + 1)}, payload...), true},
		{"empty command", nil, true},
		{"undecodable payload", []byte{byte(RegisterAgentType), 0xff, 0xff, 0xff}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := seeded(t)
			before := f.State()
			var resp any
			panicked := func() (p bool) {
				defer func() { p = recover() != nil }()
				resp = f.Apply(&raft.Log{Index: 7, Data: tc.data})
				return false
			}()
			if panicked != tc.wantPanic {
				t.Fatalf("panicked = %v, want %v", panicked, tc.wantPanic)
			}
			if !tc.wantPanic && resp != nil {
				t.Errorf("response = %v, want nil", resp)
			}
			if after := f.State(); !proto.Equal(before, after) {
				t.Error("state changed")
			}
		})
	}
}

func TestReadsAreSortedCopies(t *testing.T) {
	f := seeded(t)

	ids := func(n int, id func(int) string) []string {
		out := make([]string, n)
		for i := range out {
			out[i] = id(i)
		}
		return out
	}
	ss := f.Sessions(nil)
	if got, want := ids(len(ss), func(i int) string { return ss[i].GetId() }), []string{"dead", "run", "pend", "term"}; !equal(got, want) {
		t.Errorf("Sessions(nil) ids = %v, want %v (by created_at)", got, want)
	}
	live := f.Sessions(func(s *sandboxv1.Session) bool { return sandbox.SessionState(s.GetState()).Live() })
	if got, want := ids(len(live), func(i int) string { return live[i].GetId() }), []string{"run", "pend", "term"}; !equal(got, want) {
		t.Errorf("Sessions(live) ids = %v, want %v", got, want)
	}
	tpls := f.Templates()
	if got, want := ids(len(tpls), func(i int) string { return tpls[i].GetId() }), []string{"builtin", "custom", "old", "unused"}; !equal(got, want) {
		t.Errorf("Templates() ids = %v, want %v", got, want)
	}
	es := f.ExecutionsBySession("run")
	if got, want := ids(len(es), func(i int) string { return es[i].GetId() }), []string{"q", "r", "done"}; !equal(got, want) {
		t.Errorf("ExecutionsBySession(run) ids = %v, want %v", got, want)
	}
	if got := f.ExecutionsBySession("pend"); len(got) != 0 {
		t.Errorf("ExecutionsBySession(pend) = %v, want none", got)
	}

	// Modifying what a read returned must not reach the state.
	s, _ := f.Session("run")
	s.State = sLost
	s.Labels["k"] = "changed"
	es[0].Stdout = "changed"
	tpls[0].Image = "changed"
	a, _ := f.Agent("a1")
	a.Address = "changed"
	if s2, _ := f.Session("run"); s2.GetState() != sRunning || s2.GetLabels()["k"] != "v" {
		t.Errorf("session changed through a copy: %v", s2)
	}
	if e, _ := f.Execution("q"); e.GetStdout() != "" {
		t.Errorf("execution changed through a copy: %v", e)
	}
	if tp, _ := f.Template("builtin"); tp.GetImage() != "img/builtin" {
		t.Errorf("template changed through a copy: %v", tp)
	}
	if a2, _ := f.Agent("a1"); a2.GetAddress() != "10.0.0.1:7400" {
		t.Errorf("agent changed through a copy: %v", a2)
	}
	for _, missing := range []bool{
		func() bool { _, ok := f.Template("x"); return ok }(),
		func() bool { _, ok := f.Session("x"); return ok }(),
		func() bool { _, ok := f.Execution("x"); return ok }(),
		func() bool { _, ok := f.Agent("x"); return ok }(),
	} {
		if missing {
			t.Error("read of a missing id reported found")
		}
	}
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// memSink is a raft.SnapshotSink in memory.
type memSink struct {
	bytes.Buffer
	closed, canceled bool
}

func (s *memSink) ID() string    { return "mem" }
func (s *memSink) Close() error  { s.closed = true; return nil }
func (s *memSink) Cancel() error { s.canceled = true; return nil }

func persist(t *testing.T, f *FSM) []byte {
	t.Helper()
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	defer snap.Release()
	var sink memSink
	if err := snap.Persist(&sink); err != nil {
		t.Fatalf("Persist: %v", err)
	}
	if !sink.closed || sink.canceled {
		t.Fatalf("sink closed=%v canceled=%v, want closed", sink.closed, sink.canceled)
	}
	return sink.Bytes()
}

func TestSnapshotRestoreRoundTrip(t *testing.T) {
	f := seededCluster(t)
	if st := f.State(); len(st.GetServers()) == 0 || len(st.GetIdempotency()) == 0 {
		t.Fatalf("fixture has no servers or idempotency records: %v", st)
	}
	b := persist(t, f)

	// Changes after the snapshot is taken do not reach it.
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	mustApply(t, f, updateSession("pend", sFailed, 70))
	var sink memSink
	if err := snap.Persist(&sink); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(sink.Bytes(), b) {
		t.Error("snapshot taken before an Apply changed with it, or marshalling is not deterministic")
	}

	g := New(nil)
	mustApply(t, g, putTemplate("stale", false)) // Restore must replace, not merge.
	if err := g.Restore(io.NopCloser(bytes.NewReader(b))); err != nil {
		t.Fatalf("Restore: %v", err)
	}
	h := seededCluster(t)
	if !proto.Equal(g.State(), h.State()) {
		t.Errorf("restored state differs:\ngot  %v\nwant %v", g.State(), h.State())
	}
	if _, ok := g.Template("stale"); ok {
		t.Error("Restore kept state that was not in the snapshot")
	}
	if got := len(g.ExecutionsBySession("run")); got != 3 {
		t.Errorf("restored ExecutionsBySession(run) has %d, want 3", got)
	}
	// The restored FSM keeps enforcing the rules on the restored state.
	if err, _ := apply(t, g, finishExecution("done", eFailed, "", 80)).(error); !errors.Is(err, sandbox.ErrFailedPrecondition) {
		t.Errorf("late report after restore: %v, want ErrFailedPrecondition", err)
	}
	mustApply(t, g, createExecution("e9", "run", 81))
	if got := len(g.ExecutionsBySession("run")); got != 4 {
		t.Errorf("ExecutionsBySession(run) after restore and create has %d, want 4", got)
	}
	// Idempotency keys and servers came back, with their indexes.
	if resp := apply(t, g, createSessionKey("ks-retry", "t1", "k1", 82)); resp != (Existing{KindSession, "ks"}) {
		t.Errorf("idempotent create after restore = %#v, want Existing ks", resp)
	}
	if sv, ok := g.Server("srv1"); !ok || sv.GetRole() != sandboxv1.ServerRole_SERVER_ROLE_UNSPECIFIED || sv.GetApiAddress() == "" {
		t.Errorf("restored Server(srv1) = %v, %v", sv, ok)
	}
	keys := len(g.State().GetIdempotency())
	if resp := apply(t, g, purge("ended")); resp != (Purged{Sessions: 1, Executions: 2}) {
		t.Errorf("purge after restore = %#v", resp)
	}
	if got := len(g.State().GetIdempotency()); got != keys-2 {
		t.Errorf("purge after restore left %d idempotency records, want %d", got, keys-2)
	}

	if err := New(nil).Restore(io.NopCloser(bytes.NewReader([]byte{0xff, 0xff}))); err == nil {
		t.Error("Restore of garbage succeeded")
	}
}

func waitWatchersGone(t *testing.T, f *FSM) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for f.watchers() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d watch channels left behind", f.watchers())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestWaitExecution(t *testing.T) {
	terminal := func(e *sandboxv1.Execution) bool { return sandbox.ExecutionState(e.GetState()).Terminal() }

	t.Run("wakes on apply", func(t *testing.T) {
		f := seeded(t)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		type result struct {
			e   *sandboxv1.Execution
			err error
		}
		const waiters = 3
		results := make(chan result, waiters)
		for range waiters {
			go func() {
				e, err := f.WaitExecution(ctx, "q", terminal)
				results <- result{e, err}
			}()
		}
		// Unrelated changes and a non-terminal one do not satisfy the waiters.
		mustApply(t, f, updateExecution("q", eRunning), finishExecution("r", eFailed, "", 90))
		mustApply(t, f, finishExecution("q", eCompleted, "out", 91))
		for range waiters {
			r := <-results
			if r.err != nil || r.e.GetState() != eCompleted || r.e.GetStdout() != "out" {
				t.Errorf("WaitExecution = %v, %v", r.e, r.err)
			}
		}
		waitWatchersGone(t, f)
	})

	t.Run("already satisfied", func(t *testing.T) {
		f := seeded(t)
		e, err := f.WaitExecution(context.Background(), "done", terminal)
		if err != nil || e.GetStdout() != "first" {
			t.Errorf("WaitExecution = %v, %v", e, err)
		}
		if f.watchers() != 0 {
			t.Error("a satisfied wait left a watch behind")
		}
	})

	t.Run("not found", func(t *testing.T) {
		f := seeded(t)
		if _, err := f.WaitExecution(context.Background(), "nope", terminal); !errors.Is(err, sandbox.ErrNotFound) {
			t.Errorf("err = %v, want ErrNotFound", err)
		}
	})

	t.Run("cancel does not leak", func(t *testing.T) {
		f := seeded(t)
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		errs := make(chan error, 2)
		for _, id := range []string{"q", "r"} {
			wg.Go(func() {
				_, err := f.WaitExecution(ctx, id, terminal)
				errs <- err
			})
		}
		deadline := time.Now().Add(5 * time.Second)
		for f.watchers() != 2 {
			if time.Now().After(deadline) {
				t.Fatalf("waiters did not register: %d watches", f.watchers())
			}
			time.Sleep(time.Millisecond)
		}
		cancel()
		wg.Wait()
		close(errs)
		for err := range errs {
			if !errors.Is(err, context.Canceled) {
				t.Errorf("err = %v, want context.Canceled", err)
			}
		}
		if n := f.watchers(); n != 0 {
			t.Errorf("%d watch channels left after every waiter gave up", n)
		}
	})

	t.Run("restore wakes waiters", func(t *testing.T) {
		src := seeded(t)
		mustApply(t, src, updateExecution("q", eCanceled))
		b := persist(t, src)

		f := seeded(t)
		done := make(chan error, 1)
		go func() {
			_, err := f.WaitExecution(context.Background(), "q", terminal)
			done <- err
		}()
		deadline := time.Now().Add(5 * time.Second)
		for f.watchers() != 1 {
			if time.Now().After(deadline) {
				t.Fatal("waiter did not register")
			}
			time.Sleep(time.Millisecond)
		}
		if err := f.Restore(io.NopCloser(bytes.NewReader(b))); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("WaitExecution after restore: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("Restore did not wake the waiter")
		}
	})
}

func TestWaitSession(t *testing.T) {
	f := seeded(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	done := make(chan *sandboxv1.Session, 1)
	go func() {
		s, err := f.WaitSession(ctx, "pend", func(s *sandboxv1.Session) bool { return s.GetState() == sRunning })
		if err != nil {
			t.Errorf("WaitSession: %v", err)
		}
		done <- s
	}()
	mustApply(t, f,
		cmd{UpdateSessionType, &statev1.UpdateSession{SessionId: "pend", State: sStarting, AgentId: "a1", At: ts(1)}},
		cmd{UpdateSessionType, &statev1.UpdateSession{SessionId: "pend", State: sRunning, ContainerId: "c1", At: ts(2)}},
	)
	if s := <-done; s.GetState() != sRunning || s.GetAgentId() != "a1" || s.GetContainerId() != "c1" {
		t.Errorf("WaitSession = %v", s)
	}
	waitWatchersGone(t, f)

	if _, err := f.WaitSession(ctx, "nope", func(*sandboxv1.Session) bool { return true }); !errors.Is(err, sandbox.ErrNotFound) {
		t.Errorf("WaitSession(nope) err = %v, want ErrNotFound", err)
	}
}

func TestConcurrentReadsDuringApply(t *testing.T) {
	f := seeded(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for ctx.Err() == nil {
				f.Sessions(nil)
				f.ExecutionsBySession("run")
				f.Templates()
				f.Agents()
				f.Servers()
				f.IdempotentID(KindSession, "t1", "k1")
				if _, err := f.Snapshot(); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	for i := range 200 {
		id := "c" + string(rune('a'+i%26)) + string(rune('a'+i/26))
		mustApply(t, f, createExecution(id, "run", int64(100+i)), finishExecution(id, eCompleted, "x", int64(100+i)))
	}
	cancel()
	wg.Wait()
	if got := len(f.ExecutionsBySession("run")); got != 203 {
		t.Errorf("ExecutionsBySession(run) has %d, want 203", got)
	}
}

// A known type carrying the ignore flag is applied: the flag only tells
// servers that do not know the type that they may skip it.
func TestKnownTypeWithIgnoreFlagApplies(t *testing.T) {
	payload, err := proto.Marshal(&statev1.RegisterAgent{Agent: &statev1.Agent{Id: "flagged"}})
	if err != nil {
		t.Fatal(err)
	}
	f := seeded(t)
	if resp := f.Apply(&raft.Log{Index: 7, Data: append([]byte{byte(IgnoreUnknownTypeFlag | RegisterAgentType)}, payload...)}); resp != nil {
		t.Fatalf("response %v", resp)
	}
	if _, ok := f.Agent("flagged"); !ok {
		t.Fatal("the flagged known command was not applied")
	}
}

// Of two creates of one template id, only the first succeeds; PutTemplate
// still upserts.
func TestCreateTemplateRefusesExisting(t *testing.T) {
	f := New(nil)
	apply := func(typ MessageType, msg proto.Message) any {
		b, err := Encode(typ, msg)
		if err != nil {
			t.Fatal(err)
		}
		return f.Apply(&raft.Log{Index: 1, Data: b})
	}
	tmpl := &sandboxv1.Template{Id: "t1", Image: "first"}
	if resp := apply(CreateTemplateType, &statev1.CreateTemplate{Template: tmpl}); resp != nil {
		t.Fatalf("first create: %v", resp)
	}
	second := &sandboxv1.Template{Id: "t1", Image: "second"}
	resp := apply(CreateTemplateType, &statev1.CreateTemplate{Template: second})
	if err, ok := resp.(error); !ok || !errors.Is(err, sandbox.ErrAlreadyExists) {
		t.Fatalf("second create: %v, want ErrAlreadyExists", resp)
	}
	if got, _ := f.Template("t1"); got.GetImage() != "first" {
		t.Fatalf("the second create overwrote the first: %v", got)
	}
	if resp := apply(PutTemplateType, &statev1.PutTemplate{Template: second}); resp != nil {
		t.Fatalf("put: %v", resp)
	}
	if got, _ := f.Template("t1"); got.GetImage() != "second" {
		t.Fatalf("put did not upsert: %v", got)
	}
}

func TestUpdateTemplate(t *testing.T) {
	f := seeded(t)
	mustApply(t, f, putTemplate("custom", false))
	size := int32(7)
	mustApply(t, f, cmd{UpdateTemplateType, &statev1.UpdateTemplate{TemplateId: "custom", WarmPoolSize: &size}})
	if tp, _ := f.Template("custom"); tp.GetWarmPoolSize() != 7 || tp.GetImage() == "" {
		t.Fatalf("after update: %v", tp)
	}
	// Unset fields keep their value.
	mustApply(t, f, cmd{UpdateTemplateType, &statev1.UpdateTemplate{TemplateId: "custom"}})
	if tp, _ := f.Template("custom"); tp.GetWarmPoolSize() != 7 {
		t.Fatalf("an empty update changed warm_pool_size: %v", tp)
	}
	neg := int32(-1)
	for name, c := range map[string]struct {
		m    *statev1.UpdateTemplate
		want error
	}{
		"unknown template": {&statev1.UpdateTemplate{TemplateId: "nope", WarmPoolSize: &size}, sandbox.ErrNotFound},
		"negative size":    {&statev1.UpdateTemplate{TemplateId: "custom", WarmPoolSize: &neg}, sandbox.ErrInvalidArgument},
	} {
		before := f.State()
		if err, _ := apply(t, f, cmd{UpdateTemplateType, c.m}).(error); !errors.Is(err, c.want) {
			t.Errorf("%s: %v, want %v", name, err, c.want)
		}
		if !proto.Equal(before, f.State()) {
			t.Errorf("%s: a refused update changed the state", name)
		}
	}
}

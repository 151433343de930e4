package agent

import (
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/sandboxhq/sandbox/agent/runtime"
	"github.com/sandboxhq/sandbox/agent/state"
	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
)

// expectCallbacks reads the executor's next callbacks and checks that the
// agent answered each with 200.
func expectCallbacks(t *testing.T, e *fakeExecutor, kinds ...string) {
	t.Helper()
	for _, kind := range kinds {
		select {
		case o := <-e.outcomes:
			if o.kind != kind || o.status != http.StatusOK {
				t.Fatalf("callback %s answered %+v", kind, o)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no %s callback", kind)
		}
	}
}

// containers calls ListContainers and returns its answer by container id.
func (ta *testAgent) containers(t *testing.T) map[string]*agentv1.Container {
	t.Helper()
	resp, err := ta.client.ListContainers(context.Background(), connect.NewRequest(&agentv1.ListContainersRequest{}))
	if err != nil {
		t.Fatalf("ListContainers: %v", err)
	}
	out := map[string]*agentv1.Container{}
	for _, c := range resp.Msg.Containers {
		out[c.ContainerId] = c
	}
	return out
}

func (ta *testAgent) execute(ctx context.Context, sessionID, executionID, code string) error {
	_, err := ta.client.Execute(ctx, connect.NewRequest(&agentv1.ExecuteRequest{
		ExecutionId: executionID, SessionId: sessionID, Language: "python", Code: code,
	}))
	return err
}

// TestRestartReadoptsRunningSession kills an agent while an execution runs
// and starts a new one on the same host: it takes the session back, relays
// the running execution's callbacks with the session's token, and serves
// new executions.
func TestRestartReadoptsRunningSession(t *testing.T) {
	ctx := context.Background()
	ta := newTestAgent(t)
	cid := ta.start(t, "s1")
	c, _ := ta.rt.container(cid)

	if err := ta.execute(ctx, "s1", "done1", "print(1)"); err != nil {
		t.Fatal(err)
	}
	expectCallbacks(t, c.exec, "status", "artifact", "result")
	if err := ta.execute(ctx, "s1", "held1", "hold"); err != nil {
		t.Fatal(err)
	}
	if got := ta.containers(t)[cid].GetPendingExecutionIds(); !slices.Equal(got, []string{"held1"}) {
		t.Fatalf("pending before the crash = %v", got)
	}

	tb := ta.restart(t)
	tb.run(t)

	if ta.rt.wasDestroyed(cid) {
		t.Fatal("the running session's container was destroyed")
	}
	got := tb.containers(t)
	if len(got) != 1 || got[cid].GetSessionId() != "s1" || !got[cid].GetRunning() || !slices.Equal(got[cid].GetPendingExecutionIds(), []string{"held1"}) {
		t.Fatalf("ListContainers after restart = %v", got)
	}
	if recs, _ := tb.db.Sessions(); len(recs) != 1 || recs[0].SocketDir != filepath.Join(tb.dataDir, "sockets", cid) || recs[0].Limits.MemoryMiB != 256 {
		t.Fatalf("agent.db = %+v", recs)
	}

	// The held execution reports now, to the new agent, with the token it was given at init.
	c.exec.releaseHeld()
	expectCallbacks(t, c.exec, "status", "artifact", "result")
	reports := ta.cp.reportsOf("held1")
	if len(reports) != 2 || reports[1].Kind != agentv1.ReportKind_REPORT_KIND_RESULT || reports[1].State != sandboxv1.ExecutionState_EXECUTION_STATE_COMPLETED || reports[1].SessionId != "s1" {
		t.Fatalf("reports of held1 = %v", reports)
	}
	if got := tb.containers(t)[cid].GetPendingExecutionIds(); len(got) != 0 {
		t.Errorf("pending after the result = %v", got)
	}
	if recs, _ := tb.db.Sessions(); len(recs) != 1 || len(recs[0].PendingExecutionIDs) != 0 {
		t.Errorf("agent.db after the result = %+v", recs)
	}
	if got, _ := download(t, tb.client, "held1", "out/result.txt"); string(got) != "artifact of held1" {
		t.Errorf("artifact = %q", got)
	}

	// New executions work; the retried StartSession of the server finds the session.
	if err := tb.execute(ctx, "s1", "after1", "print(2)"); err != nil {
		t.Fatalf("Execute after restart: %v", err)
	}
	expectCallbacks(t, c.exec, "status", "artifact", "result")
	if n := len(ta.cp.reportsOf("after1")); n != 2 {
		t.Errorf("%d reports of after1", n)
	}
	if again := tb.start(t, "s1"); again != cid {
		t.Errorf("StartSession of the adopted session = %q", again)
	}
	if got := metricValue(t, tb.registry, "sandbox_agent_startup_decisions_total", map[string]string{"decision": "adopted"}); got != 1 {
		t.Errorf("startup_decisions_total{adopted} = %v", got)
	}

	// Its exit is watched again.
	ta.rt.exit(cid, 139)
	select {
	case e := <-ta.cp.exits:
		if e.SessionId != "s1" || !strings.Contains(e.Reason, "exit code 139") {
			t.Fatalf("ReportSessionExit = %v", e)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no ReportSessionExit for the adopted session")
	}
	eventually(t, "container to be removed", func() bool { return ta.rt.wasDestroyed(cid) })
}

// TestRestartDecisions checks every start-up decision at once: what runs and
// is recorded is adopted, everything else the previous run left is
// destroyed or dropped, and the servers hear of the sessions they believe
// run that are gone.
func TestRestartDecisions(t *testing.T) {
	ta := newTestAgent(t)
	ok := ta.start(t, "ok")
	exited := ta.start(t, "exited")
	mute := ta.start(t, "mute")
	// A container the previous run started but never recorded (it died before the end of StartSession).
	orphanDir := filepath.Join(ta.dataDir, "sockets", "s-orphan")
	if err := os.Mkdir(orphanDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := ta.rt.Start(context.Background(), runtime.Spec{ID: "s-orphan", SocketDir: orphanDir,
		Labels: map[string]string{runtime.LabelAgent: "agent-1", runtime.LabelSession: "orphan"}}); err != nil {
		t.Fatal(err)
	}
	// Another agent's container on the same runtime.
	if _, err := ta.rt.Start(context.Background(), runtime.Spec{ID: "foreign", SocketDir: t.TempDir(),
		Labels: map[string]string{runtime.LabelAgent: "agent-2"}}); err != nil {
		t.Fatal(err)
	}
	// A record whose container is gone.
	if err := ta.db.PutSession(state.Session{SessionID: "ghost", ContainerID: "s-ghost", Token: "token-ghost"}); err != nil {
		t.Fatal(err)
	}
	staleLog := filepath.Join(ta.dataDir, "logs", "s-old.log")
	if err := os.WriteFile(staleLog, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}

	ta.crash(t)
	// While the agent is down, one container exits and one executor hangs.
	ta.rt.exit(exited, 3)
	ta.rt.mute(mute)

	tb := newTestAgentOn(t, ta.dataDir, ta.rt, ta.cp, ta.cpURL)
	tb.adoptHealthTimeout = 100 * time.Millisecond
	tb.run(t)

	for _, tc := range []struct {
		container string
		destroyed bool
	}{
		{ok, false},
		{exited, true},
		{mute, true},
		{"s-orphan", true},
		{"foreign", false},
	} {
		if got := ta.rt.wasDestroyed(tc.container); got != tc.destroyed {
			t.Errorf("container %s destroyed = %v, want %v", tc.container, got, tc.destroyed)
		}
	}
	recs, err := tb.db.Sessions()
	if err != nil || len(recs) != 1 || recs[0].SessionID != "ok" {
		t.Errorf("agent.db = %+v, %v", recs, err)
	}
	if got := tb.containers(t); len(got) != 1 || got[ok].GetSessionId() != "ok" || !got[ok].GetRunning() {
		t.Errorf("ListContainers = %v", got)
	}
	entries, _ := os.ReadDir(filepath.Join(tb.dataDir, "sockets"))
	if len(entries) != 1 || entries[0].Name() != ok {
		t.Errorf("socket dirs = %v, want only %s", entries, ok)
	}
	if _, err := os.Stat(staleLog); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stale executor log still there: %v", err)
	}

	// The servers believe "exited" and "mute" run: they hear of both. "ghost"
	// they find missing from ListContainers; "orphan" they never placed here.
	var reported []string
	for len(reported) < 2 {
		select {
		case e := <-ta.cp.exits:
			reported = append(reported, e.SessionId+": "+e.Reason)
		case <-time.After(10 * time.Second):
			t.Fatalf("exit reports = %v, want 2", reported)
		}
	}
	sort.Strings(reported)
	if !strings.HasPrefix(reported[0], "exited: container exited while its agent was down: exit code 3") ||
		!strings.HasPrefix(reported[1], "mute: agent restarted and could not re-adopt") || !strings.Contains(reported[1], "not healthy") {
		t.Errorf("exit reports = %q", reported)
	}
	for decision, want := range map[string]float64{"adopted": 1, "destroyed": 3, "dropped": 1} {
		if got := metricValue(t, tb.registry, "sandbox_agent_startup_decisions_total", map[string]string{"decision": decision}); got != want {
			t.Errorf("startup_decisions_total{%s} = %v, want %v", decision, got, want)
		}
	}
}

// TestRestartWithoutSessions: a clean restart of an agent that ran nothing.
func TestRestartWithoutSessions(t *testing.T) {
	ta := newTestAgent(t)
	tb := ta.restart(t)
	tb.run(t)
	if got := tb.containers(t); len(got) != 0 {
		t.Errorf("ListContainers = %v", got)
	}
}

// TestPendingExecutions follows the pending list through Execute: an
// execution the executor refused is not pending, a retried Execute of a
// pending one leaves it pending, a relayed result settles it.
func TestPendingExecutions(t *testing.T) {
	ctx := context.Background()
	ta := newTestAgent(t)
	cid := ta.start(t, "s1")
	c, _ := ta.rt.container(cid)
	pending := func() []string {
		t.Helper()
		recs, err := ta.db.Sessions()
		if err != nil || len(recs) != 1 {
			t.Fatalf("agent.db = %v, %v", recs, err)
		}
		listed := ta.containers(t)[cid].GetPendingExecutionIds()
		if !slices.Equal(listed, recs[0].PendingExecutionIDs) {
			t.Fatalf("ListContainers pending %v, agent.db pending %v", listed, recs[0].PendingExecutionIDs)
		}
		return listed
	}

	if err := ta.execute(ctx, "s1", "rejected", "reject me"); connect.CodeOf(err) != connect.CodeInvalidArgument {
		t.Fatalf("Execute = %v", err)
	}
	if got := pending(); len(got) != 0 {
		t.Fatalf("pending after a refused execution = %v", got)
	}
	if err := ta.execute(ctx, "s1", "h1", "hold"); err != nil {
		t.Fatal(err)
	}
	if err := ta.execute(ctx, "s1", "h2", "hold"); err != nil {
		t.Fatal(err)
	}
	if got := pending(); !slices.Equal(got, []string{"h1", "h2"}) {
		t.Fatalf("pending = %v", got)
	}
	// The fake executor takes a duplicate id; the real one refuses it. Either way it stays pending.
	if err := ta.execute(ctx, "s1", "h1", "reject me"); err == nil {
		t.Fatal("duplicate Execute accepted")
	}
	if got := pending(); !slices.Equal(got, []string{"h1", "h2"}) {
		t.Fatalf("pending after a refused retry = %v", got)
	}
	c.exec.releaseHeld()
	// The two run side by side: their callbacks interleave.
	for range 6 {
		select {
		case o := <-c.exec.outcomes:
			if o.status != http.StatusOK {
				t.Fatalf("callback %+v", o)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("callbacks missing")
		}
	}
	if got := pending(); len(got) != 0 {
		t.Fatalf("pending after the results = %v", got)
	}
}

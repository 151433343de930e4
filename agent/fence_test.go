package agent

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"connectrpc.com/connect"

	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1/agentv1connect"
)

func fence(term uint64) *agentv1.Fence { return &agentv1.Fence{Term: term, Index: 100 + term} }

// fencedCalls are the AgentService commands, each sent with the fence given
// and a check that it changed nothing when refused.
var fencedCalls = []struct {
	name string
	call func(ctx context.Context, ta *testAgent, f *agentv1.Fence) error
	// untouched reports whether the agent's state shows no trace of the call.
	untouched func(t *testing.T, ta *testAgent) bool
}{
	{
		name: "StartSession",
		call: func(ctx context.Context, ta *testAgent, f *agentv1.Fence) error {
			req := startReq("new")
			req.Fence = f
			_, err := ta.client.StartSession(ctx, connect.NewRequest(req))
			return err
		},
		untouched: func(t *testing.T, ta *testAgent) bool { _, ok := ta.rt.container("s-new"); return !ok },
	},
	{
		name: "StopSession",
		call: func(ctx context.Context, ta *testAgent, f *agentv1.Fence) error {
			_, err := ta.client.StopSession(ctx, connect.NewRequest(&agentv1.StopSessionRequest{Fence: f, SessionId: "s1"}))
			return err
		},
		untouched: func(t *testing.T, ta *testAgent) bool { return !ta.rt.wasDestroyed("s-s1") },
	},
	{
		name: "Execute",
		call: func(ctx context.Context, ta *testAgent, f *agentv1.Fence) error {
			_, err := ta.client.Execute(ctx, connect.NewRequest(&agentv1.ExecuteRequest{
				Fence: f, ExecutionId: "x1", SessionId: "s1", Language: "python", Code: "hold",
			}))
			return err
		},
		untouched: func(t *testing.T, ta *testAgent) bool {
			c, _ := ta.rt.container("s-s1")
			executed, _ := c.exec.calls()
			return len(executed) == 0 && len(ta.containers(t)["s-s1"].GetPendingExecutionIds()) == 0
		},
	},
	{
		name: "CancelExecution",
		call: func(ctx context.Context, ta *testAgent, f *agentv1.Fence) error {
			_, err := ta.client.CancelExecution(ctx, connect.NewRequest(&agentv1.CancelExecutionRequest{Fence: f, ExecutionId: "x1", SessionId: "s1"}))
			return err
		},
		untouched: func(t *testing.T, ta *testAgent) bool {
			c, _ := ta.rt.container("s-s1")
			_, canceled := c.exec.calls()
			return len(canceled) == 0
		},
	},
}

// fencedAgent is an agent with session s1 that has seen term 5.
func fencedAgent(t *testing.T) *testAgent {
	t.Helper()
	ta := newTestAgent(t)
	ta.start(t, "s1")
	// ListContainers raises the term too.
	if _, err := ta.client.ListContainers(context.Background(), connect.NewRequest(&agentv1.ListContainersRequest{Fence: fence(5)})); err != nil {
		t.Fatal(err)
	}
	return ta
}

// TestFenceRefusesDeposedLeaders sends every command from an older term, and
// without a fence, to an agent that has seen term 5.
func TestFenceRefusesDeposedLeaders(t *testing.T) {
	for _, fc := range fencedCalls {
		for _, tc := range []struct {
			name  string
			fence *agentv1.Fence
			term  string
		}{
			{"lower term", fence(3), "term 3"},
			{"term 0", fence(0), "term 0"},
			{"no fence", nil, "term 0"},
		} {
			t.Run(fc.name+"/"+tc.name, func(t *testing.T) {
				ta := fencedAgent(t)
				err := fc.call(context.Background(), ta, tc.fence)
				if connect.CodeOf(err) != connect.CodeFailedPrecondition {
					t.Fatalf("%s = %v, want FailedPrecondition", fc.name, err)
				}
				want := "fenced: command from " + tc.term + ", this agent has seen term 5 (a newer leader exists)"
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not say %q", err, want)
				}
				if !fc.untouched(t, ta) {
					t.Errorf("refused %s changed the agent's state", fc.name)
				}
				if got := metricValue(t, ta.registry, "sandbox_agent_fenced_commands_total", nil); got != 1 {
					t.Errorf("fenced_commands_total = %v", got)
				}
			})
		}
	}
}

// TestFenceAdmitsCurrentAndNewerLeaders sends every command from the term
// the agent has seen and from a newer one, which then becomes the highest.
func TestFenceAdmitsCurrentAndNewerLeaders(t *testing.T) {
	for _, fc := range fencedCalls {
		for _, term := range []uint64{5, 7} {
			t.Run(fmt.Sprintf("%s/term %d", fc.name, term), func(t *testing.T) {
				ta := fencedAgent(t)
				err := fc.call(context.Background(), ta, fence(term))
				// CancelExecution of an execution the executor does not run is NotFound: it got through.
				if err != nil && !(fc.name == "CancelExecution" && connect.CodeOf(err) == connect.CodeNotFound) {
					t.Fatalf("%s from term %d = %v", fc.name, term, err)
				}
				if fc.untouched(t, ta) {
					t.Errorf("%s from term %d did nothing", fc.name, term)
				}
				if got := metricValue(t, ta.registry, "sandbox_agent_fence_term", nil); got != float64(term) {
					t.Errorf("fence_term = %v, want %d", got, term)
				}
			})
		}
	}
}

// TestFenceObserveOnly: ListContainers and DownloadArtifact are never refused.
func TestFenceObserveOnly(t *testing.T) {
	ta := fencedAgent(t)
	ctx := context.Background()
	for _, f := range []*agentv1.Fence{nil, fence(1), fence(5)} {
		if _, err := ta.client.ListContainers(ctx, connect.NewRequest(&agentv1.ListContainersRequest{Fence: f})); err != nil {
			t.Errorf("ListContainers with fence %v: %v", f, err)
		}
	}
	stream, err := ta.client.DownloadArtifact(ctx, connect.NewRequest(&agentv1.DownloadArtifactRequest{ExecutionId: "e1", Path: "a.txt"}))
	if err == nil {
		for stream.Receive() {
		}
		err = stream.Err()
		stream.Close()
	}
	if connect.CodeOf(err) != connect.CodeNotFound {
		t.Errorf("DownloadArtifact = %v, want NotFound", err)
	}
	// ListContainers with a higher term raises it.
	if _, err := ta.client.ListContainers(ctx, connect.NewRequest(&agentv1.ListContainersRequest{Fence: fence(6)})); err != nil {
		t.Fatal(err)
	}
	if err := fencedCalls[2].call(ctx, ta, fence(5)); connect.CodeOf(err) != connect.CodeFailedPrecondition {
		t.Errorf("Execute from term 5 after ListContainers from term 6 = %v", err)
	}
}

// TestFenceSurvivesRestart: a restarted agent still refuses the deposed leader.
func TestFenceSurvivesRestart(t *testing.T) {
	ctx := context.Background()
	ta := fencedAgent(t)
	if err := fencedCalls[2].call(ctx, ta, fence(8)); err != nil {
		t.Fatal(err)
	}
	tb := ta.restart(t)
	tb.run(t)
	for _, tc := range []struct {
		fence  *agentv1.Fence
		refuse bool
	}{
		{fence(7), true},
		{nil, true},
		{fence(8), false},
	} {
		_, err := tb.client.StopSession(ctx, connect.NewRequest(&agentv1.StopSessionRequest{Fence: tc.fence, SessionId: "s1"}))
		if refused := connect.CodeOf(err) == connect.CodeFailedPrecondition; refused != tc.refuse || (!tc.refuse && err != nil) {
			t.Errorf("StopSession with fence %v after restart = %v, want refused %v", tc.fence, err, tc.refuse)
		}
	}
	if !ta.rt.wasDestroyed("s-s1") {
		t.Error("StopSession from the current term did not stop the session")
	}
}

// TestLeaderCommandMovesReports: a fenced command carrying the sending
// server's URL (scheduler.ServerHeader) makes that server, when it is one of
// the agent's, the first its reports go to; a refused command does not.
func TestLeaderCommandMovesReports(t *testing.T) {
	ta := newTestAgent(t)
	ta.start(t, "s1")
	f := newFailoverCP("http://s1:7401,"+ta.cpURL, func(url string) agentv1connect.ControlPlaneServiceClient {
		return agentv1connect.NewControlPlaneServiceClient(http.DefaultClient, url)
	})
	ta.Agent.cp = f
	command := func(term uint64, server string) error {
		req := connect.NewRequest(&agentv1.StopSessionRequest{Fence: fence(term), SessionId: "nope"})
		req.Header().Set("Sandbox-Server", server)
		_, err := ta.client.StopSession(context.Background(), req)
		return err
	}
	_ = command(5, ta.cpURL) // not_found, after the fence admitted it
	if got := f.urls[f.current.Load()]; got != ta.cpURL {
		t.Errorf("after a command from %s, reports go to %s", ta.cpURL, got)
	}
	if err := command(4, "http://s1:7401"); err == nil {
		t.Fatal("a command from a lower term was admitted")
	}
	if got := f.urls[f.current.Load()]; got != ta.cpURL {
		t.Errorf("a refused command moved reports to %s", got)
	}
}

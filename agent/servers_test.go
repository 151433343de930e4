package agent

import (
	"context"
	"testing"

	"connectrpc.com/connect"

	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1/agentv1connect"
)

// recordingCP answers every ReportExecution, or fails it unavailable (a
// dead server), and records which server was called.
type recordingCP struct {
	agentv1connect.ControlPlaneServiceClient
	url    string
	down   bool
	called *[]string
}

func (r recordingCP) ReportExecution(context.Context, *connect.Request[agentv1.ReportExecutionRequest]) (*connect.Response[agentv1.ReportExecutionResponse], error) {
	*r.called = append(*r.called, r.url)
	if r.down {
		return nil, connect.NewError(connect.CodeUnavailable, nil)
	}
	return connect.NewResponse(&agentv1.ReportExecutionResponse{}), nil
}

// TestFailoverCPPrefersTheLeader: reports go to the server that last
// answered; a command from the leader (prefer) moves them there at once,
// an unknown URL changes nothing, and a dead server still fails over.
func TestFailoverCPPrefersTheLeader(t *testing.T) {
	var called []string
	down := map[string]bool{}
	f := newFailoverCP("http://s1:7401, http://s2:7401/,http://s3:7401", func(url string) agentv1connect.ControlPlaneServiceClient {
		return recordingCP{url: url, down: down[url], called: &called}
	})
	report := func() string {
		t.Helper()
		called = nil
		if _, err := f.ReportExecution(context.Background(), connect.NewRequest(&agentv1.ReportExecutionRequest{})); err != nil {
			t.Fatalf("ReportExecution: %v", err)
		}
		return called[len(called)-1]
	}
	if got := report(); got != "http://s1:7401" {
		t.Fatalf("first report went to %s, want the first server", got)
	}
	f.prefer("http://s2:7401/")
	if got := report(); got != "http://s2:7401" {
		t.Errorf("after the leader's command, a report went to %s, want http://s2:7401", got)
	}
	f.prefer("http://elsewhere:7401")
	if got := report(); got != "http://s2:7401" {
		t.Errorf("an unknown server's URL moved reports to %s", got)
	}

	// A server that is down is skipped, and the next that answers sticks.
	down["http://s3:7401"] = true
	f2 := newFailoverCP("http://s1:7401,http://s2:7401,http://s3:7401", func(url string) agentv1connect.ControlPlaneServiceClient {
		return recordingCP{url: url, down: down[url], called: &called}
	})
	f2.prefer("http://s3:7401")
	called = nil
	if _, err := f2.ReportExecution(context.Background(), connect.NewRequest(&agentv1.ReportExecutionRequest{})); err != nil {
		t.Fatal(err)
	}
	if len(called) != 2 || called[0] != "http://s3:7401" || called[1] != "http://s1:7401" {
		t.Errorf("with the preferred server down, calls went to %v, want s3 then s1", called)
	}
}

package scheduler

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1/agentv1connect"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/scheduler/fsm"
)

func serveFakeAgent(t *testing.T, a *fakeAgent) string {
	t.Helper()
	path, h := agentv1connect.NewAgentServiceHandler(a)
	mux := http.NewServeMux()
	mux.Handle(path, h)
	srv := httptest.NewUnstartedServer(mux)
	srv.Config.Protocols = new(http.Protocols)
	srv.Config.Protocols.SetUnencryptedHTTP2(true)
	srv.Config.Protocols.SetHTTP1(true)
	srv.Start()
	t.Cleanup(srv.Close)
	return srv.Listener.Addr().String()
}

// The leader's sweep ends sessions at their maximum lifetime and at their
// idle timeout, and purges ended sessions past the retention period.
func TestHousekeeping(t *testing.T) {
	s, f := newTestScheduler(t)
	s.cfg.Retention = time.Hour
	ctx := context.Background()
	agent := &fakeAgent{}
	addr := serveFakeAgent(t, agent)
	now := time.Now()
	ts := func(d time.Duration) *timestamppb.Timestamp { return timestamppb.New(now.Add(-d)) }
	if _, err := s.raft.Apply(ctx, fsm.RegisterAgentType, &statev1.RegisterAgent{Agent: &statev1.Agent{Id: "a1", Address: addr, CpuMillis: 8000, MemoryMib: 8192, BootId: "b"}}); err != nil {
		t.Fatal(err)
	}
	sessions := []*sandboxv1.Session{
		{Id: "old", CreatedAt: ts(2 * time.Hour), LastActiveAt: ts(time.Minute), MaxLifetimeSeconds: 3600, IdleTimeoutSeconds: 600},
		{Id: "idle", CreatedAt: ts(time.Hour), LastActiveAt: ts(20 * time.Minute), MaxLifetimeSeconds: 86400, IdleTimeoutSeconds: 600},
		{Id: "fresh", CreatedAt: ts(time.Minute), LastActiveAt: ts(time.Minute), MaxLifetimeSeconds: 86400, IdleTimeoutSeconds: 600},
		{Id: "ended-long-ago", CreatedAt: ts(3 * time.Hour), LastActiveAt: ts(3 * time.Hour)},
	}
	for _, sess := range sessions {
		sess.TemplateId, sess.AgentId, sess.State = "python-basic", "a1", sandboxv1.SessionState_SESSION_STATE_RUNNING
		sess.ResourceLimits = limitsToProto(sandbox.DefaultLimits)
		if _, err := s.raft.Apply(ctx, fsm.CreateSessionType, &statev1.CreateSession{Session: sess}); err != nil {
			t.Fatal(err)
		}
	}
	for _, st := range []sandboxv1.SessionState{sandboxv1.SessionState_SESSION_STATE_TERMINATING, sandboxv1.SessionState_SESSION_STATE_TERMINATED} {
		if _, err := s.raft.Apply(ctx, fsm.UpdateSessionType, &statev1.UpdateSession{SessionId: "ended-long-ago", State: st, At: ts(2 * time.Hour)}); err != nil {
			t.Fatal(err)
		}
	}

	s.housekeep(ctx, now)

	for id, want := range map[string]string{"old": "maximum lifetime", "idle": "idle for more than"} {
		got, _ := f.Session(id)
		if got.GetState() != sandboxv1.SessionState_SESSION_STATE_TERMINATED || !strings.Contains(got.GetStateReason(), want) {
			t.Errorf("session %s: %v %q, want TERMINATED because %q", id, got.GetState(), got.GetStateReason(), want)
		}
	}
	if got, _ := f.Session("fresh"); got.GetState() != sandboxv1.SessionState_SESSION_STATE_RUNNING {
		t.Errorf("fresh session is %v", got.GetState())
	}
	if _, ok := f.Session("ended-long-ago"); ok {
		t.Error("a session ended past the retention period was not purged")
	}
	agent.mu.Lock()
	defer agent.mu.Unlock()
	if len(agent.stopped) != 2 {
		t.Errorf("agent stopped %v, want the old and the idle session", agent.stopped)
	}
}

package scheduler

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/sandboxhq/sandbox"
	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1/agentv1connect"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/scheduler/fsm"
	"github.com/sandboxhq/sandbox/scheduler/raftnode"
)

// fakeAgent answers AgentService with a fixed set of containers and records
// the commands it gets.
type fakeAgent struct {
	agentv1connect.UnimplementedAgentServiceHandler
	containers []*agentv1.Container

	mu       sync.Mutex
	started  []string
	stopped  []string
	executed []string
	fences   []uint64
	pools    [][]*agentv1.WarmPoolTarget
	// startErr, when set, fails StartSession.
	startErr error
}

func (f *fakeAgent) SetWarmPools(_ context.Context, req *connect.Request[agentv1.SetWarmPoolsRequest]) (*connect.Response[agentv1.SetWarmPoolsResponse], error) {
	f.mu.Lock()
	f.pools = append(f.pools, req.Msg.GetPools())
	f.mu.Unlock()
	return connect.NewResponse(&agentv1.SetWarmPoolsResponse{}), nil
}

func (f *fakeAgent) ListContainers(_ context.Context, req *connect.Request[agentv1.ListContainersRequest]) (*connect.Response[agentv1.ListContainersResponse], error) {
	f.mu.Lock()
	f.fences = append(f.fences, req.Msg.GetFence().GetTerm())
	f.mu.Unlock()
	return connect.NewResponse(&agentv1.ListContainersResponse{Containers: f.containers}), nil
}

func (f *fakeAgent) StartSession(_ context.Context, req *connect.Request[agentv1.StartSessionRequest]) (*connect.Response[agentv1.StartSessionResponse], error) {
	f.mu.Lock()
	f.started = append(f.started, req.Msg.GetSessionId())
	err := f.startErr
	f.mu.Unlock()
	if err != nil {
		return nil, err
	}
	return connect.NewResponse(&agentv1.StartSessionResponse{ContainerId: "c-" + req.Msg.GetSessionId()}), nil
}

func (f *fakeAgent) StopSession(_ context.Context, req *connect.Request[agentv1.StopSessionRequest]) (*connect.Response[agentv1.StopSessionResponse], error) {
	f.mu.Lock()
	f.stopped = append(f.stopped, req.Msg.GetSessionId())
	f.mu.Unlock()
	return connect.NewResponse(&agentv1.StopSessionResponse{}), nil
}

func (f *fakeAgent) Execute(_ context.Context, req *connect.Request[agentv1.ExecuteRequest]) (*connect.Response[agentv1.ExecuteResponse], error) {
	f.mu.Lock()
	f.executed = append(f.executed, req.Msg.GetExecutionId())
	f.mu.Unlock()
	return connect.NewResponse(&agentv1.ExecuteResponse{}), nil
}

// newTestScheduler is a one-server scheduler on an in-memory Raft transport.
func newTestScheduler(t *testing.T) (*Scheduler, *fsm.FSM) {
	t.Helper()
	f := fsm.New(nil)
	_, trans := raft.NewInmemTransport("")
	cfg := raftnode.DefaultConfig()
	cfg.ID, cfg.DataDir, cfg.Transport, cfg.Bootstrap = "test-1", t.TempDir(), trans, true
	node, err := raftnode.New(cfg, f)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { node.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := node.WaitForLeader(ctx); err != nil {
		t.Fatal(err)
	}
	scfg := DefaultConfig()
	scfg.ClusterToken = "test-cluster-token-0123456789"
	s := New(scfg, f, node)
	if err := s.bootstrap(ctx); err != nil {
		t.Fatal(err)
	}
	return s, f
}

func TestReconcileAgent(t *testing.T) {
	s, f := newTestScheduler(t)
	ctx := context.Background()
	old := timestamppb.New(time.Now().Add(-2 * s.cfg.StartTimeout))
	mustApply := func(typ fsm.MessageType, msg proto.Message) {
		t.Helper()
		if _, err := s.raft.Apply(ctx, typ, msg); err != nil {
			t.Fatalf("apply %v: %v", typ, err)
		}
	}
	session := func(id string, state sandboxv1.SessionState) *sandboxv1.Session {
		return &sandboxv1.Session{Id: id, TemplateId: "python-basic", State: state, AgentId: "a1", CreatedAt: old, LastActiveAt: old,
			ResourceLimits: limitsToProto(sandbox.DefaultLimits)}
	}

	agent := &fakeAgent{containers: []*agentv1.Container{
		{ContainerId: "c-kept", SessionId: "kept", Running: true, PendingExecutionIds: []string{"exe-pending", "exe-pending-recent"}},
		{ContainerId: "c-starting", SessionId: "starting-up", Running: true},
		{ContainerId: "c-orphan", SessionId: "orphan", Running: true},
	}}
	addr := serveFakeAgent(t, agent)

	mustApply(fsm.RegisterAgentType, &statev1.RegisterAgent{Agent: &statev1.Agent{Id: "a1", Address: addr, CpuMillis: 8000, MemoryMib: 8192, BootId: "b1", RegisteredAt: old}})
	for _, sess := range []*sandboxv1.Session{
		session("kept", sandboxv1.SessionState_SESSION_STATE_RUNNING),
		session("gone", sandboxv1.SessionState_SESSION_STATE_RUNNING),
		session("starting-up", sandboxv1.SessionState_SESSION_STATE_STARTING),
		session("never-started", sandboxv1.SessionState_SESSION_STATE_STARTING),
	} {
		mustApply(fsm.CreateSessionType, &statev1.CreateSession{Session: sess})
	}
	queuedAt := func(id, sess string, at *timestamppb.Timestamp) *statev1.CreateExecution {
		return &statev1.CreateExecution{Execution: &sandboxv1.Execution{Id: id, SessionId: sess, Language: "python", Code: "1",
			State: sandboxv1.ExecutionState_EXECUTION_STATE_QUEUED, TimeoutSeconds: 60, CreatedAt: at}}
	}
	queued := func(id, sess string) *statev1.CreateExecution { return queuedAt(id, sess, old) }
	// The agent holds both pending ones; the old one's hand-over (or its
	// status report) went astray, so it is handed over again.
	mustApply(fsm.CreateExecutionType, queued("exe-pending", "kept"))
	mustApply(fsm.CreateExecutionType, queuedAt("exe-pending-recent", "kept", timestamppb.New(time.Now().Add(-redispatchAfter))))
	mustApply(fsm.CreateExecutionType, queued("exe-never-handed", "kept"))
	mustApply(fsm.CreateExecutionType, queued("exe-of-gone", "gone"))

	a, _ := f.Agent("a1")
	if err := s.reconcileAgent(ctx, a); err != nil {
		t.Fatal(err)
	}

	wantSession := map[string]sandboxv1.SessionState{
		"kept":          sandboxv1.SessionState_SESSION_STATE_RUNNING,
		"gone":          sandboxv1.SessionState_SESSION_STATE_LOST,
		"starting-up":   sandboxv1.SessionState_SESSION_STATE_RUNNING,
		"never-started": sandboxv1.SessionState_SESSION_STATE_RUNNING, // the new leader starts it
	}
	for id, want := range wantSession {
		got, _ := f.Session(id)
		if got.GetState() != want {
			t.Errorf("session %s is %v, want %v (%s)", id, got.GetState(), want, got.GetStateReason())
		}
	}
	if got, _ := f.Session("starting-up"); got.GetContainerId() != "c-starting" {
		t.Errorf("starting-up container %q", got.GetContainerId())
	}
	if e, _ := f.Execution("exe-of-gone"); e.GetState() != sandboxv1.ExecutionState_EXECUTION_STATE_LOST {
		t.Errorf("execution of a gone container is %v", e.GetState())
	}
	agent.mu.Lock()
	defer agent.mu.Unlock()
	if !slices.Equal(agent.stopped, []string{"orphan"}) {
		t.Errorf("stopped %v, want only the orphan", agent.stopped)
	}
	if !slices.Equal(agent.started, []string{"never-started"}) {
		t.Errorf("started %v, want only the session a previous leader recorded but never started", agent.started)
	}
	slices.Sort(agent.executed)
	if !slices.Equal(agent.executed, []string{"exe-never-handed", "exe-pending"}) {
		t.Errorf("handed over again %v, want the execution the agent never got and the old pending one", agent.executed)
	}
	for _, id := range []string{"exe-never-handed", "exe-pending"} {
		if e, _ := f.Execution(id); e.GetState() != sandboxv1.ExecutionState_EXECUTION_STATE_RUNNING {
			t.Errorf("handed-over execution %s is %v, want RUNNING", id, e.GetState())
		}
	}
	if e, _ := f.Execution("exe-pending-recent"); e.GetState() != sandboxv1.ExecutionState_EXECUTION_STATE_QUEUED {
		t.Errorf("recent pending execution is %v, want QUEUED (not handed over yet)", e.GetState())
	}
	if len(agent.fences) == 0 || agent.fences[0] == 0 {
		t.Errorf("ListContainers carried no fence term: %v", agent.fences)
	}
}

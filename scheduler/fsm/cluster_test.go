package fsm

import (
	"context"
	"errors"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/sandboxhq/sandbox"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
)

const (
	nReady    = sandboxv1.NodeState_NODE_STATE_READY
	nDraining = sandboxv1.NodeState_NODE_STATE_DRAINING
	nLeft     = sandboxv1.NodeState_NODE_STATE_LEFT
	nDead     = sandboxv1.NodeState_NODE_STATE_DEAD
)

func registerAgent(id, address string, registered int64) cmd {
	return cmd{RegisterAgentType, &statev1.RegisterAgent{Agent: &statev1.Agent{
		Id: id, Address: address, CpuMillis: 4000, MemoryMib: 8192, RegisteredAt: ts(registered),
	}}}
}

func setAgentState(id string, state sandboxv1.NodeState, reason string, at int64) cmd {
	return cmd{SetAgentStateType, &statev1.SetAgentState{AgentId: id, State: state, Reason: reason, At: ts(at)}}
}

func registerServer(id, address string, voter bool) cmd {
	return cmd{RegisterServerType, &statev1.RegisterServer{Server: &sandboxv1.Server{
		Id: id, Address: address, ApiAddress: address + "-api", InternalAddress: address + "-internal",
		Voter: voter, Role: sandboxv1.ServerRole_SERVER_ROLE_LEADER,
	}}}
}

// createSessionKey creates a RUNNING session of template "custom" with an
// idempotency key.
func createSessionKey(id, tenant, key string, created int64) cmd {
	return cmd{CreateSessionType, &statev1.CreateSession{IdempotencyKey: key, Session: &sandboxv1.Session{
		Id: id, TemplateId: "custom", State: sRunning, CreatedAt: ts(created), Tenant: tenant,
	}}}
}

func createExecutionKey(id, session, tenant, key string, created int64) cmd {
	return cmd{CreateExecutionType, &statev1.CreateExecution{IdempotencyKey: key, Execution: &sandboxv1.Execution{
		Id: id, SessionId: session, Tenant: tenant, Language: "python", Code: "print(2)",
		State: eQueued, CreatedAt: ts(created),
	}}}
}

func purge(ids ...string) cmd {
	return cmd{PurgeSessionsType, &statev1.PurgeSessions{SessionIds: ids}}
}

// seededCluster returns seeded's FSM plus:
//   - agents "a2" (READY since 5), "drain" (DRAINING "maintenance" since 6),
//     "gone" (DEAD since 7), "left" (LEFT since 8)
//   - servers "srv1" (voter), "srv2" (non-voter)
//   - session "ks" (RUNNING, tenant t1, key "k1") with execution "ke"
//     (QUEUED, tenant t1, key "k1")
//   - session "ended" (TERMINATED, tenant t1, key "k2") with executions
//     "ended-done" (COMPLETED, key "k3") and "ended-q" (QUEUED, no key)
func seededCluster(t *testing.T) *FSM {
	t.Helper()
	f := seeded(t)
	mustApply(t, f,
		registerAgent("a2", "10.0.0.2:7400", 5),
		registerAgent("drain", "10.0.0.3:7400", 5), setAgentState("drain", nDraining, "maintenance", 6),
		registerAgent("gone", "10.0.0.4:7400", 5), setAgentState("gone", nDead, "mesh: dead", 7),
		registerAgent("left", "10.0.0.5:7400", 5), setAgentState("left", nLeft, "mesh: left", 8),
		registerServer("srv1", "10.0.1.1:7300", true),
		registerServer("srv2", "10.0.1.2:7300", false),
		createSessionKey("ks", "t1", "k1", 16),
		createExecutionKey("ke", "ks", "t1", "k1", 17),
		createSessionKey("ended", "t1", "k2", 18),
		createExecutionKey("ended-done", "ended", "t1", "k3", 19),
		finishExecution("ended-done", eCompleted, "out", 20),
		createExecution("ended-q", "ended", 21),
		updateSession("ended", sTerminating, 22),
		updateSession("ended", sTerminated, 23),
	)
	return f
}

// agentIs checks an agent's state fields.
func agentIs(t *testing.T, f *FSM, id string, state sandboxv1.NodeState, reason string, changedAt int64) {
	t.Helper()
	a, ok := f.Agent(id)
	if !ok {
		t.Fatalf("Agent(%s) missing", id)
	}
	if a.GetState() != state || a.GetStateReason() != reason || !proto.Equal(a.GetStateChangedAt(), ts(changedAt)) {
		t.Errorf("Agent(%s) state = %v %q at %v, want %v %q at %ds",
			id, a.GetState(), a.GetStateReason(), a.GetStateChangedAt(), state, reason, changedAt)
	}
}

// keyIs checks what an idempotency key names; want "" means nothing.
func keyIs(t *testing.T, f *FSM, kind, tenant, key, want string) {
	t.Helper()
	id, ok := f.IdempotentID(kind, tenant, key)
	if ok != (want != "") || id != want {
		t.Errorf("IdempotentID(%s, %s, %s) = %q, %v, want %q", kind, tenant, key, id, ok, want)
	}
}

func TestAgentStateRules(t *testing.T) {
	runRules(t, seededCluster, []ruleCase{
		{
			name: "register new agent becomes ready",
			cmd:  registerAgent("a9", "10.0.0.9:7400", 30),
			check: func(t *testing.T, f *FSM) {
				agentIs(t, f, "a9", nReady, "", 30)
			},
		},
		{
			name: "register ignores the state the command carries",
			cmd: cmd{RegisterAgentType, &statev1.RegisterAgent{Agent: &statev1.Agent{
				Id: "a9", State: nDraining, StateReason: "mine", StateChangedAt: ts(1), RegisteredAt: ts(31),
			}}},
			check: func(t *testing.T, f *FSM) {
				agentIs(t, f, "a9", nReady, "", 31)
			},
		},
		{
			name: "re-register dead agent becomes ready",
			cmd:  registerAgent("gone", "10.0.0.44:7400", 40),
			check: func(t *testing.T, f *FSM) {
				agentIs(t, f, "gone", nReady, "", 40)
				if a, _ := f.Agent("gone"); a.GetAddress() != "10.0.0.44:7400" || !proto.Equal(a.GetRegisteredAt(), ts(40)) {
					t.Errorf("Agent(gone) = %v", a)
				}
			},
		},
		{
			name: "re-register left agent becomes ready",
			cmd:  registerAgent("left", "10.0.0.5:7400", 41),
			check: func(t *testing.T, f *FSM) {
				agentIs(t, f, "left", nReady, "", 41)
			},
		},
		{
			name: "re-register draining agent stays draining",
			cmd:  registerAgent("drain", "10.0.0.33:7400", 42),
			check: func(t *testing.T, f *FSM) {
				agentIs(t, f, "drain", nDraining, "maintenance", 6)
				if a, _ := f.Agent("drain"); a.GetAddress() != "10.0.0.33:7400" || !proto.Equal(a.GetRegisteredAt(), ts(42)) {
					t.Errorf("Agent(drain) = %v, want the new address and registered_at", a)
				}
			},
		},
		{
			name: "re-register ready agent stays ready since its first registration",
			cmd:  registerAgent("a2", "10.0.0.22:7400", 43),
			check: func(t *testing.T, f *FSM) {
				agentIs(t, f, "a2", nReady, "", 5)
			},
		},
		{
			name: "set ready agent draining",
			cmd:  setAgentState("a2", nDraining, "operator", 50),
			check: func(t *testing.T, f *FSM) {
				agentIs(t, f, "a2", nDraining, "operator", 50)
				if a, _ := f.Agent("a2"); a.GetAddress() != "10.0.0.2:7400" || a.GetCpuMillis() != 4000 {
					t.Errorf("Agent(a2) lost its other fields: %v", a)
				}
			},
		},
		{
			name: "set draining agent dead",
			cmd:  setAgentState("drain", nDead, "mesh: dead", 51),
			check: func(t *testing.T, f *FSM) {
				agentIs(t, f, "drain", nDead, "mesh: dead", 51)
			},
		},
		{
			name: "set draining agent ready clears the reason",
			cmd:  setAgentState("drain", nReady, "", 52),
			check: func(t *testing.T, f *FSM) {
				agentIs(t, f, "drain", nReady, "", 52)
			},
		},
		{
			name: "set agent to the state it is in is a no-op",
			cmd:  setAgentState("drain", nDraining, "again", 53),
			same: true,
		},
		{
			name:    "set state of unknown agent",
			cmd:     setAgentState("nope", nDead, "", 54),
			wantErr: sandbox.ErrNotFound,
		},
		{
			name:    "set unspecified agent state",
			cmd:     setAgentState("a2", sandboxv1.NodeState_NODE_STATE_UNSPECIFIED, "", 55),
			wantErr: sandbox.ErrInvalidArgument,
		},
		{
			name:    "set unknown agent state value",
			cmd:     setAgentState("a2", sandboxv1.NodeState(99), "", 56),
			wantErr: sandbox.ErrInvalidArgument,
		},
	})
}

func TestServerRules(t *testing.T) {
	serverIDs := func(t *testing.T, f *FSM, want ...string) {
		t.Helper()
		var got []string
		for _, s := range f.Servers() {
			got = append(got, s.GetId())
		}
		if !equal(got, want) {
			t.Errorf("Servers() ids = %v, want %v", got, want)
		}
	}
	runRules(t, seededCluster, []ruleCase{
		{
			name: "register server stores it without its role",
			cmd:  registerServer("srv0", "10.0.1.0:7300", true),
			check: func(t *testing.T, f *FSM) {
				want := &sandboxv1.Server{
					Id: "srv0", Address: "10.0.1.0:7300", ApiAddress: "10.0.1.0:7300-api",
					InternalAddress: "10.0.1.0:7300-internal", Voter: true,
				}
				if s, ok := f.Server("srv0"); !ok || !proto.Equal(s, want) {
					t.Errorf("Server(srv0) = %v, %v, want %v", s, ok, want)
				}
				serverIDs(t, f, "srv0", "srv1", "srv2")
			},
		},
		{
			name: "register known server replaces it",
			cmd:  registerServer("srv1", "10.0.1.9:7300", false),
			check: func(t *testing.T, f *FSM) {
				if s, _ := f.Server("srv1"); s.GetAddress() != "10.0.1.9:7300" || s.GetVoter() {
					t.Errorf("Server(srv1) = %v", s)
				}
				serverIDs(t, f, "srv1", "srv2")
			},
		},
		{
			name:    "register server without id",
			cmd:     cmd{RegisterServerType, &statev1.RegisterServer{Server: &sandboxv1.Server{Address: "x"}}},
			wantErr: sandbox.ErrInvalidArgument,
		},
		{
			name:    "register no server",
			cmd:     cmd{RegisterServerType, &statev1.RegisterServer{}},
			wantErr: sandbox.ErrInvalidArgument,
		},
		{
			name: "deregister server",
			cmd:  cmd{DeregisterServerType, &statev1.DeregisterServer{ServerId: "srv1"}},
			check: func(t *testing.T, f *FSM) {
				if _, ok := f.Server("srv1"); ok {
					t.Error("Server(srv1) still there")
				}
				serverIDs(t, f, "srv2")
			},
		},
		{
			name: "deregister unknown server is a no-op",
			cmd:  cmd{DeregisterServerType, &statev1.DeregisterServer{ServerId: "nope"}},
			same: true,
		},
	})
}

func TestIdempotencyRules(t *testing.T) {
	runRules(t, seededCluster, []ruleCase{
		{
			name: "create session with a used key returns the existing one",
			cmd:  createSessionKey("ks2", "t1", "k1", 60),
			want: Existing{Kind: KindSession, ID: "ks"},
			same: true,
		},
		{
			name: "create session with a used key checks nothing else",
			cmd: cmd{CreateSessionType, &statev1.CreateSession{IdempotencyKey: "k1", Session: &sandboxv1.Session{
				Id: "run", TemplateId: "nope", Tenant: "t1",
			}}},
			want: Existing{Kind: KindSession, ID: "ks"},
			same: true,
		},
		{
			name: "create session with another tenant's key creates",
			cmd:  createSessionKey("ks2", "t2", "k1", 61),
			check: func(t *testing.T, f *FSM) {
				if _, ok := f.Session("ks2"); !ok {
					t.Error("Session(ks2) missing")
				}
				keyIs(t, f, KindSession, "t2", "k1", "ks2")
				keyIs(t, f, KindSession, "t1", "k1", "ks")
			},
		},
		{
			name: "create session with a new key records it",
			cmd:  createSessionKey("ks2", "t1", "k9", 62),
			check: func(t *testing.T, f *FSM) {
				keyIs(t, f, KindSession, "t1", "k9", "ks2")
				want := &statev1.IdempotencyRecord{Key: "session\x00t1\x00k9", Kind: KindSession, Id: "ks2", CreatedAt: ts(62)}
				var found bool
				for _, r := range f.State().GetIdempotency() {
					found = found || proto.Equal(r, want)
				}
				if !found {
					t.Errorf("no record %v in %v", want, f.State().GetIdempotency())
				}
			},
		},
		{
			name:    "create session with a new key and an existing id",
			cmd:     createSessionKey("run", "t1", "k9", 63),
			wantErr: sandbox.ErrAlreadyExists,
		},
		{
			name: "create session without a key records none",
			cmd:  createSession("plain", "custom", sPending, 64),
			check: func(t *testing.T, f *FSM) {
				if got := len(f.State().GetIdempotency()); got != 4 {
					t.Errorf("%d idempotency records, want the fixture's 4", got)
				}
			},
		},
		{
			name: "create execution with a used key returns the existing one",
			cmd:  createExecutionKey("ke2", "ks", "t1", "k1", 70),
			want: Existing{Kind: KindExecution, ID: "ke"},
			same: true,
		},
		{
			name: "create execution with a used key in an ended session returns the existing one",
			cmd:  createExecutionKey("x", "ended", "t1", "k3", 71),
			want: Existing{Kind: KindExecution, ID: "ended-done"},
			same: true,
		},
		{
			name: "create execution with another tenant's key creates",
			cmd:  createExecutionKey("ke2", "ks", "t2", "k1", 72),
			check: func(t *testing.T, f *FSM) {
				if _, ok := f.Execution("ke2"); !ok {
					t.Error("Execution(ke2) missing")
				}
				keyIs(t, f, KindExecution, "t2", "k1", "ke2")
				keyIs(t, f, KindExecution, "t1", "k1", "ke")
			},
		},
		{
			name: "a session's key is not an execution's",
			cmd:  createExecutionKey("ke2", "ks", "t1", "k2", 73),
			check: func(t *testing.T, f *FSM) {
				keyIs(t, f, KindExecution, "t1", "k2", "ke2")
				keyIs(t, f, KindSession, "t1", "k2", "ended")
			},
		},
		{
			name:    "create execution with a new key and an existing id",
			cmd:     createExecutionKey("q", "ks", "t1", "k9", 74),
			wantErr: sandbox.ErrAlreadyExists,
		},
		{
			name:    "create execution with a new key in a session that is not running",
			cmd:     createExecutionKey("ke2", "ended", "t1", "k9", 75),
			wantErr: sandbox.ErrFailedPrecondition,
		},
	})
}

func TestPurgeRules(t *testing.T) {
	runRules(t, seededCluster, []ruleCase{
		{
			name: "purge terminal session with its executions and keys",
			cmd:  purge("ended"),
			want: Purged{Sessions: 1, Executions: 2},
			check: func(t *testing.T, f *FSM) {
				if _, ok := f.Session("ended"); ok {
					t.Error("Session(ended) still there")
				}
				for _, id := range []string{"ended-done", "ended-q"} {
					if _, ok := f.Execution(id); ok {
						t.Errorf("Execution(%s) still there", id)
					}
				}
				if got := f.ExecutionsBySession("ended"); len(got) != 0 {
					t.Errorf("ExecutionsBySession(ended) = %v", got)
				}
				keyIs(t, f, KindSession, "t1", "k2", "")
				keyIs(t, f, KindExecution, "t1", "k3", "")
				keyIs(t, f, KindSession, "t1", "k1", "ks")
				keyIs(t, f, KindExecution, "t1", "k1", "ke")
				if got := len(f.State().GetIdempotency()); got != 2 {
					t.Errorf("%d idempotency records left, want 2", got)
				}
				// The key is free again.
				mustApply(t, f, createSessionKey("ended2", "t1", "k2", 90))
				keyIs(t, f, KindSession, "t1", "k2", "ended2")
			},
		},
		{
			name: "purge skips live and unknown sessions",
			cmd:  purge("run", "pend", "term", "ks", "nope"),
			want: Purged{},
			same: true,
		},
		{
			name: "purge a mixed batch with a duplicate",
			cmd:  purge("dead", "run", "ended", "ended"),
			want: Purged{Sessions: 2, Executions: 2},
			check: func(t *testing.T, f *FSM) {
				for _, id := range []string{"dead", "ended"} {
					if _, ok := f.Session(id); ok {
						t.Errorf("Session(%s) still there", id)
					}
				}
				if got := len(f.ExecutionsBySession("run")); got != 3 {
					t.Errorf("ExecutionsBySession(run) has %d, want 3", got)
				}
			},
		},
		{
			name: "purge nothing",
			cmd:  purge(),
			want: Purged{},
			same: true,
		},
	})
}

func TestPurgeWakesWaiters(t *testing.T) {
	f := seededCluster(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	errs := make(chan error, 2)
	go func() {
		_, err := f.WaitExecution(ctx, "ended-q", func(e *sandboxv1.Execution) bool {
			return sandbox.ExecutionState(e.GetState()).Terminal()
		})
		errs <- err
	}()
	go func() {
		_, err := f.WaitSession(ctx, "ended", func(*sandboxv1.Session) bool { return false })
		errs <- err
	}()
	deadline := time.Now().Add(5 * time.Second)
	for f.watchers() != 2 {
		if time.Now().After(deadline) {
			t.Fatalf("waiters did not register: %d watches", f.watchers())
		}
		time.Sleep(time.Millisecond)
	}
	if resp := apply(t, f, purge("ended")); resp != (Purged{Sessions: 1, Executions: 2}) {
		t.Fatalf("purge = %#v", resp)
	}
	for range 2 {
		if err := <-errs; !errors.Is(err, sandbox.ErrNotFound) {
			t.Errorf("wait after purge: %v, want ErrNotFound", err)
		}
	}
	waitWatchersGone(t, f)
}

func TestClusterReadsAreCopies(t *testing.T) {
	f := seededCluster(t)
	s, _ := f.Server("srv1")
	s.Address = "changed"
	f.Servers()[0].Address = "changed"
	if s2, _ := f.Server("srv1"); s2.GetAddress() != "10.0.1.1:7300" {
		t.Errorf("server changed through a copy: %v", s2)
	}
	if _, ok := f.Server("nope"); ok {
		t.Error("Server(nope) reported found")
	}
	keyIs(t, f, KindSession, "t1", "", "")
	keyIs(t, f, KindSession, "t1", "nope", "")
	keyIs(t, f, "other", "t1", "k1", "")
	for _, tc := range []struct {
		t    MessageType
		want string
	}{
		{SetAgentStateType, "SetAgentState"},
		{RegisterServerType, "RegisterServer"},
		{DeregisterServerType, "DeregisterServer"},
		{PurgeSessionsType, "PurgeSessions"},
	} {
		if got := tc.t.String(); got != tc.want {
			t.Errorf("MessageType(%d).String() = %q, want %q", uint8(tc.t), got, tc.want)
		}
	}
}

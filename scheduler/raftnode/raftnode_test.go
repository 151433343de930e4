package raftnode

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/sandboxhq/sandbox"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/scheduler/fsm"
)

// testConfig returns a config with short timeouts, as hashicorp/raft's own
// tests use, a little longer to stay calm under -race on 2 cores.
func testConfig(t *testing.T, id string) Config {
	cfg := DefaultConfig()
	cfg.ID = id
	cfg.DataDir = t.TempDir()
	cfg.HeartbeatTimeout = 100 * time.Millisecond
	cfg.ElectionTimeout = 100 * time.Millisecond
	cfg.LeaderLeaseTimeout = 50 * time.Millisecond
	cfg.CommitTimeout = 5 * time.Millisecond
	cfg.Logger = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	return cfg
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func ctxTimeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// commands returns a batch of commands that build sessions and executions
// with the given prefix.
func commands(prefix string) []struct {
	t   fsm.MessageType
	msg proto.Message
} {
	ts := timestamppb.New(time.Unix(1700000000, 0))
	sid, eid := prefix+"-s", prefix+"-e"
	return []struct {
		t   fsm.MessageType
		msg proto.Message
	}{
		{fsm.PutTemplateType, &statev1.PutTemplate{Template: &sandboxv1.Template{Id: "tp", Image: "img"}}},
		{fsm.RegisterAgentType, &statev1.RegisterAgent{Agent: &statev1.Agent{Id: prefix + "-agent", Address: "10.0.0.1:1"}}},
		{fsm.CreateSessionType, &statev1.CreateSession{Session: &sandboxv1.Session{
			Id: sid, TemplateId: "tp", State: sandboxv1.SessionState_SESSION_STATE_PENDING, CreatedAt: ts}}},
		{fsm.UpdateSessionType, &statev1.UpdateSession{SessionId: sid, State: sandboxv1.SessionState_SESSION_STATE_RUNNING, AgentId: prefix + "-agent", At: ts}},
		{fsm.CreateExecutionType, &statev1.CreateExecution{Execution: &sandboxv1.Execution{
			Id: eid, SessionId: sid, Code: "print(1)", State: sandboxv1.ExecutionState_EXECUTION_STATE_QUEUED, CreatedAt: ts}}},
		{fsm.UpdateExecutionType, &statev1.UpdateExecution{Execution: &sandboxv1.Execution{
			Id: eid, State: sandboxv1.ExecutionState_EXECUTION_STATE_COMPLETED, Stdout: "1\n", FinishedAt: ts}}},
	}
}

func applyAll(t *testing.T, n *Node, prefix string) {
	t.Helper()
	for _, c := range commands(prefix) {
		if _, err := n.Apply(ctxTimeout(t, 10*time.Second), c.t, c.msg); err != nil {
			t.Fatalf("Apply %v: %v", c.t, err)
		}
	}
}

func TestSingleNodeRestart(t *testing.T) {
	for _, snapshot := range []bool{false, true} {
		t.Run(fmt.Sprintf("snapshot=%v", snapshot), func(t *testing.T) {
			cfg := testConfig(t, "n1")
			cfg.BindAddr = freeAddr(t)
			cfg.Bootstrap = true
			// Keep raft from snapshotting on its own, so that the variant
			// without a snapshot really restores from the log alone.
			cfg.SnapshotInterval = time.Hour
			cfg.SnapshotThreshold = 1 << 40
			if snapshot {
				// Compact the log behind the forced snapshot, so that the
				// "a" commands can only come back from the snapshot.
				cfg.TrailingLogs = 1
			}

			f1 := fsm.New(nil)
			n1, err := New(cfg, f1)
			if err != nil {
				t.Fatalf("New: %v", err)
			}
			t.Cleanup(func() { n1.Close() })
			if err := n1.WaitForLeader(ctxTimeout(t, 20*time.Second)); err != nil {
				t.Fatal(err)
			}
			eventually(t, "n1 to lead", n1.IsLeader)

			applyAll(t, n1, "a")
			if snapshot {
				if err := n1.Raft().Snapshot().Error(); err != nil {
					t.Fatalf("Snapshot: %v", err)
				}
				if first, err := n1.store.FirstIndex(); err != nil || first <= 2 {
					t.Fatalf("log not compacted by the snapshot: first index %d, %v", first, err)
				}
			}
			applyAll(t, n1, "b")

			// The FSM's refusal comes back as Apply's error.
			_, err = n1.Apply(ctxTimeout(t, 10*time.Second), fsm.CreateSessionType,
				&statev1.CreateSession{Session: &sandboxv1.Session{Id: "a-s", TemplateId: "tp"}})
			if !errors.Is(err, sandbox.ErrAlreadyExists) {
				t.Fatalf("duplicate CreateSession: err = %v, want ErrAlreadyExists", err)
			}

			want := f1.State()
			if err := n1.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			if err := n1.Close(); err != nil {
				t.Fatalf("second Close: %v", err)
			}

			f2 := fsm.New(nil)
			n2, err := New(cfg, f2)
			if err != nil {
				t.Fatalf("New after restart: %v", err)
			}
			t.Cleanup(func() { n2.Close() })
			if err := n2.WaitForLeader(ctxTimeout(t, 20*time.Second)); err != nil {
				t.Fatal(err)
			}
			// Raft replays committed entries once the leader commits in its
			// new term, so poll.
			eventually(t, "the state to come back", func() bool { return proto.Equal(f2.State(), want) })
			if got := len(f2.ExecutionsBySession("b-s")); got != 1 {
				t.Errorf("ExecutionsBySession(b-s) after restart has %d, want 1", got)
			}
			applyAll(t, n2, "c")
		})
	}
}

type cluster struct {
	nodes      []*Node
	fsms       []*fsm.FSM
	transports []*raft.InmemTransport
}

func newCluster(t *testing.T, size int) *cluster {
	t.Helper()
	c := &cluster{}
	for i := range size {
		_, tr := raft.NewInmemTransportWithTimeout("", 500*time.Millisecond)
		c.transports = append(c.transports, tr)
		cfg := testConfig(t, fmt.Sprintf("n%d", i+1))
		cfg.Transport = tr
		cfg.Bootstrap = i == 0
		f := fsm.New(nil)
		n, err := New(cfg, f)
		if err != nil {
			t.Fatalf("New %s: %v", cfg.ID, err)
		}
		t.Cleanup(func() { n.Close() })
		c.nodes = append(c.nodes, n)
		c.fsms = append(c.fsms, f)
	}
	for _, a := range c.transports {
		for _, b := range c.transports {
			if a != b {
				a.Connect(b.LocalAddr(), b)
			}
		}
	}
	if err := c.nodes[0].WaitForLeader(ctxTimeout(t, 20*time.Second)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "n1 to lead", c.nodes[0].IsLeader)
	for _, n := range c.nodes[1:] {
		if err := c.nodes[0].AddVoter(ctxTimeout(t, 10*time.Second), n.ID(), n.Addr()); err != nil {
			t.Fatalf("AddVoter %s: %v", n.ID(), err)
		}
	}
	return c
}

func (c *cluster) leader(t *testing.T, among []int) int {
	t.Helper()
	leader := -1
	eventually(t, "a leader", func() bool {
		for _, i := range among {
			if c.nodes[i].IsLeader() {
				leader = i
				return true
			}
		}
		return false
	})
	return leader
}

func (c *cluster) converge(t *testing.T, among []int, leader int) {
	t.Helper()
	for _, i := range among {
		eventually(t, c.nodes[i].ID()+" to converge", func() bool {
			return proto.Equal(c.fsms[i].State(), c.fsms[leader].State())
		})
	}
}

func TestClusterReplicates(t *testing.T) {
	c := newCluster(t, 3)
	all := []int{0, 1, 2}
	leader := c.leader(t, all)

	applyAll(t, c.nodes[leader], "a")
	c.converge(t, all, leader)
	if s, ok := c.fsms[2].Session("a-s"); !ok || s.GetState() != sandboxv1.SessionState_SESSION_STATE_RUNNING {
		t.Fatalf("follower's Session(a-s) = %v, %v", s, ok)
	}

	follower := (leader + 1) % 3
	_, err := c.nodes[follower].Apply(ctxTimeout(t, 10*time.Second), fsm.PutTemplateType,
		&statev1.PutTemplate{Template: &sandboxv1.Template{Id: "x"}})
	if !errors.Is(err, sandbox.ErrUnavailable) || !errors.Is(err, raft.ErrNotLeader) {
		t.Fatalf("Apply on follower: err = %v, want ErrUnavailable and raft.ErrNotLeader", err)
	}
	if addr, id := c.nodes[follower].Leader(); id != c.nodes[leader].ID() || addr != c.nodes[leader].Addr() {
		t.Errorf("follower's Leader() = %q, %q; want %q, %q", addr, id, c.nodes[leader].Addr(), c.nodes[leader].ID())
	}

	// The leader goes away; the other two elect one and go on.
	if err := c.nodes[leader].Close(); err != nil {
		t.Fatalf("Close leader: %v", err)
	}
	for _, tr := range c.transports {
		tr.Disconnect(c.transports[leader].LocalAddr())
	}
	var rest []int
	for _, i := range all {
		if i != leader {
			rest = append(rest, i)
		}
	}
	newLeader := c.leader(t, rest)
	applyAll(t, c.nodes[newLeader], "b")
	c.converge(t, rest, newLeader)
	if got := len(c.fsms[rest[0]].Sessions(nil)); got != 2 {
		t.Errorf("sessions after failover: %d, want 2", got)
	}
}

func TestApplyHonoursContext(t *testing.T) {
	c := newCluster(t, 1)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := c.nodes[0].Apply(ctx, fsm.PutTemplateType, &statev1.PutTemplate{Template: &sandboxv1.Template{Id: "x"}})
	if !errors.Is(err, context.Canceled) {
		t.Errorf("Apply with canceled ctx: err = %v, want context.Canceled", err)
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	tests := []struct {
		name string
		edit func(*Config)
	}{
		{"missing id", func(c *Config) { c.ID = "" }},
		{"missing data dir", func(c *Config) { c.DataDir = "" }},
		{"lease longer than heartbeat", func(c *Config) { c.LeaderLeaseTimeout = time.Second }},
		{"bad advertise address", func(c *Config) { c.AdvertiseAddr = "not an address" }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig(t, "n1")
			cfg.BindAddr = "127.0.0.1:0"
			tc.edit(&cfg)
			n, err := New(cfg, fsm.New(nil))
			if err == nil {
				n.Close()
				t.Fatal("New succeeded")
			}
			if !errors.Is(err, sandbox.ErrInvalidArgument) {
				t.Errorf("err = %v, want ErrInvalidArgument", err)
			}
		})
	}
}

func TestDefaultConfigStarts(t *testing.T) {
	cfg := DefaultConfig()
	cfg.ID = "n1"
	cfg.DataDir = t.TempDir()
	cfg.BindAddr = "127.0.0.1:0" // advertise what the listener got
	cfg.Bootstrap = true
	cfg.Logger = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	n, err := New(cfg, fsm.New(nil))
	if err != nil {
		t.Fatalf("New with DefaultConfig: %v", err)
	}
	t.Cleanup(func() { n.Close() })
	if err := n.WaitForLeader(ctxTimeout(t, 30*time.Second)); err != nil {
		t.Fatal(err)
	}
	if addr, id := n.Leader(); id != "n1" || addr != n.Addr() {
		t.Errorf("Leader() = %q, %q; want %q, n1", addr, id, n.Addr())
	}
}

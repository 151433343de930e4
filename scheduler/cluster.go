package scheduler

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"sort"
	"time"

	"connectrpc.com/connect"
	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/api"
	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1/agentv1connect"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/internal/membership"
	"github.com/sandboxhq/sandbox/scheduler/fsm"
)

// leaderSetup runs once each time this server becomes the leader.
func (s *Scheduler) leaderSetup(ctx context.Context) error {
	if err := s.putServer(ctx, s.cfg.Self); err != nil {
		return err
	}
	if err := s.bootstrap(ctx); err != nil {
		return err
	}
	s.log.Info("leading", "server", s.cfg.Self.GetId(), "term", s.raft.Term())
	s.mu.Lock()
	clear(s.warmSent) // a new leader tells every agent its pools again
	s.mu.Unlock()
	s.reconcileAll(ctx)
	return nil
}

// recorded reports whether the replicated state holds this server's current
// addresses (a restored snapshot may hold another cluster's).
func (s *Scheduler) recorded() bool {
	cur, ok := s.fsm.Server(s.cfg.Self.GetId())
	return ok && cur.GetAddress() == s.cfg.Self.GetAddress() &&
		cur.GetApiAddress() == s.cfg.Self.GetApiAddress() && cur.GetInternalAddress() == s.cfg.Self.GetInternalAddress()
}

// putServer records a server's addresses unless they are recorded already.
func (s *Scheduler) putServer(ctx context.Context, srv *sandboxv1.Server) error {
	if cur, ok := s.fsm.Server(srv.GetId()); ok && cur.GetAddress() == srv.GetAddress() &&
		cur.GetApiAddress() == srv.GetApiAddress() && cur.GetInternalAddress() == srv.GetInternalAddress() {
		return nil
	}
	return s.apply(ctx, fsm.RegisterServerType, &statev1.RegisterServer{Server: srv})
}

// registerSelf, on a follower, asks the leader to record this server's
// addresses (and to add it as a voter, which is a no-op once it is one).
func (s *Scheduler) registerSelf(ctx context.Context) {
	if s.recorded() {
		return
	}
	target := s.leaderAddress(InternalPort)
	if target == "" {
		return
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := s.internalClient(target).AddServer(cctx, connect.NewRequest(&agentv1.AddServerRequest{Server: s.cfg.Self})); err != nil {
		s.log.Debug("registering with the leader", "leader", target, "err", err)
	}
}

func (s *Scheduler) internalClient(address string) agentv1connect.ControlPlaneServiceClient {
	return agentv1connect.NewControlPlaneServiceClient(s.agents.client, "http://"+address, api.WithBearer(s.cfg.ClusterToken))
}

// addServer adds a server as a voter and records its addresses. Leader only
// (the internal port forwards it there).
func (s *Scheduler) addServer(ctx context.Context, srv *sandboxv1.Server) error {
	if srv.GetId() == "" || srv.GetAddress() == "" {
		return fmt.Errorf("%w: a server needs an id and a Raft address", sandbox.ErrInvalidArgument)
	}
	if err := s.raft.AddVoter(ctx, srv.GetId(), srv.GetAddress()); err != nil {
		return err
	}
	srv = proto.Clone(srv).(*sandboxv1.Server)
	srv.Role = sandboxv1.ServerRole_SERVER_ROLE_UNSPECIFIED
	srv.Voter = true
	if err := s.putServer(ctx, srv); err != nil {
		return err
	}
	s.log.Info("server added", "server", srv.GetId(), "raft", srv.GetAddress())
	return nil
}

// JoinConfig says how a server without Raft state finds its cluster.
type JoinConfig struct {
	// Raft lets the join form a new cluster.
	Raft interface {
		HadState() bool
		BootstrapServers(voters map[string]string) error
	}
	// BootstrapExpect is the number of servers that form a new cluster
	// together; 0 means only join an existing one.
	BootstrapExpect int
	// Join lists other servers' internal addresses.
	Join []string
}

// Join makes a server without Raft state part of a cluster: it joins an
// existing cluster through any server that has state, or, once it has seen
// BootstrapExpect servers without state (itself included), bootstraps them
// all as voters. Every server of a new cluster does the same with the same
// set, which hashicorp/raft documents as safe. Join retries until it succeeds
// or ctx ends; a server that already has state returns at once.
func (s *Scheduler) Join(ctx context.Context, jc JoinConfig) error {
	if jc.Raft.HadState() {
		return nil
	}
	if jc.BootstrapExpect == 1 && len(jc.Join) == 0 {
		return jc.Raft.BootstrapServers(map[string]string{s.cfg.Self.GetId(): s.cfg.Self.GetAddress()})
	}
	if jc.BootstrapExpect == 0 && len(jc.Join) == 0 {
		s.log.Info("waiting to be added to a cluster (sandboxctl cluster join)", "internal", s.cfg.Self.GetInternalAddress())
		return nil
	}
	backoff := 100 * time.Millisecond
	for attempt := 1; ; attempt++ {
		done, err := s.tryJoin(ctx, jc)
		if done {
			return err
		}
		if attempt%20 == 0 {
			s.log.Info("still looking for the cluster", "join", jc.Join, "expect", jc.BootstrapExpect, "err", err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 2*time.Second)
	}
}

func (s *Scheduler) tryJoin(ctx context.Context, jc JoinConfig) (bool, error) {
	fresh := map[string]string{s.cfg.Self.GetId(): s.cfg.Self.GetAddress()}
	var lastErr error
	for _, addr := range jc.Join {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		info, err := s.internalClient(addr).GetServerInfo(cctx, connect.NewRequest(&agentv1.GetServerInfoRequest{}))
		cancel()
		if err != nil {
			lastErr = fmt.Errorf("server at %s: %w", addr, err)
			continue
		}
		if info.Msg.GetHasState() {
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			_, err := s.internalClient(addr).AddServer(cctx, connect.NewRequest(&agentv1.AddServerRequest{Server: s.cfg.Self}))
			cancel()
			if err != nil {
				lastErr = fmt.Errorf("joining through %s: %w", addr, err)
				continue
			}
			s.log.Info("joined the cluster", "through", addr)
			return true, nil
		}
		fresh[info.Msg.GetServer().GetId()] = info.Msg.GetServer().GetAddress()
	}
	if jc.BootstrapExpect > 0 && len(fresh) >= jc.BootstrapExpect {
		if len(fresh) > jc.BootstrapExpect {
			return true, fmt.Errorf("%w: found %d servers without state but --bootstrap-expect is %d", sandbox.ErrInvalidArgument, len(fresh), jc.BootstrapExpect)
		}
		return true, jc.Raft.BootstrapServers(fresh)
	}
	return false, lastErr
}

// ClusterStatus describes the servers, as this server sees them.
func (s *Scheduler) ClusterStatus(ctx context.Context) (*sandboxv1.GetClusterStatusResponse, error) {
	conf, err := s.raft.Servers()
	if err != nil {
		return nil, err
	}
	_, leaderID := s.raft.Leader()
	out := &sandboxv1.GetClusterStatusResponse{
		LeaderId:     leaderID,
		Term:         s.raft.Term(),
		CommitIndex:  s.raft.CommitIndex(),
		AppliedIndex: s.raft.AppliedIndex(),
		ServerId:     s.cfg.Self.GetId(),
	}
	for _, c := range conf {
		srv := &sandboxv1.Server{Id: string(c.ID), Address: string(c.Address), Voter: c.Suffrage == raft.Voter}
		if rec, ok := s.fsm.Server(srv.GetId()); ok {
			srv.ApiAddress = rec.GetApiAddress()
			srv.InternalAddress = rec.GetInternalAddress()
		}
		switch {
		case srv.GetId() == leaderID:
			srv.Role = sandboxv1.ServerRole_SERVER_ROLE_LEADER
		case !srv.GetVoter():
			srv.Role = sandboxv1.ServerRole_SERVER_ROLE_NONVOTER
		case leaderID != "":
			srv.Role = sandboxv1.ServerRole_SERVER_ROLE_FOLLOWER
		default:
			srv.Role = sandboxv1.ServerRole_SERVER_ROLE_UNKNOWN
		}
		out.Servers = append(out.Servers, srv)
	}
	sort.Slice(out.Servers, func(i, j int) bool { return out.Servers[i].GetId() < out.Servers[j].GetId() })
	return out, nil
}

// JoinServer adds the server whose internal port is at address.
func (s *Scheduler) JoinServer(ctx context.Context, address string) (*sandboxv1.Server, error) {
	if address == "" {
		return nil, fmt.Errorf("%w: address (the new server's internal host:port) is required", sandbox.ErrInvalidArgument)
	}
	info, err := s.internalClient(address).GetServerInfo(ctx, connect.NewRequest(&agentv1.GetServerInfoRequest{}))
	if err != nil {
		return nil, fmt.Errorf("%w: no server answers at %s: %v", sandbox.ErrFailedPrecondition, address, err)
	}
	srv := info.Msg.GetServer()
	if err := s.addServer(ctx, srv); err != nil {
		return nil, err
	}
	return srv, nil
}

// RemoveServer takes a server out of the Raft configuration.
func (s *Scheduler) RemoveServer(ctx context.Context, id string) error {
	if id == "" {
		return fmt.Errorf("%w: server_id is required", sandbox.ErrInvalidArgument)
	}
	conf, err := s.raft.Servers()
	if err != nil {
		return err
	}
	if !slices.ContainsFunc(conf, func(c raft.Server) bool { return string(c.ID) == id }) {
		return fmt.Errorf("%w: server %q is not in the cluster", sandbox.ErrNotFound, id)
	}
	if err := s.raft.RemoveServer(ctx, id); err != nil {
		return err
	}
	s.log.Info("server removed", "server", id)
	return s.apply(ctx, fsm.DeregisterServerType, &statev1.DeregisterServer{ServerId: id})
}

// ListNodes describes every agent the cluster knows, with what its live
// sessions hold (the FSM's allocation index) and the warm pools it advertises.
func (s *Scheduler) ListNodes(context.Context) ([]*sandboxv1.Node, error) {
	var mesh map[string]membership.Member
	if s.cfg.Mesh != nil {
		mesh = s.meshAgents()
	}
	var out []*sandboxv1.Node
	for _, a := range s.fsm.Agents() {
		cpu, mem, sessions := s.fsm.AgentUsage(a.GetId())
		n := &sandboxv1.Node{
			Id:             a.GetId(),
			Address:        a.GetAddress(),
			State:          a.GetState(),
			Capacity:       &sandboxv1.NodeResources{CpuMillis: a.GetCpuMillis(), MemoryMib: a.GetMemoryMib()},
			Allocated:      &sandboxv1.NodeResources{CpuMillis: int32(cpu), MemoryMib: mem},
			Sessions:       sessions,
			StateReason:    a.GetStateReason(),
			StateChangedAt: a.GetStateChangedAt(),
		}
		warm := mesh[a.GetId()].Meta.GetWarm()
		for _, tid := range slices.Sorted(maps.Keys(warm)) {
			n.WarmPools = append(n.WarmPools, &sandboxv1.WarmPool{TemplateId: tid, Ready: warm[tid]})
		}
		out = append(out, n)
	}
	return out, nil
}

// DrainNode stops placing sessions on an agent.
func (s *Scheduler) DrainNode(ctx context.Context, id string) (*sandboxv1.Node, error) {
	if id == "" {
		return nil, fmt.Errorf("%w: node_id is required", sandbox.ErrInvalidArgument)
	}
	if _, ok := s.fsm.Agent(id); !ok {
		return nil, fmt.Errorf("%w: node %q is not known", sandbox.ErrNotFound, id)
	}
	if err := s.apply(ctx, fsm.SetAgentStateType, &statev1.SetAgentState{
		AgentId: id, State: sandboxv1.NodeState_NODE_STATE_DRAINING, Reason: "drained by an operator", At: timestamppb.Now(),
	}); err != nil {
		return nil, err
	}
	nodes, err := s.ListNodes(ctx)
	if err != nil {
		return nil, err
	}
	for _, n := range nodes {
		if n.GetId() == id {
			return n, nil
		}
	}
	return nil, fmt.Errorf("%w: node %q vanished", sandbox.ErrNotFound, id)
}

// SaveSnapshot takes a snapshot of the replicated state and streams it.
func (s *Scheduler) SaveSnapshot(ctx context.Context, send func([]byte) error) error {
	rc, err := s.raft.Snapshot()
	if err != nil {
		return err
	}
	defer rc.Close()
	buf := make([]byte, 64<<10)
	for {
		n, err := rc.Read(buf)
		if n > 0 {
			if serr := send(buf[:n]); serr != nil {
				return serr
			}
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// RestoreSnapshot replaces the replicated state with a saved snapshot, after
// checking that it is one.
func (s *Scheduler) RestoreSnapshot(ctx context.Context, data []byte) error {
	var snap statev1.Snapshot
	if err := proto.Unmarshal(data, &snap); err != nil || len(data) == 0 {
		return fmt.Errorf("%w: the data is not a snapshot saved by this platform", sandbox.ErrInvalidArgument)
	}
	if err := s.raft.Restore(ctx, bytes.NewReader(data), int64(len(data))); err != nil {
		return err
	}
	s.log.Warn("state restored from a snapshot", "templates", len(snap.GetTemplates()), "sessions", len(snap.GetSessions()), "executions", len(snap.GetExecutions()))
	return nil
}

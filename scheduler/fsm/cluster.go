package fsm

import (
	"fmt"
	"maps"
	"slices"

	"google.golang.org/protobuf/proto"

	"github.com/sandboxhq/sandbox"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
)

// registerAgent upserts an agent. The FSM, not the registering agent, owns
// the state: a registration brings a gone agent back to READY but does not
// end a drain that an operator asked for.
func (f *FSM) registerAgent(m *statev1.RegisterAgent) any {
	a := m.GetAgent()
	if a.GetId() == "" {
		return fmt.Errorf("%w: register agent: missing agent id", sandbox.ErrInvalidArgument)
	}
	cur, ok := f.agents[a.GetId()]
	switch st := cur.GetState(); {
	case ok && (st == sandboxv1.NodeState_NODE_STATE_READY || st == sandboxv1.NodeState_NODE_STATE_DRAINING):
		a.State = st
		a.StateReason = cur.GetStateReason()
		a.StateChangedAt = cur.GetStateChangedAt()
	default:
		// New, DEAD, LEFT, or stored before agents had a state.
		a.State = sandboxv1.NodeState_NODE_STATE_READY
		a.StateReason = ""
		a.StateChangedAt = a.GetRegisteredAt()
	}
	f.storeAgent(a)
	return nil
}

func (f *FSM) setAgentState(m *statev1.SetAgentState) any {
	id, to := m.GetAgentId(), m.GetState()
	if _, known := sandboxv1.NodeState_name[int32(to)]; !known || to == sandboxv1.NodeState_NODE_STATE_UNSPECIFIED {
		return fmt.Errorf("%w: set state of agent %q: invalid state %v", sandbox.ErrInvalidArgument, id, to)
	}
	cur, ok := f.agents[id]
	if !ok {
		return fmt.Errorf("%w: agent %q", sandbox.ErrNotFound, id)
	}
	if cur.GetState() == to {
		return nil
	}
	a := proto.CloneOf(cur)
	a.State = to
	a.StateReason = m.GetReason()
	a.StateChangedAt = m.GetAt()
	f.storeAgent(a)
	return nil
}

func (f *FSM) registerServer(m *statev1.RegisterServer) any {
	s := m.GetServer()
	if s.GetId() == "" {
		return fmt.Errorf("%w: register server: missing server id", sandbox.ErrInvalidArgument)
	}
	// Only what is replicated: the role is each server's own view of Raft.
	f.servers[s.GetId()] = &sandboxv1.Server{
		Id:              s.GetId(),
		Address:         s.GetAddress(),
		ApiAddress:      s.GetApiAddress(),
		InternalAddress: s.GetInternalAddress(),
		Voter:           s.GetVoter(),
	}
	return nil
}

func (f *FSM) deregisterServer(m *statev1.DeregisterServer) any {
	delete(f.servers, m.GetServerId())
	return nil
}

// Server returns a copy of the server with the given id. Its role is unset:
// the FSM does not hold roles.
func (f *FSM) Server(id string) (*sandboxv1.Server, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	s, ok := f.servers[id]
	if !ok {
		return nil, false
	}
	return proto.CloneOf(s), true
}

// Servers returns copies of all registered servers, sorted by id.
func (f *FSM) Servers() []*sandboxv1.Server {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := make([]*sandboxv1.Server, 0, len(f.servers))
	for _, id := range slices.Sorted(maps.Keys(f.servers)) {
		out = append(out, proto.CloneOf(f.servers[id]))
	}
	return out
}

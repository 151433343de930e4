// Package fsm is the scheduler's replicated state machine: the templates,
// sessions, executions, agents, servers and idempotency keys every server
// holds, and the rules that change them. It implements raft.FSM; every change
// arrives as a committed Raft log entry and is applied in the same order on
// every server.
//
// # Command encoding
//
// A command is one byte of MessageType followed by the protobuf encoding of
// the matching sandbox.state.v1 message (see Encode). Types are append-only:
// a number once shipped keeps its meaning forever. A type this binary does
// not know makes Apply panic, because a server that skipped a command would
// silently diverge from the others; a newer server that adds a command every
// older server may safely skip sets IgnoreUnknownTypeFlag on its type, and
// older servers then log and ignore it. A payload that does not decode also
// panics, for the same reason.
//
// # Rules
//
// Business rules are checked in Apply, on the committed command, so that
// every server reaches the same verdict. A refused command changes nothing and
// its error is the apply response (an error wrapping sandbox.ErrNotFound,
// ErrAlreadyExists, ErrFailedPrecondition or ErrInvalidArgument), which
// raftnode.Node.Apply turns back into the returned error. A successful command
// responds nil, except where a rule below names another value (Existing,
// Purged); those are values, not errors.
//
//   - PutTemplate upserts a template by id. CreateTemplate adds one and
//     refuses an existing id, so concurrent creates cannot both succeed. DeleteTemplate refuses a missing
//     template, a built-in one, and one that a live session still uses.
//   - CreateSession refuses an existing id and a missing template, and
//     (ErrResourceExhausted) a live session that would take its registered
//     agent over the agent's cpu or memory capacity, counting what the live
//     sessions already placed there hold (see ForEachAgent). So concurrent
//     placements can never both take an agent's last room. A session on an
//     agent the state does not know is not checked.
//     With an idempotency key, see Idempotency below.
//   - UpdateSession moves a session along sandbox.SessionState.CanTransition;
//     the same state again is a successful no-op that still records a given
//     agent, container and reason. A terminal state sets ended_at.
//   - CreateExecution refuses an existing id and needs its session to exist
//     and be RUNNING; it marks the session active at the execution's created_at.
//     With an idempotency key, see Idempotency below.
//   - UpdateExecution moves an execution along
//     sandbox.ExecutionState.CanTransition and, on a terminal state, records
//     its result and marks the session active at finished_at. Terminal states
//     are final, so a late or duplicate report with another state is refused
//     with ErrFailedPrecondition and one with the same state is a no-op.
//   - RegisterAgent upserts an agent by id and manages its state (the
//     command's own state fields are ignored): a new agent, or one that is
//     DEAD, LEFT or has no state yet, becomes READY with state_changed_at =
//     registered_at and no reason; a READY or DRAINING agent keeps its state,
//     reason and state_changed_at.
//   - SetAgentState refuses an UNSPECIFIED or unknown state
//     (ErrInvalidArgument) and an unknown agent (ErrNotFound); the same state
//     again is a no-op; otherwise it records state, reason and
//     state_changed_at = at.
//   - RegisterServer upserts a server's addresses and voter flag by id,
//     refusing an empty id; the role is not stored, since it is not
//     replicated state (Raft knows it). DeregisterServer deletes a server; an
//     unknown id is a successful no-op.
//   - PurgeSessions deletes each listed session that exists and is terminal,
//     with all its executions and the idempotency records of all of them;
//     it skips (and logs at debug) an unknown or non-terminal id. Waiters on
//     deleted records wake and get ErrNotFound. It responds Purged with the
//     counts.
//
// # Idempotency
//
// A CreateSession or CreateExecution with a non-empty idempotency key is
// scoped by the record's kind and tenant (the session's or the execution's
// tenant field): the same key from another tenant, or for the other kind, is
// another key. If the scoped key already names a record, the command creates
// nothing, checks nothing else, and responds Existing with that record's id.
// Otherwise the command runs its usual rules (an existing id is still
// ErrAlreadyExists) and, on success, records the key with the id and the
// record's created_at. A key lives as long as its record: PurgeSessions drops
// it.
//
// Every timestamp comes from the command, never from the clock of the server
// applying it, so that all servers hold identical state.
//
// # Concurrency
//
// Records are copy-on-write: Apply never modifies a stored message, it stores
// a modified clone. Reads return clones, so callers may keep and modify what
// they get, and a snapshot can share the stored messages with no copy.
// WaitExecution and WaitSession block on per-record channels that every
// change to that record closes, so waiting never polls.
package fsm

import (
	"cmp"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"slices"
	"sync"

	"github.com/google/btree"
	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/sandboxhq/sandbox"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
)

// MessageType is the first byte of every command and says which
// sandbox.state.v1 message follows. Values are append-only.
type MessageType uint8

// Command types. Never renumber or reuse one.
const (
	PutTemplateType      MessageType = 1
	DeleteTemplateType   MessageType = 2
	CreateSessionType    MessageType = 3
	UpdateSessionType    MessageType = 4
	CreateExecutionType  MessageType = 5
	UpdateExecutionType  MessageType = 6
	RegisterAgentType    MessageType = 7
	SetAgentStateType    MessageType = 8
	RegisterServerType   MessageType = 9
	DeregisterServerType MessageType = 10
	PurgeSessionsType    MessageType = 11
	CreateTemplateType   MessageType = 12
	UpdateTemplateType   MessageType = 13
)

// IgnoreUnknownTypeFlag marks a command type that a server which does not
// know it may skip. Without the flag an unknown type makes Apply panic.
const IgnoreUnknownTypeFlag MessageType = 128

var typeNames = map[MessageType]string{
	PutTemplateType:      "PutTemplate",
	DeleteTemplateType:   "DeleteTemplate",
	CreateSessionType:    "CreateSession",
	UpdateSessionType:    "UpdateSession",
	CreateExecutionType:  "CreateExecution",
	UpdateExecutionType:  "UpdateExecution",
	RegisterAgentType:    "RegisterAgent",
	SetAgentStateType:    "SetAgentState",
	RegisterServerType:   "RegisterServer",
	DeregisterServerType: "DeregisterServer",
	PurgeSessionsType:    "PurgeSessions",
	CreateTemplateType:   "CreateTemplate",
	UpdateTemplateType:   "UpdateTemplate",
}

func (t MessageType) String() string {
	if n, ok := typeNames[t]; ok {
		return n
	}
	return fmt.Sprintf("MessageType(%d)", uint8(t))
}

// Encode returns the command of type t carrying msg.
func Encode(t MessageType, msg proto.Message) ([]byte, error) {
	b, err := proto.MarshalOptions{Deterministic: true}.MarshalAppend([]byte{byte(t)}, msg)
	if err != nil {
		return nil, fmt.Errorf("encode %v command: %w", t, err)
	}
	return b, nil
}

// FSM is the replicated state. It implements raft.FSM; its read methods are
// safe to call concurrently with Apply.
type FSM struct {
	logger *slog.Logger

	mu         sync.RWMutex
	templates  map[string]*sandboxv1.Template
	sessions   map[string]*sandboxv1.Session
	executions map[string]*sandboxv1.Execution
	// bySession indexes execution ids by session id.
	bySession map[string]map[string]struct{}
	agents    map[string]*statev1.Agent
	servers   map[string]*sandboxv1.Server
	// agentList holds every registered agent with what its live sessions
	// hold, densely, for placement to scan (see alloc.go); agentPos indexes
	// it by agent id; orphans holds what live sessions hold on agent ids
	// not registered (yet).
	orphans   map[string]*usage
	agentList []agentSlot
	agentPos  map[string]int
	// fit orders the READY agents by what they have free (see fitKey), so
	// that placement finds the best fit without scanning every agent.
	fit *btree.BTreeG[fitKey]
	// idempotency holds the records by scoped key (see idempotencyKey), and
	// idempotencyOf indexes the scoped key by the record it names (see
	// recordKey), so that a purge finds them without a scan.
	idempotency   map[string]*statev1.IdempotencyRecord
	idempotencyOf map[string]string

	// watchMu guards the watch maps. Lock order: mu, then watchMu.
	watchMu        sync.Mutex
	sessionWatch   map[string]*watch
	executionWatch map[string]*watch
}

// watch is closed when its record changes; waiters count who still holds it,
// so that the last one to give up removes it.
type watch struct {
	ch      chan struct{}
	waiters int
}

var _ raft.FSM = (*FSM)(nil)

// New returns an empty state machine. A nil logger discards.
func New(logger *slog.Logger) *FSM {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	f := &FSM{
		logger:         logger,
		sessionWatch:   make(map[string]*watch),
		executionWatch: make(map[string]*watch),
	}
	f.reset()
	return f
}

func (f *FSM) reset() {
	f.templates = make(map[string]*sandboxv1.Template)
	f.sessions = make(map[string]*sandboxv1.Session)
	f.executions = make(map[string]*sandboxv1.Execution)
	f.bySession = make(map[string]map[string]struct{})
	f.agents = make(map[string]*statev1.Agent)
	f.servers = make(map[string]*sandboxv1.Server)
	f.orphans = make(map[string]*usage)
	f.agentList = nil
	f.agentPos = make(map[string]int)
	f.fit = btree.NewG(32, fitKey.less)
	f.idempotency = make(map[string]*statev1.IdempotencyRecord)
	f.idempotencyOf = make(map[string]string)
}

// Apply applies one committed command. It returns nil on success (or the
// Existing or Purged value the rules name), or an error wrapping a domain
// error when the rules refuse the command; it panics on a
// command it cannot decode or an unknown type without IgnoreUnknownTypeFlag.
func (f *FSM) Apply(l *raft.Log) any {
	if len(l.Data) == 0 {
		panic(fmt.Sprintf("fsm: empty command at index %d", l.Index))
	}
	t, payload := MessageType(l.Data[0]), l.Data[1:]
	// The flag only matters to servers that do not know the type: a known
	// type is applied with or without it.
	ignorable := t&IgnoreUnknownTypeFlag != 0
	t &^= IgnoreUnknownTypeFlag

	var msg proto.Message
	switch t {
	case PutTemplateType:
		msg = &statev1.PutTemplate{}
	case DeleteTemplateType:
		msg = &statev1.DeleteTemplate{}
	case CreateSessionType:
		msg = &statev1.CreateSession{}
	case UpdateSessionType:
		msg = &statev1.UpdateSession{}
	case CreateExecutionType:
		msg = &statev1.CreateExecution{}
	case UpdateExecutionType:
		msg = &statev1.UpdateExecution{}
	case RegisterAgentType:
		msg = &statev1.RegisterAgent{}
	case SetAgentStateType:
		msg = &statev1.SetAgentState{}
	case RegisterServerType:
		msg = &statev1.RegisterServer{}
	case DeregisterServerType:
		msg = &statev1.DeregisterServer{}
	case PurgeSessionsType:
		msg = &statev1.PurgeSessions{}
	case CreateTemplateType:
		msg = &statev1.CreateTemplate{}
	case UpdateTemplateType:
		msg = &statev1.UpdateTemplate{}
	default:
		if ignorable {
			f.logger.Warn("ignoring unknown command type", "type", uint8(t), "index", l.Index)
			return nil
		}
		panic(fmt.Sprintf("fsm: unknown command type %d at index %d", uint8(t), l.Index))
	}
	if err := proto.Unmarshal(payload, msg); err != nil {
		panic(fmt.Sprintf("fsm: decode %v command at index %d: %v", t, l.Index, err))
	}

	f.mu.Lock()
	defer f.mu.Unlock()
	switch m := msg.(type) {
	case *statev1.PutTemplate:
		return f.putTemplate(m)
	case *statev1.CreateTemplate:
		return f.createTemplate(m)
	case *statev1.UpdateTemplate:
		return f.updateTemplate(m)
	case *statev1.DeleteTemplate:
		return f.deleteTemplate(m)
	case *statev1.CreateSession:
		return f.createSession(m)
	case *statev1.UpdateSession:
		return f.updateSession(m)
	case *statev1.CreateExecution:
		return f.createExecution(m)
	case *statev1.UpdateExecution:
		return f.updateExecution(m)
	case *statev1.RegisterAgent:
		return f.registerAgent(m)
	case *statev1.SetAgentState:
		return f.setAgentState(m)
	case *statev1.RegisterServer:
		return f.registerServer(m)
	case *statev1.DeregisterServer:
		return f.deregisterServer(m)
	case *statev1.PurgeSessions:
		return f.purgeSessions(m)
	}
	panic(fmt.Sprintf("fsm: no handler for %v", t))
}

// The apply helpers run with mu held for writing and return Apply's
// response: nil, an Existing or Purged value, or an error.

func (f *FSM) putTemplate(m *statev1.PutTemplate) any {
	t := m.GetTemplate()
	if t.GetId() == "" {
		return fmt.Errorf("%w: put template: missing template id", sandbox.ErrInvalidArgument)
	}
	f.templates[t.GetId()] = t
	return nil
}

func (f *FSM) createTemplate(m *statev1.CreateTemplate) any {
	t := m.GetTemplate()
	if t.GetId() == "" {
		return fmt.Errorf("%w: create template: missing template id", sandbox.ErrInvalidArgument)
	}
	if _, ok := f.templates[t.GetId()]; ok {
		return fmt.Errorf("%w: template %q already exists", sandbox.ErrAlreadyExists, t.GetId())
	}
	f.templates[t.GetId()] = t
	return nil
}

func (f *FSM) updateTemplate(m *statev1.UpdateTemplate) any {
	cur, ok := f.templates[m.GetTemplateId()]
	if !ok {
		return fmt.Errorf("%w: template %q", sandbox.ErrNotFound, m.GetTemplateId())
	}
	if m.WarmPoolSize != nil && m.GetWarmPoolSize() < 0 {
		return fmt.Errorf("%w: template %q: warm_pool_size must not be negative", sandbox.ErrInvalidArgument, cur.GetId())
	}
	t := proto.CloneOf(cur)
	if m.WarmPoolSize != nil {
		t.WarmPoolSize = m.GetWarmPoolSize()
	}
	f.templates[t.GetId()] = t
	return nil
}

func (f *FSM) deleteTemplate(m *statev1.DeleteTemplate) any {
	id := m.GetTemplateId()
	t, ok := f.templates[id]
	if !ok {
		return fmt.Errorf("%w: template %q", sandbox.ErrNotFound, id)
	}
	if t.GetBuiltin() {
		return fmt.Errorf("%w: template %q is built in and cannot be deleted", sandbox.ErrFailedPrecondition, id)
	}
	for _, s := range f.sessions {
		if s.GetTemplateId() == id && sandbox.SessionState(s.GetState()).Live() {
			return fmt.Errorf("%w: template %q is used by live session %q", sandbox.ErrFailedPrecondition, id, s.GetId())
		}
	}
	delete(f.templates, id)
	return nil
}

func (f *FSM) createSession(m *statev1.CreateSession) any {
	s := m.GetSession()
	ikey := idempotencyKey(KindSession, s.GetTenant(), m.GetIdempotencyKey())
	if r, ok := f.idempotency[ikey]; ok {
		return Existing{Kind: KindSession, ID: r.GetId()}
	}
	id := s.GetId()
	if id == "" {
		return fmt.Errorf("%w: create session: missing session id", sandbox.ErrInvalidArgument)
	}
	if _, ok := f.sessions[id]; ok {
		return fmt.Errorf("%w: session %q", sandbox.ErrAlreadyExists, id)
	}
	if _, ok := f.templates[s.GetTemplateId()]; !ok {
		return fmt.Errorf("%w: template %q for session %q", sandbox.ErrNotFound, s.GetTemplateId(), id)
	}
	if err := f.checkRoom(s); err != nil {
		return err
	}
	// The decoded message belongs to this call alone, so storing it is
	// storing a private copy.
	f.sessions[id] = s
	f.account(s, 1)
	f.remember(ikey, KindSession, id, s.GetCreatedAt())
	f.notifySession(id)
	return nil
}

func (f *FSM) updateSession(m *statev1.UpdateSession) any {
	id := m.GetSessionId()
	cur, ok := f.sessions[id]
	if !ok {
		return fmt.Errorf("%w: session %q", sandbox.ErrNotFound, id)
	}
	from, to := sandbox.SessionState(cur.GetState()), sandbox.SessionState(m.GetState())
	if from != to && !from.CanTransition(to) {
		return fmt.Errorf("%w: session %q is %v, cannot become %v", sandbox.ErrFailedPrecondition, id, from, to)
	}
	s := proto.CloneOf(cur)
	if from != to {
		s.State = m.GetState()
		if to.Terminal() {
			s.EndedAt = m.GetAt()
		}
	}
	if m.GetReason() != "" {
		s.StateReason = m.GetReason()
	}
	if m.GetAgentId() != "" {
		s.AgentId = m.GetAgentId()
	}
	if m.GetContainerId() != "" {
		s.ContainerId = m.GetContainerId()
	}
	if proto.Equal(s, cur) {
		return nil
	}
	f.account(cur, -1)
	f.account(s, 1)
	f.sessions[id] = s
	f.notifySession(id)
	return nil
}

func (f *FSM) createExecution(m *statev1.CreateExecution) any {
	e := m.GetExecution()
	ikey := idempotencyKey(KindExecution, e.GetTenant(), m.GetIdempotencyKey())
	if r, ok := f.idempotency[ikey]; ok {
		return Existing{Kind: KindExecution, ID: r.GetId()}
	}
	id := e.GetId()
	if id == "" {
		return fmt.Errorf("%w: create execution: missing execution id", sandbox.ErrInvalidArgument)
	}
	if _, ok := f.executions[id]; ok {
		return fmt.Errorf("%w: execution %q", sandbox.ErrAlreadyExists, id)
	}
	sid := e.GetSessionId()
	s, ok := f.sessions[sid]
	if !ok {
		return fmt.Errorf("%w: session %q for execution %q", sandbox.ErrNotFound, sid, id)
	}
	if st := sandbox.SessionState(s.GetState()); st != sandbox.SessionRunning {
		return fmt.Errorf("%w: session %q is %v, not RUNNING: cannot run execution %q", sandbox.ErrFailedPrecondition, sid, st, id)
	}
	f.executions[id] = e
	idx := f.bySession[sid]
	if idx == nil {
		idx = make(map[string]struct{})
		f.bySession[sid] = idx
	}
	idx[id] = struct{}{}
	f.remember(ikey, KindExecution, id, e.GetCreatedAt())
	f.touchSession(sid, e.GetCreatedAt())
	f.notifyExecution(id)
	return nil
}

func (f *FSM) updateExecution(m *statev1.UpdateExecution) any {
	u := m.GetExecution()
	id := u.GetId()
	cur, ok := f.executions[id]
	if !ok {
		return fmt.Errorf("%w: execution %q", sandbox.ErrNotFound, id)
	}
	from, to := sandbox.ExecutionState(cur.GetState()), sandbox.ExecutionState(u.GetState())
	if from == to {
		return nil
	}
	if !from.CanTransition(to) {
		return fmt.Errorf("%w: execution %q is %v, cannot become %v", sandbox.ErrFailedPrecondition, id, from, to)
	}
	e := proto.CloneOf(cur)
	e.State = u.GetState()
	if u.GetStateReason() != "" {
		e.StateReason = u.GetStateReason()
	}
	if to.Terminal() {
		e.ExitCode = u.GetExitCode()
		e.Stdout = u.GetStdout()
		e.Stderr = u.GetStderr()
		e.StdoutTruncated = u.GetStdoutTruncated()
		e.StderrTruncated = u.GetStderrTruncated()
		e.DurationMs = u.GetDurationMs()
		e.Artifacts = u.GetArtifacts()
		e.FinishedAt = u.GetFinishedAt()
		f.touchSession(e.GetSessionId(), u.GetFinishedAt())
	}
	f.executions[id] = e
	f.notifyExecution(id)
	return nil
}

// touchSession records activity on a session at a time taken from a command.
func (f *FSM) touchSession(id string, at *timestamppb.Timestamp) {
	s, ok := f.sessions[id]
	if !ok || at == nil {
		return
	}
	s = proto.CloneOf(s)
	s.LastActiveAt = at
	f.sessions[id] = s
	f.notifySession(id)
}

// Template returns a copy of the template with the given id.
func (f *FSM) Template(id string) (*sandboxv1.Template, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	t, ok := f.templates[id]
	if !ok {
		return nil, false
	}
	return proto.CloneOf(t), true
}

// Templates returns copies of all templates, sorted by id.
func (f *FSM) Templates() []*sandboxv1.Template {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := make([]*sandboxv1.Template, 0, len(f.templates))
	for _, id := range slices.Sorted(maps.Keys(f.templates)) {
		out = append(out, proto.CloneOf(f.templates[id]))
	}
	return out
}

// Session returns a copy of the session with the given id.
func (f *FSM) Session(id string) (*sandboxv1.Session, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	s, ok := f.sessions[id]
	if !ok {
		return nil, false
	}
	return proto.CloneOf(s), true
}

// Sessions returns copies of the sessions for which filter returns true (all
// of them when filter is nil), sorted by created_at, then id. filter sees the
// stored record under the FSM's read lock: it must neither modify nor keep it,
// nor call back into the FSM.
func (f *FSM) Sessions(filter func(*sandboxv1.Session) bool) []*sandboxv1.Session {
	f.mu.RLock()
	defer f.mu.RUnlock()
	var out []*sandboxv1.Session
	for _, s := range f.sessions {
		if filter == nil || filter(s) {
			out = append(out, proto.CloneOf(s))
		}
	}
	slices.SortFunc(out, func(a, b *sandboxv1.Session) int {
		return cmp.Or(compareTime(a.GetCreatedAt(), b.GetCreatedAt()), cmp.Compare(a.GetId(), b.GetId()))
	})
	return out
}

// Execution returns a copy of the execution with the given id.
func (f *FSM) Execution(id string) (*sandboxv1.Execution, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	e, ok := f.executions[id]
	if !ok {
		return nil, false
	}
	return proto.CloneOf(e), true
}

// ExecutionsBySession returns copies of a session's executions, sorted by
// created_at, then id.
func (f *FSM) ExecutionsBySession(sessionID string) []*sandboxv1.Execution {
	f.mu.RLock()
	defer f.mu.RUnlock()
	idx := f.bySession[sessionID]
	out := make([]*sandboxv1.Execution, 0, len(idx))
	for id := range idx {
		out = append(out, proto.CloneOf(f.executions[id]))
	}
	sortExecutions(out)
	return out
}

// Agent returns a copy of the agent with the given id.
func (f *FSM) Agent(id string) (*statev1.Agent, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	a, ok := f.agents[id]
	if !ok {
		return nil, false
	}
	return proto.CloneOf(a), true
}

// Agents returns copies of all agents, sorted by id.
func (f *FSM) Agents() []*statev1.Agent {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := make([]*statev1.Agent, 0, len(f.agents))
	for _, id := range slices.Sorted(maps.Keys(f.agents)) {
		out = append(out, proto.CloneOf(f.agents[id]))
	}
	return out
}

func sortExecutions(es []*sandboxv1.Execution) {
	slices.SortFunc(es, func(a, b *sandboxv1.Execution) int {
		return cmp.Or(compareTime(a.GetCreatedAt(), b.GetCreatedAt()), cmp.Compare(a.GetId(), b.GetId()))
	})
}

// compareTime orders timestamps, a missing one first.
func compareTime(a, b *timestamppb.Timestamp) int {
	return cmp.Or(cmp.Compare(a.GetSeconds(), b.GetSeconds()), cmp.Compare(a.GetNanos(), b.GetNanos()))
}

// Snapshot captures the state for raft. Raft does not call it concurrently
// with Apply, and stored records are never modified in place, so the
// snapshot shares them and Persist can run while Apply goes on.
func (f *FSM) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	snap := &statev1.Snapshot{
		Templates:   make([]*sandboxv1.Template, 0, len(f.templates)),
		Sessions:    make([]*sandboxv1.Session, 0, len(f.sessions)),
		Executions:  make([]*sandboxv1.Execution, 0, len(f.executions)),
		Agents:      make([]*statev1.Agent, 0, len(f.agents)),
		Servers:     make([]*sandboxv1.Server, 0, len(f.servers)),
		Idempotency: make([]*statev1.IdempotencyRecord, 0, len(f.idempotency)),
	}
	for _, id := range slices.Sorted(maps.Keys(f.templates)) {
		snap.Templates = append(snap.Templates, f.templates[id])
	}
	for _, id := range slices.Sorted(maps.Keys(f.sessions)) {
		snap.Sessions = append(snap.Sessions, f.sessions[id])
	}
	for _, id := range slices.Sorted(maps.Keys(f.executions)) {
		snap.Executions = append(snap.Executions, f.executions[id])
	}
	for _, id := range slices.Sorted(maps.Keys(f.agents)) {
		snap.Agents = append(snap.Agents, f.agents[id])
	}
	for _, id := range slices.Sorted(maps.Keys(f.servers)) {
		snap.Servers = append(snap.Servers, f.servers[id])
	}
	for _, k := range slices.Sorted(maps.Keys(f.idempotency)) {
		snap.Idempotency = append(snap.Idempotency, f.idempotency[k])
	}
	return &fsmSnapshot{snap: snap}, nil
}

// State returns a copy of the whole state, in the form a snapshot stores it
// (every list sorted by id; idempotency records by their scoped key).
func (f *FSM) State() *statev1.Snapshot {
	s, _ := f.Snapshot()
	return proto.CloneOf(s.(*fsmSnapshot).snap)
}

// Restore replaces the whole state with a snapshot written by Persist, and
// wakes every waiter so that it looks again.
func (f *FSM) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		return fmt.Errorf("restore fsm: read snapshot: %w", err)
	}
	var snap statev1.Snapshot
	if err := proto.Unmarshal(b, &snap); err != nil {
		return fmt.Errorf("restore fsm: decode snapshot: %w", err)
	}

	f.mu.Lock()
	defer f.mu.Unlock()
	f.reset()
	for _, t := range snap.GetTemplates() {
		f.templates[t.GetId()] = t
	}
	for _, s := range snap.GetSessions() {
		f.sessions[s.GetId()] = s
	}
	for _, a := range snap.GetAgents() {
		f.storeAgent(a)
	}
	// Usage is derived state: count it again, in id order so that it is
	// built the same way on every server.
	for _, s := range snap.GetSessions() {
		f.account(s, 1)
	}
	for _, e := range snap.GetExecutions() {
		f.executions[e.GetId()] = e
		idx := f.bySession[e.GetSessionId()]
		if idx == nil {
			idx = make(map[string]struct{})
			f.bySession[e.GetSessionId()] = idx
		}
		idx[e.GetId()] = struct{}{}
	}
	for _, sv := range snap.GetServers() {
		f.servers[sv.GetId()] = sv
	}
	for _, r := range snap.GetIdempotency() {
		f.idempotency[r.GetKey()] = r
		f.idempotencyOf[recordKey(r.GetKind(), r.GetId())] = r.GetKey()
	}

	f.watchMu.Lock()
	defer f.watchMu.Unlock()
	for id, w := range f.sessionWatch {
		close(w.ch)
		delete(f.sessionWatch, id)
	}
	for id, w := range f.executionWatch {
		close(w.ch)
		delete(f.executionWatch, id)
	}
	f.logger.Info("restored state from snapshot",
		"templates", len(f.templates), "sessions", len(f.sessions),
		"executions", len(f.executions), "agents", len(f.agents),
		"servers", len(f.servers), "idempotency_keys", len(f.idempotency))
	return nil
}

type fsmSnapshot struct {
	snap *statev1.Snapshot
}

// Persist writes the snapshot as one deterministic protobuf message.
func (s *fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(s.snap)
	if err != nil {
		sink.Cancel()
		return fmt.Errorf("persist fsm snapshot: encode: %w", err)
	}
	if _, err := sink.Write(b); err != nil {
		sink.Cancel()
		return fmt.Errorf("persist fsm snapshot: write: %w", err)
	}
	if err := sink.Close(); err != nil {
		return fmt.Errorf("persist fsm snapshot: close: %w", err)
	}
	return nil
}

// Release does nothing: the snapshot holds no resources.
func (s *fsmSnapshot) Release() {}

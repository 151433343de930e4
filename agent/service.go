package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"time"

	"connectrpc.com/connect"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/agent/artifacts"
	"github.com/sandboxhq/sandbox/agent/runtime"
	"github.com/sandboxhq/sandbox/agent/state"
	"github.com/sandboxhq/sandbox/api"
	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1/agentv1connect"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/executor/executorapi"
)

// downloadChunkBytes is the size of one DownloadArtifact message's chunk.
const downloadChunkBytes = 64 << 10

// service is the AgentService: proto in, agent call, proto out.
type service struct {
	agentv1connect.UnimplementedAgentServiceHandler
	a *Agent
}

var _ agentv1connect.AgentServiceHandler = (*service)(nil)

func (sv *service) StartSession(ctx context.Context, req *connect.Request[agentv1.StartSessionRequest]) (*connect.Response[agentv1.StartSessionResponse], error) {
	m := req.Msg
	id, claimed, err := sv.a.startSession(ctx, startParams{
		SessionID:  m.GetSessionId(),
		TemplateID: m.GetTemplateId(),
		Image:      m.GetImage(),
		Limits:     limitsOf(m.GetLimits()),
		Env:        m.GetEnv(),
		Token:      m.GetCallbackToken(),
	})
	warm, version := sv.a.pools.answered(claimed)
	if err != nil {
		return nil, connectError(err)
	}
	return connect.NewResponse(&agentv1.StartSessionResponse{ContainerId: id, Warm: warm, WarmVersion: version}), nil
}

// limitsOf converts the wire limits.
func limitsOf(l *sandboxv1.ResourceLimits) sandbox.Limits {
	return sandbox.Limits{
		CPUMillis:                  l.GetCpuMillis(),
		MemoryMiB:                  l.GetMemoryMib(),
		Pids:                       l.GetPids(),
		DiskMiB:                    l.GetDiskMib(),
		MaxExecutionTimeoutSeconds: l.GetMaxExecutionTimeoutSeconds(),
	}
}

func (sv *service) SetWarmPools(_ context.Context, req *connect.Request[agentv1.SetWarmPoolsRequest]) (*connect.Response[agentv1.SetWarmPoolsResponse], error) {
	if err := sv.a.setWarmPools(req.Msg); err != nil {
		return nil, connectError(err)
	}
	return connect.NewResponse(&agentv1.SetWarmPoolsResponse{}), nil
}

func (sv *service) StopSession(ctx context.Context, req *connect.Request[agentv1.StopSessionRequest]) (*connect.Response[agentv1.StopSessionResponse], error) {
	id := req.Msg.GetSessionId()
	if err := validateID("session_id", id); err != nil {
		return nil, connectError(err)
	}
	if err := sv.a.stopSession(ctx, id); err != nil {
		return nil, connectError(err)
	}
	return connect.NewResponse(&agentv1.StopSessionResponse{}), nil
}

func (sv *service) Execute(ctx context.Context, req *connect.Request[agentv1.ExecuteRequest]) (*connect.Response[agentv1.ExecuteResponse], error) {
	m := req.Msg
	if err := sv.a.execute(ctx, m); err != nil {
		return nil, connectError(err)
	}
	return connect.NewResponse(&agentv1.ExecuteResponse{}), nil
}

func (sv *service) CancelExecution(ctx context.Context, req *connect.Request[agentv1.CancelExecutionRequest]) (*connect.Response[agentv1.CancelExecutionResponse], error) {
	m := req.Msg
	if err := artifacts.ValidateExecutionID(m.GetExecutionId()); err != nil {
		return nil, connectError(err)
	}
	s, err := sv.a.lookup(m.GetSessionId())
	if err != nil {
		return nil, connectError(err)
	}
	if err := s.exec.cancel(ctx, m.GetExecutionId()); err != nil {
		return nil, connectError(err)
	}
	return connect.NewResponse(&agentv1.CancelExecutionResponse{}), nil
}

func (sv *service) DownloadArtifact(ctx context.Context, req *connect.Request[agentv1.DownloadArtifactRequest], stream *connect.ServerStream[agentv1.DownloadArtifactResponse]) error {
	rc, art, err := sv.a.store.Open(req.Msg.GetExecutionId(), req.Msg.GetPath())
	if err != nil {
		return connectError(err)
	}
	defer rc.Close()
	first := &agentv1.DownloadArtifactResponse{Artifact: &sandboxv1.Artifact{Path: art.Path, SizeBytes: art.SizeBytes, Sha256: art.SHA256}}
	buf := make([]byte, downloadChunkBytes)
	for sent := false; ; {
		n, rerr := io.ReadFull(rc, buf)
		if n > 0 || !sent {
			msg := &agentv1.DownloadArtifactResponse{Chunk: buf[:n]}
			if !sent {
				first.Chunk = buf[:n]
				msg = first
			}
			if err := stream.Send(msg); err != nil {
				return err
			}
			sent = true
		}
		if errors.Is(rerr, io.EOF) || errors.Is(rerr, io.ErrUnexpectedEOF) {
			return nil
		}
		if rerr != nil {
			return connect.NewError(connect.CodeInternal, fmt.Errorf("read artifact %q of execution %s: %w", art.Path, req.Msg.GetExecutionId(), rerr))
		}
		if err := ctx.Err(); err != nil {
			return connectError(err)
		}
	}
}

func (sv *service) ListContainers(ctx context.Context, _ *connect.Request[agentv1.ListContainersRequest]) (*connect.Response[agentv1.ListContainersResponse], error) {
	out, err := sv.a.listContainers(ctx)
	if err != nil {
		return nil, connectError(err)
	}
	return connect.NewResponse(&agentv1.ListContainersResponse{Containers: out}), nil
}

// handoffTimeout bounds handing one execution to its executor, which
// answers at once (the run itself is reported by callbacks).
const handoffTimeout = 10 * time.Second

// execute hands an execution to its session's executor. Handing over the
// same id again is safe: the executor runs an id once.
func (a *Agent) execute(ctx context.Context, m *agentv1.ExecuteRequest) error {
	if err := artifacts.ValidateExecutionID(m.GetExecutionId()); err != nil {
		return err
	}
	if err := sandbox.ValidateLanguage(m.GetLanguage(), nil); err != nil {
		return err
	}
	if len(m.GetCode()) > sandbox.MaxCodeBytes {
		return fmt.Errorf("%w: code is %d bytes, at most %d are allowed", sandbox.ErrInvalidArgument, len(m.GetCode()), sandbox.MaxCodeBytes)
	}
	if m.GetTimeoutSeconds() < 0 {
		return fmt.Errorf("%w: timeout_seconds must not be negative, got %d", sandbox.ErrInvalidArgument, m.GetTimeoutSeconds())
	}
	if err := sandbox.ValidateEnv("env", m.GetEnv()); err != nil {
		return err
	}
	s, err := a.lookup(m.GetSessionId())
	if err != nil {
		return err
	}
	id := m.GetExecutionId()
	// The pending record is written (durably) while the executor takes the
	// execution, not before: the fsync would otherwise add a millisecond to
	// every execution. Callbacks that come first are accepted from memory;
	// the call answers only once the record is written, and settle waits
	// for the write before it removes the record, so a quick result cannot
	// leave a stale one behind. An agent that dies in between leaves
	// the execution to the servers' reconciliation, as a dead agent does.
	a.mu.Lock()
	_, wasPending := s.pending[id]
	s.pending[id] = struct{}{}
	s.executions[id] = struct{}{}
	var recorded chan error
	if !wasPending {
		done := make(chan struct{})
		s.recording[id] = done
		recorded = make(chan error, 1)
		go func() {
			err := a.db.AddPending(s.id, id)
			a.mu.Lock()
			delete(s.recording, id)
			a.mu.Unlock()
			close(done)
			recorded <- err
		}()
	}
	a.mu.Unlock()
	// The hand-over finishes even when the server that asked goes away (a
	// leader killed mid-call): abandoned, it would leave the execution
	// pending with nobody knowing whether the executor took it.
	hctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), handoffTimeout)
	defer cancel()
	err = s.exec.execute(hctx, executorapi.ExecuteRequest{
		ExecutionID:    id,
		Language:       m.GetLanguage(),
		Code:           m.GetCode(),
		TimeoutSeconds: int(m.GetTimeoutSeconds()),
		Env:            m.GetEnv(),
	})
	if recorded != nil {
		if rerr := <-recorded; rerr != nil {
			a.log.Error("record pending execution", "session", s.id, "execution", id, "err", rerr)
			if err == nil {
				// The executor runs it, and its callbacks are accepted from
				// memory; only a restart of this agent would lose track.
				if errors.Is(rerr, state.ErrNotFound) {
					return fmt.Errorf("%w: session %s is not running on agent %s", sandbox.ErrNotFound, s.id, a.cfg.ID)
				}
			}
		}
	}
	// An executor that answered no did not take the execution; when the
	// call failed otherwise it may have, so it stays pending (and a server
	// hands it over again: the executor takes an id it holds as a no-op).
	// A refused retry of a pending id must not settle the one that runs.
	if _, refused := isExecutorError(err); refused && !wasPending {
		a.settle(s, id)
	}
	if err != nil {
		a.log.Warn("execution not handed to the executor", "session", s.id, "execution", id, "retry", wasPending, "err", err)
	} else {
		a.log.Debug("execution handed to the executor", "session", s.id, "execution", id, "retry", wasPending)
	}
	return err
}

// settle forgets a pending execution: its result was relayed, or will never
// come through the agent.
func (a *Agent) settle(s *session, executionID string) {
	a.mu.Lock()
	_, ok := s.pending[executionID]
	delete(s.pending, executionID)
	recording := s.recording[executionID]
	a.mu.Unlock()
	if !ok {
		return
	}
	if recording != nil {
		<-recording // removing before the add lands would leave the record behind
	}
	if err := a.db.RemovePending(s.id, executionID); err != nil {
		a.log.Error("forget pending execution", "session", s.id, "execution", executionID, "err", err)
	}
}

// listContainers joins the runtime's containers of this agent with the
// sessions it holds. A container's session comes from the agent's map, or
// its label when the agent does not know it; a session whose container the
// runtime does not list is reported as not running.
func (a *Agent) listContainers(ctx context.Context) ([]*agentv1.Container, error) {
	list, err := a.rt.List(ctx, map[string]string{runtime.LabelAgent: a.cfg.ID})
	if err != nil {
		return nil, fmt.Errorf("%w: list containers of agent %s: %v", sandbox.ErrUnavailable, a.cfg.ID, err)
	}
	type held struct {
		sessionID string
		pending   []string
	}
	a.mu.Lock()
	byContainer := make(map[string]held, len(a.sessions))
	for id, s := range a.sessions {
		h := held{sessionID: id}
		for e := range s.pending {
			h.pending = append(h.pending, e)
		}
		sort.Strings(h.pending)
		byContainer[s.containerID] = h
	}
	a.mu.Unlock()

	out := make([]*agentv1.Container, 0, len(list))
	for _, st := range list {
		h, ok := byContainer[st.ID]
		if ok {
			delete(byContainer, st.ID)
		} else {
			h.sessionID = st.Labels[runtime.LabelSession]
			if h.sessionID == "" && st.Labels[runtime.LabelWarm] != "" {
				continue // a warm pool's: no session of the servers' concern
			}
		}
		out = append(out, &agentv1.Container{ContainerId: st.ID, SessionId: h.sessionID, Running: st.Running, PendingExecutionIds: h.pending})
	}
	for cid, h := range byContainer {
		out = append(out, &agentv1.Container{ContainerId: cid, SessionId: h.sessionID, Running: false, PendingExecutionIds: h.pending})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ContainerId < out[j].ContainerId })
	return out, nil
}

// connectError turns an agent error into a Connect error with a code.
func connectError(err error) error {
	var ce *connect.Error
	if errors.As(err, &ce) {
		return err
	}
	if e, ok := isExecutorError(err); ok {
		return connect.NewError(e.code(), err)
	}
	// Details stay in the message: the caller is a server, which records
	// them as the reason a session or execution failed.
	code := api.Code(err)
	if code == connect.CodeUnknown {
		code = connect.CodeInternal
	}
	return connect.NewError(code, err)
}

package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/v1/sandboxv1connect"
)

// fakeAPI is an in-memory implementation of the public API's three services,
// just deep enough to test the CLI's logic against.
type fakeAPI struct {
	sandboxv1connect.UnimplementedSessionServiceHandler
	sandboxv1connect.UnimplementedExecutionServiceHandler
	sandboxv1connect.UnimplementedTemplateServiceHandler
	sandboxv1connect.UnimplementedClusterServiceHandler

	mu         sync.Mutex
	nextID     int
	sessions   map[string]*sandboxv1.Session
	order      []string // session ids in creation order
	executions map[string]*sandboxv1.Execution
	templates  map[string]*sandboxv1.Template
	// artifacts holds artifact contents by execution id and path.
	artifacts map[string]map[string][]byte
	// corrupt makes DownloadArtifact announce a checksum of other bytes.
	corrupt bool
	// pageSize bounds ListSessions pages when the request does not.
	pageSize int

	// Hooks, set before the CLI runs.
	createErr  error
	executeErr error
	// result finishes an execution; nil: it completes with stdout "ran: CODE".
	// files are the artifacts, path to content, every execution leaves.
	files  map[string]string
	result func(e *sandboxv1.Execution)
	// onCreate, when set, runs in CreateSession after the session exists;
	// the call then fails.
	onCreate func(ctx context.Context)
	// block makes Execute record a RUNNING execution, send its id on
	// started, and wait for the client to go away.
	block   bool
	started chan string
	// faults, by procedure, are what the next calls meet, in order.
	faults map[string][]fault
	// running makes Execute leave its execution RUNNING; GetExecution then
	// completes it after this many more calls.
	running int

	// Idempotency records: key to session or execution id.
	sessionKeys map[string]string
	execKeys    map[string]string

	// The cluster.
	status       *sandboxv1.GetClusterStatusResponse
	nodes        []*sandboxv1.Node
	snapshotData []byte
	// snapshotErr ends SaveSnapshot after its first chunk.
	snapshotErr error

	// Observations.
	auth          []string
	protoMajors   []int
	created       []*sandboxv1.CreateSessionRequest
	executed      []*sandboxv1.ExecuteRequest
	listedLabels  []map[string]string
	terminated    []string
	canceled      []string
	downloadCalls int
	// calls records every request's procedure and read-consistency header.
	calls []call
	// keys records, by procedure, the idempotency key of every attempt,
	// also those a fault stopped.
	keys         map[string][]string
	drained      []string
	joined       []string
	removed      []string
	restoreCalls int
	// restored holds the chunks of the last RestoreSnapshot call.
	restored [][]byte
}

// call is one request the fake received.
type call struct {
	procedure   string
	consistency string
}

// fault is what one call meets: the error code, and whether the server did
// the work first (so that only the answer is lost). abort breaks the HTTP
// stream instead of answering, as a dying server or a reset connection does.
type fault struct {
	code  connect.Code
	after bool
	abort bool
}

// takeFault pops the next fault planned for procedure, if any.
func (f *fakeAPI) takeFault(procedure string) (fault, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	q := f.faults[procedure]
	if len(q) == 0 {
		return fault{}, false
	}
	f.faults[procedure] = q[1:]
	return q[0], true
}

// faultInterceptor injects the planned faults into unary calls.
func (f *fakeAPI) faultInterceptor() connect.UnaryInterceptorFunc {
	return func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			if m, ok := req.Any().(interface{ GetIdempotencyKey() string }); ok {
				f.mu.Lock()
				f.keys[req.Spec().Procedure] = append(f.keys[req.Spec().Procedure], m.GetIdempotencyKey())
				f.mu.Unlock()
			}
			ft, ok := f.takeFault(req.Spec().Procedure)
			if !ok {
				return next(ctx, req)
			}
			if ft.after {
				if resp, err := next(ctx, req); err != nil {
					return resp, err
				}
			}
			if ft.abort {
				// net/http resets the HTTP/2 stream: no answer at all.
				panic(http.ErrAbortHandler)
			}
			return nil, connect.NewError(ft.code, fmt.Errorf("injected %s", ft.code))
		}
	}
}

func newFakeAPI() *fakeAPI {
	f := &fakeAPI{
		sessions:    map[string]*sandboxv1.Session{},
		executions:  map[string]*sandboxv1.Execution{},
		templates:   map[string]*sandboxv1.Template{},
		artifacts:   map[string]map[string][]byte{},
		started:     make(chan string, 1),
		faults:      map[string][]fault{},
		keys:        map[string][]string{},
		sessionKeys: map[string]string{},
		execKeys:    map[string]string{},
		status: &sandboxv1.GetClusterStatusResponse{
			Servers: []*sandboxv1.Server{
				{Id: "server-1", Address: "10.0.0.1:7402", ApiAddress: "10.0.0.1:7400", InternalAddress: "10.0.0.1:7401", Role: sandboxv1.ServerRole_SERVER_ROLE_LEADER, Voter: true},
				{Id: "server-2", Address: "10.0.0.2:7402", ApiAddress: "10.0.0.2:7400", InternalAddress: "10.0.0.2:7401", Role: sandboxv1.ServerRole_SERVER_ROLE_FOLLOWER, Voter: true},
				{Id: "server-3", Address: "10.0.0.3:7402", ApiAddress: "10.0.0.3:7400", InternalAddress: "10.0.0.3:7401", Role: sandboxv1.ServerRole_SERVER_ROLE_NONVOTER},
			},
			LeaderId: "server-1", Term: 7, CommitIndex: 1042, AppliedIndex: 1040, ServerId: "server-2",
		},
		nodes: []*sandboxv1.Node{
			{
				Id: "agent-1", Address: "10.0.1.1:7500", State: sandboxv1.NodeState_NODE_STATE_READY,
				Capacity:  &sandboxv1.NodeResources{CpuMillis: 4000, MemoryMib: 8192},
				Allocated: &sandboxv1.NodeResources{CpuMillis: 1500, MemoryMib: 512},
				WarmPools: []*sandboxv1.WarmPool{{TemplateId: "python-basic", Ready: 3}, {TemplateId: "nodejs-basic", Ready: 1}},
				Sessions:  2, StateChangedAt: timestamppb.New(time.Now().Add(-3 * time.Hour)),
			},
			{
				Id: "agent-2", Address: "10.0.1.2:7500", State: sandboxv1.NodeState_NODE_STATE_DEAD, StateReason: "missed probes",
				Capacity:       &sandboxv1.NodeResources{CpuMillis: 2000, MemoryMib: 4096},
				StateChangedAt: timestamppb.New(time.Now().Add(-90 * time.Second)),
			},
		},
	}
	for _, t := range []*sandboxv1.Template{
		{Id: "python-basic", Image: "localhost/sandbox/python-basic:latest", Languages: []string{"python", "bash"}, Builtin: true, Description: "Python 3"},
		{Id: "nodejs-basic", Image: "localhost/sandbox/nodejs-basic:latest", Languages: []string{"node", "bash"}, Builtin: true, Description: "Node.js"},
		{Id: "bash-only", Image: "localhost/sandbox/bash:latest", Languages: []string{"bash"}},
	} {
		f.templates[t.Id] = t
	}
	return f
}

// serve starts an h2c httptest server for f and returns its URL.
func (f *fakeAPI) serve(t *testing.T) string {
	t.Helper()
	mux := http.NewServeMux()
	opt := connect.WithInterceptors(f.faultInterceptor())
	mux.Handle(sandboxv1connect.NewSessionServiceHandler(f, opt))
	mux.Handle(sandboxv1connect.NewExecutionServiceHandler(f, opt))
	mux.Handle(sandboxv1connect.NewTemplateServiceHandler(f, opt))
	mux.Handle(sandboxv1connect.NewClusterServiceHandler(f, opt))
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		f.auth = append(f.auth, r.Header.Get("Authorization"))
		f.protoMajors = append(f.protoMajors, r.ProtoMajor)
		f.calls = append(f.calls, call{procedure: r.URL.Path, consistency: r.Header.Get(readConsistencyHeader)})
		f.mu.Unlock()
		mux.ServeHTTP(w, r)
	}))
	srv.Config.Protocols = new(http.Protocols)
	srv.Config.Protocols.SetHTTP1(true)
	srv.Config.Protocols.SetUnencryptedHTTP2(true)
	srv.Start()
	t.Cleanup(srv.Close)
	return srv.URL
}

func (f *fakeAPI) id(prefix string) string {
	f.nextID++
	return fmt.Sprintf("%s-%d", prefix, f.nextID)
}

// addSession stores a running session and returns its id.
func (f *fakeAPI) addSession(template string, labels map[string]string) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.addSessionLocked(template, labels)
}

func (f *fakeAPI) addSessionLocked(template string, labels map[string]string) string {
	s := &sandboxv1.Session{
		Id: f.id("s"), TemplateId: template, State: sandboxv1.SessionState_SESSION_STATE_RUNNING,
		AgentId: "agent-1", Labels: labels, CreatedAt: timestamppb.New(time.Now().Add(-90 * time.Second)),
	}
	f.sessions[s.Id] = s
	f.order = append(f.order, s.Id)
	return s.Id
}

// addExecution stores a completed execution with artifacts and returns its id.
func (f *fakeAPI) addExecution(sessionID string, files map[string]string) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	e := &sandboxv1.Execution{Id: f.id("e"), SessionId: sessionID, Language: "python", State: sandboxv1.ExecutionState_EXECUTION_STATE_COMPLETED}
	f.artifacts[e.Id] = map[string][]byte{}
	for _, p := range slices.Sorted(maps.Keys(files)) {
		e.Artifacts = append(e.Artifacts, artifactOf(p, []byte(files[p])))
		f.artifacts[e.Id][p] = []byte(files[p])
	}
	f.executions[e.Id] = e
	return e.Id
}

func artifactOf(path string, b []byte) *sandboxv1.Artifact {
	sum := sha256.Sum256(b)
	return &sandboxv1.Artifact{Path: path, SizeBytes: int64(len(b)), Sha256: hex.EncodeToString(sum[:])}
}

func (f *fakeAPI) CreateSession(ctx context.Context, req *connect.Request[sandboxv1.CreateSessionRequest]) (*connect.Response[sandboxv1.CreateSessionResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.created = append(f.created, proto.Clone(req.Msg).(*sandboxv1.CreateSessionRequest))
	if f.createErr != nil {
		return nil, f.createErr
	}
	if _, ok := f.templates[req.Msg.GetTemplateId()]; !ok {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("template %q not found", req.Msg.GetTemplateId()))
	}
	key := req.Msg.GetIdempotencyKey()
	if id, ok := f.sessionKeys[key]; ok && key != "" {
		return connect.NewResponse(&sandboxv1.CreateSessionResponse{Session: f.sessions[id]}), nil
	}
	id := f.addSessionLocked(req.Msg.GetTemplateId(), req.Msg.GetLabels())
	f.sessions[id].MaxLifetimeSeconds = req.Msg.GetMaxLifetimeSeconds()
	if key != "" {
		f.sessionKeys[key] = id
	}
	if f.onCreate != nil {
		f.mu.Unlock()
		f.onCreate(ctx)
		f.mu.Lock()
		return nil, connect.NewError(connect.CodeCanceled, ctx.Err())
	}
	return connect.NewResponse(&sandboxv1.CreateSessionResponse{Session: f.sessions[id]}), nil
}

func (f *fakeAPI) GetSession(_ context.Context, req *connect.Request[sandboxv1.GetSessionRequest]) (*connect.Response[sandboxv1.GetSessionResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s, ok := f.sessions[req.Msg.GetSessionId()]
	if !ok {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("session %q not found", req.Msg.GetSessionId()))
	}
	return connect.NewResponse(&sandboxv1.GetSessionResponse{Session: s}), nil
}

func (f *fakeAPI) ListSessions(_ context.Context, req *connect.Request[sandboxv1.ListSessionsRequest]) (*connect.Response[sandboxv1.ListSessionsResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.listedLabels = append(f.listedLabels, req.Msg.GetLabels())
	size := int(req.Msg.GetPageSize())
	if size == 0 {
		size = f.pageSize
	}
	if size == 0 {
		size = 100
	}
	start := 0
	if tok := req.Msg.GetPageToken(); tok != "" {
		if _, err := fmt.Sscanf(tok, "p%d", &start); err != nil {
			return nil, connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("bad page token %q", tok))
		}
	}
	var match []*sandboxv1.Session
	for _, id := range f.order {
		s := f.sessions[id]
		if len(req.Msg.GetStates()) > 0 && !slices.Contains(req.Msg.GetStates(), s.GetState()) {
			continue
		}
		ok := true
		for k, v := range req.Msg.GetLabels() {
			if s.GetLabels()[k] != v {
				ok = false
			}
		}
		if ok {
			match = append(match, s)
		}
	}
	resp := &sandboxv1.ListSessionsResponse{}
	end := min(start+size, len(match))
	if start < len(match) {
		resp.Sessions = match[start:end]
	}
	if end < len(match) {
		resp.NextPageToken = fmt.Sprintf("p%d", end)
	}
	return connect.NewResponse(resp), nil
}

func (f *fakeAPI) TerminateSession(_ context.Context, req *connect.Request[sandboxv1.TerminateSessionRequest]) (*connect.Response[sandboxv1.TerminateSessionResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s, ok := f.sessions[req.Msg.GetSessionId()]
	if !ok {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("session %q not found", req.Msg.GetSessionId()))
	}
	f.terminated = append(f.terminated, s.Id)
	s.State = sandboxv1.SessionState_SESSION_STATE_TERMINATED
	for _, e := range f.executions {
		if e.SessionId == s.Id && e.State == sandboxv1.ExecutionState_EXECUTION_STATE_RUNNING {
			e.State = sandboxv1.ExecutionState_EXECUTION_STATE_CANCELED
		}
	}
	return connect.NewResponse(&sandboxv1.TerminateSessionResponse{Session: s}), nil
}

func (f *fakeAPI) Execute(ctx context.Context, req *connect.Request[sandboxv1.ExecuteRequest]) (*connect.Response[sandboxv1.ExecuteResponse], error) {
	f.mu.Lock()
	f.executed = append(f.executed, proto.Clone(req.Msg).(*sandboxv1.ExecuteRequest))
	if f.executeErr != nil {
		defer f.mu.Unlock()
		return nil, f.executeErr
	}
	if id, ok := f.execKeys[req.Msg.GetIdempotencyKey()]; ok && req.Msg.GetIdempotencyKey() != "" {
		defer f.mu.Unlock()
		return connect.NewResponse(&sandboxv1.ExecuteResponse{Execution: proto.Clone(f.executions[id]).(*sandboxv1.Execution)}), nil
	}
	s, ok := f.sessions[req.Msg.GetSessionId()]
	if !ok || s.State != sandboxv1.SessionState_SESSION_STATE_RUNNING {
		f.mu.Unlock()
		return nil, connect.NewError(connect.CodeFailedPrecondition, fmt.Errorf("session %q is not running", req.Msg.GetSessionId()))
	}
	e := &sandboxv1.Execution{
		Id: f.id("e"), SessionId: s.Id, Language: req.Msg.GetLanguage(), Code: req.Msg.GetCode(),
		TimeoutSeconds: req.Msg.GetTimeoutSeconds(), State: sandboxv1.ExecutionState_EXECUTION_STATE_RUNNING,
	}
	f.executions[e.Id] = e
	if k := req.Msg.GetIdempotencyKey(); k != "" {
		f.execKeys[k] = e.Id
	}
	if f.block {
		f.mu.Unlock()
		f.started <- e.Id
		<-ctx.Done()
		return nil, connect.NewError(connect.CodeCanceled, ctx.Err())
	}
	defer f.mu.Unlock()
	if f.running > 0 {
		return connect.NewResponse(&sandboxv1.ExecuteResponse{Execution: proto.Clone(e).(*sandboxv1.Execution)}), nil
	}
	f.finishLocked(e)
	return connect.NewResponse(&sandboxv1.ExecuteResponse{Execution: proto.Clone(e).(*sandboxv1.Execution)}), nil
}

// finishLocked completes e as the fake's hooks say.
func (f *fakeAPI) finishLocked(e *sandboxv1.Execution) {
	e.State = sandboxv1.ExecutionState_EXECUTION_STATE_COMPLETED
	e.Stdout = "ran: " + e.Code
	if f.result != nil {
		f.result(e)
	}
	f.artifacts[e.Id] = map[string][]byte{}
	for _, p := range slices.Sorted(maps.Keys(f.files)) {
		e.Artifacts = append(e.Artifacts, artifactOf(p, []byte(f.files[p])))
		f.artifacts[e.Id][p] = []byte(f.files[p])
	}
}

func (f *fakeAPI) GetExecution(_ context.Context, req *connect.Request[sandboxv1.GetExecutionRequest]) (*connect.Response[sandboxv1.GetExecutionResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	e, ok := f.executions[req.Msg.GetExecutionId()]
	if !ok {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("execution %q not found", req.Msg.GetExecutionId()))
	}
	if e.State == sandboxv1.ExecutionState_EXECUTION_STATE_RUNNING && f.running > 0 {
		if f.running--; f.running == 0 {
			f.finishLocked(e)
		}
	}
	return connect.NewResponse(&sandboxv1.GetExecutionResponse{Execution: proto.Clone(e).(*sandboxv1.Execution)}), nil
}

func (f *fakeAPI) ListExecutions(_ context.Context, req *connect.Request[sandboxv1.ListExecutionsRequest]) (*connect.Response[sandboxv1.ListExecutionsResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	resp := &sandboxv1.ListExecutionsResponse{}
	for _, e := range f.executions {
		if e.SessionId == req.Msg.GetSessionId() {
			resp.Executions = append(resp.Executions, e)
		}
	}
	slices.SortFunc(resp.Executions, func(a, b *sandboxv1.Execution) int { return strings.Compare(a.Id, b.Id) })
	return connect.NewResponse(resp), nil
}

func (f *fakeAPI) CancelExecution(_ context.Context, req *connect.Request[sandboxv1.CancelExecutionRequest]) (*connect.Response[sandboxv1.CancelExecutionResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	e, ok := f.executions[req.Msg.GetExecutionId()]
	if !ok {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("execution %q not found", req.Msg.GetExecutionId()))
	}
	f.canceled = append(f.canceled, e.Id)
	e.State = sandboxv1.ExecutionState_EXECUTION_STATE_CANCELED
	return connect.NewResponse(&sandboxv1.CancelExecutionResponse{Execution: e}), nil
}

func (f *fakeAPI) DownloadArtifact(_ context.Context, req *connect.Request[sandboxv1.DownloadArtifactRequest], stream *connect.ServerStream[sandboxv1.DownloadArtifactResponse]) error {
	f.mu.Lock()
	f.downloadCalls++
	content, ok := f.artifacts[req.Msg.GetExecutionId()][req.Msg.GetPath()]
	corrupt := f.corrupt
	f.mu.Unlock()
	if !ok {
		return connect.NewError(connect.CodeNotFound, fmt.Errorf("artifact %q not found", req.Msg.GetPath()))
	}
	meta := artifactOf(req.Msg.GetPath(), content)
	if corrupt {
		meta.Sha256 = artifactOf("", bytes.ToUpper(content)).Sha256
	}
	// Small chunks, so that the client reassembles several messages.
	first := true
	for chunk := range slices.Chunk(content, 4) {
		msg := &sandboxv1.DownloadArtifactResponse{Chunk: chunk}
		if first {
			msg.Artifact, first = meta, false
		}
		if err := stream.Send(msg); err != nil {
			return err
		}
	}
	if first {
		return stream.Send(&sandboxv1.DownloadArtifactResponse{Artifact: meta})
	}
	return nil
}

func (f *fakeAPI) GetTemplate(_ context.Context, req *connect.Request[sandboxv1.GetTemplateRequest]) (*connect.Response[sandboxv1.GetTemplateResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	t, ok := f.templates[req.Msg.GetTemplateId()]
	if !ok {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("template %q not found", req.Msg.GetTemplateId()))
	}
	return connect.NewResponse(&sandboxv1.GetTemplateResponse{Template: t}), nil
}

func (f *fakeAPI) ListTemplates(context.Context, *connect.Request[sandboxv1.ListTemplatesRequest]) (*connect.Response[sandboxv1.ListTemplatesResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	resp := &sandboxv1.ListTemplatesResponse{}
	for _, id := range slices.Sorted(maps.Keys(f.templates)) {
		resp.Templates = append(resp.Templates, f.templates[id])
	}
	return connect.NewResponse(resp), nil
}

func (f *fakeAPI) CreateTemplate(_ context.Context, req *connect.Request[sandboxv1.CreateTemplateRequest]) (*connect.Response[sandboxv1.CreateTemplateResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	t := req.Msg.GetTemplate()
	if _, ok := f.templates[t.GetId()]; ok {
		return nil, connect.NewError(connect.CodeAlreadyExists, fmt.Errorf("template %q exists", t.GetId()))
	}
	f.templates[t.GetId()] = t
	return connect.NewResponse(&sandboxv1.CreateTemplateResponse{Template: t}), nil
}

func (f *fakeAPI) DeleteTemplate(_ context.Context, req *connect.Request[sandboxv1.DeleteTemplateRequest]) (*connect.Response[sandboxv1.DeleteTemplateResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	t, ok := f.templates[req.Msg.GetTemplateId()]
	switch {
	case !ok:
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("template %q not found", req.Msg.GetTemplateId()))
	case t.Builtin:
		return nil, connect.NewError(connect.CodeFailedPrecondition, errors.New("built-in templates cannot be deleted"))
	}
	delete(f.templates, t.Id)
	return connect.NewResponse(&sandboxv1.DeleteTemplateResponse{}), nil
}

func (f *fakeAPI) GetClusterStatus(context.Context, *connect.Request[sandboxv1.GetClusterStatusRequest]) (*connect.Response[sandboxv1.GetClusterStatusResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return connect.NewResponse(proto.Clone(f.status).(*sandboxv1.GetClusterStatusResponse)), nil
}

func (f *fakeAPI) ListNodes(context.Context, *connect.Request[sandboxv1.ListNodesRequest]) (*connect.Response[sandboxv1.ListNodesResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	resp := &sandboxv1.ListNodesResponse{}
	for _, n := range f.nodes {
		resp.Nodes = append(resp.Nodes, proto.Clone(n).(*sandboxv1.Node))
	}
	return connect.NewResponse(resp), nil
}

func (f *fakeAPI) DrainNode(_ context.Context, req *connect.Request[sandboxv1.DrainNodeRequest]) (*connect.Response[sandboxv1.DrainNodeResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, n := range f.nodes {
		if n.Id == req.Msg.GetNodeId() {
			f.drained = append(f.drained, n.Id)
			n.State = sandboxv1.NodeState_NODE_STATE_DRAINING
			return connect.NewResponse(&sandboxv1.DrainNodeResponse{Node: proto.Clone(n).(*sandboxv1.Node)}), nil
		}
	}
	return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("node %q not found", req.Msg.GetNodeId()))
}

func (f *fakeAPI) JoinServer(_ context.Context, req *connect.Request[sandboxv1.JoinServerRequest]) (*connect.Response[sandboxv1.JoinServerResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.joined = append(f.joined, req.Msg.GetAddress())
	s := &sandboxv1.Server{Id: fmt.Sprintf("server-%d", len(f.status.Servers)+1), InternalAddress: req.Msg.GetAddress(),
		Role: sandboxv1.ServerRole_SERVER_ROLE_FOLLOWER, Voter: true}
	f.status.Servers = append(f.status.Servers, s)
	return connect.NewResponse(&sandboxv1.JoinServerResponse{Server: s}), nil
}

func (f *fakeAPI) RemoveServer(_ context.Context, req *connect.Request[sandboxv1.RemoveServerRequest]) (*connect.Response[sandboxv1.RemoveServerResponse], error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	i := slices.IndexFunc(f.status.Servers, func(s *sandboxv1.Server) bool { return s.Id == req.Msg.GetServerId() })
	if i < 0 {
		return nil, connect.NewError(connect.CodeNotFound, fmt.Errorf("server %q not found", req.Msg.GetServerId()))
	}
	f.removed = append(f.removed, req.Msg.GetServerId())
	f.status.Servers = slices.Delete(f.status.Servers, i, i+1)
	return connect.NewResponse(&sandboxv1.RemoveServerResponse{}), nil
}

func (f *fakeAPI) SaveSnapshot(_ context.Context, _ *connect.Request[sandboxv1.SaveSnapshotRequest], stream *connect.ServerStream[sandboxv1.SaveSnapshotResponse]) error {
	f.mu.Lock()
	data, failure := f.snapshotData, f.snapshotErr
	f.mu.Unlock()
	// Uneven chunks, so that the client reassembles several messages.
	for chunk := range slices.Chunk(data, 10000) {
		if err := stream.Send(&sandboxv1.SaveSnapshotResponse{Chunk: chunk}); err != nil {
			return err
		}
		if failure != nil {
			return failure
		}
	}
	return nil
}

func (f *fakeAPI) RestoreSnapshot(_ context.Context, stream *connect.ClientStream[sandboxv1.RestoreSnapshotRequest]) (*connect.Response[sandboxv1.RestoreSnapshotResponse], error) {
	var chunks [][]byte
	for stream.Receive() {
		chunks = append(chunks, slices.Clone(stream.Msg().GetChunk()))
	}
	if err := stream.Err(); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.restoreCalls++
	f.restored = chunks
	return connect.NewResponse(&sandboxv1.RestoreSnapshotResponse{}), nil
}

// snapshot returns copies of the observations, taken under the lock.
func (f *fakeAPI) snapshot() (terminated, canceled []string, created int, executed []*sandboxv1.ExecuteRequest) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.terminated), slices.Clone(f.canceled), len(f.created), slices.Clone(f.executed)
}

// invocation describes one run of the CLI.
type invocation struct {
	ctx   context.Context
	stdin string
	tty   bool
	// env overrides the default environment; a "" value unsets a variable.
	env map[string]string
	cwd string
}

type result struct {
	stdout, stderr string
	code           int
}

// runCLI runs sandboxctl against addr with the API key "test-key", an
// empty HOME and an empty working directory unless inv says otherwise.
func runCLI(t *testing.T, addr string, inv invocation, args ...string) result {
	t.Helper()
	env := map[string]string{envAddr: addr, envAPIKey: "test-key", "HOME": t.TempDir()}
	for k, v := range inv.env {
		env[k] = v
	}
	cwd := inv.cwd
	if cwd == "" {
		cwd = t.TempDir()
	}
	ctx := inv.ctx
	if ctx == nil {
		ctx = t.Context()
	}
	var stdout, stderr bytes.Buffer
	a := &app{
		stdin:           strings.NewReader(inv.stdin),
		stdinIsTerminal: func() bool { return inv.tty },
		stdout:          &stdout,
		stderr:          &stderr,
		getenv:          func(k string) string { return env[k] },
		getwd:           func() (string, error) { return cwd, nil },
		now:             time.Now,
		// Retries and polls as the real ones, but quick.
		retry:       retryPolicy{attempts: defaultRetry.attempts, initial: time.Millisecond, max: 4 * time.Millisecond},
		pollInitial: time.Millisecond,
	}
	code := a.run(ctx, args)
	return result{stdout: stdout.String(), stderr: stderr.String(), code: code}
}

// dirEntries lists a directory's names.
func dirEntries(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sandboxhq/sandbox/agent/runtime"
	"github.com/sandboxhq/sandbox/api"
	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1/agentv1connect"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/executor/executorapi"
)

func startReq(id string) *agentv1.StartSessionRequest {
	return &agentv1.StartSessionRequest{
		SessionId:     id,
		TemplateId:    "python-basic",
		Image:         "localhost/sandbox/python-basic:latest",
		Limits:        &sandboxv1.ResourceLimits{CpuMillis: 500, MemoryMib: 256, Pids: 64, DiskMib: 100, MaxExecutionTimeoutSeconds: 30},
		Env:           map[string]string{"GREETING": "hi"},
		CallbackToken: "token-" + id,
	}
}

func (ta *testAgent) start(t *testing.T, id string) string {
	t.Helper()
	resp, err := ta.client.StartSession(context.Background(), connect.NewRequest(startReq(id)))
	if err != nil {
		t.Fatalf("StartSession(%s): %v", id, err)
	}
	return resp.Msg.ContainerId
}

func TestAgentServiceAuth(t *testing.T) {
	ta := newTestAgent(t)
	// gRPC needs HTTP/2, so serve the same handler over TLS as well.
	tlsSrv := httptest.NewUnstartedServer(ta.Handler())
	tlsSrv.EnableHTTP2 = true
	tlsSrv.StartTLS()
	t.Cleanup(tlsSrv.Close)

	protocols := []struct {
		name string
		opts []connect.ClientOption
		srv  *httptest.Server
		url  string
	}{
		{name: "connect", url: ta.url},
		{name: "grpc", opts: []connect.ClientOption{connect.WithGRPC()}, srv: tlsSrv, url: tlsSrv.URL},
	}
	headers := []struct {
		name   string
		header string
		ok     bool
	}{
		{"none", "", false},
		{"wrong", "Bearer not-the-token", false},
		{"prefix of the token", "Bearer " + testClusterToken[:4], false},
		{"not bearer", "Basic " + testClusterToken, false},
		{"right", "Bearer " + testClusterToken, true},
	}
	for _, p := range protocols {
		httpClient := ta.http
		if p.srv != nil {
			httpClient = p.srv.Client()
		}
		client := agentv1connect.NewAgentServiceClient(httpClient, p.url, p.opts...)
		for _, h := range headers {
			t.Run(p.name+"/"+h.name, func(t *testing.T) {
				ctx := context.Background()
				req := connect.NewRequest(&agentv1.ListContainersRequest{})
				if h.header != "" {
					req.Header().Set("Authorization", h.header)
				}
				_, err := client.ListContainers(ctx, req)
				dreq := connect.NewRequest(&agentv1.DownloadArtifactRequest{ExecutionId: "e1", Path: "a.txt"})
				if h.header != "" {
					dreq.Header().Set("Authorization", h.header)
				}
				stream, serr := client.DownloadArtifact(ctx, dreq)
				if serr == nil {
					for stream.Receive() {
					}
					serr = stream.Err()
					stream.Close()
				}
				if h.ok {
					if err != nil {
						t.Fatalf("ListContainers with the cluster token: %v", err)
					}
					if connect.CodeOf(serr) != connect.CodeNotFound {
						t.Fatalf("DownloadArtifact of an unknown artifact = %v, want NotFound", serr)
					}
					return
				}
				if connect.CodeOf(err) != connect.CodeUnauthenticated {
					t.Errorf("ListContainers = %v, want Unauthenticated", err)
				}
				if connect.CodeOf(serr) != connect.CodeUnauthenticated {
					t.Errorf("DownloadArtifact = %v, want Unauthenticated", serr)
				}
			})
		}
	}
}

// TestSessionLifecycle drives StartSession, Execute (with the fake executor
// calling back through the relay), DownloadArtifact, ListContainers and
// StopSession.
func TestSessionLifecycle(t *testing.T) {
	ta := newTestAgent(t)
	ctx := context.Background()

	cid := ta.start(t, "sess1")
	if cid != "s-sess1" {
		t.Fatalf("container id = %q", cid)
	}
	c, ok := ta.rt.container(cid)
	if !ok {
		t.Fatal("runtime has no container")
	}
	spec := c.spec
	dir := filepath.Join(ta.dataDir, "sockets", cid)
	if spec.SocketDir != dir || spec.Image != "localhost/sandbox/python-basic:latest" {
		t.Fatalf("spec = %+v", spec)
	}
	if spec.Limits.CPUMillis != 500 || spec.Limits.MemoryMiB != 256 || spec.Limits.Pids != 64 || spec.Limits.DiskMiB != 100 || spec.Limits.MaxExecutionTimeoutSeconds != 30 {
		t.Fatalf("limits = %+v", spec.Limits)
	}
	for _, want := range []string{"WORKSPACE_PATH=/workspace", "CONTROL_PLANE_URL=unix:///run/sandbox/agent.sock", "EXECUTOR_SOCKET=/run/sandbox/executor.sock", "LOG_LEVEL=info"} {
		if !slices.Contains(spec.Env, want) {
			t.Errorf("env %v lacks %s", spec.Env, want)
		}
	}
	if spec.Labels[runtime.LabelAgent] != "agent-1" || spec.Labels[runtime.LabelSession] != "sess1" || spec.Labels[runtime.LabelTemplate] != "python-basic" {
		t.Errorf("labels = %v", spec.Labels)
	}
	if init := c.exec.initRequest(); init == nil || init.SessionID != "sess1" || init.Token != "token-sess1" || init.Env["GREETING"] != "hi" {
		t.Fatalf("init = %+v", init)
	}
	assertMode(t, dir, os.ModeDir|0o700)
	assertMode(t, filepath.Join(dir, executorapi.AgentSocket), os.ModeSocket|0o600)
	if os.Geteuid() == 0 {
		assertOwner(t, dir, sandboxUID)
		assertOwner(t, filepath.Join(dir, executorapi.AgentSocket), sandboxUID)
	}
	recs, err := ta.db.Sessions()
	if err != nil || len(recs) != 1 || recs[0].ContainerID != cid || recs[0].Token != "token-sess1" || recs[0].TemplateID != "python-basic" {
		t.Fatalf("agent.db sessions = %+v, %v", recs, err)
	}
	if got := metricValue(t, ta.registry, "sandbox_agent_sessions", nil); got != 1 {
		t.Errorf("sessions gauge = %v", got)
	}
	if n := metricValue(t, ta.registry, "sandbox_agent_container_start_seconds", nil); n != 1 {
		t.Errorf("start histogram count = %v", n)
	}

	// A retried StartSession returns the same container.
	if again := ta.start(t, "sess1"); again != cid {
		t.Fatalf("second StartSession = %q", again)
	}
	other := startReq("sess1")
	other.CallbackToken = "another-token"
	if _, err := ta.client.StartSession(ctx, connect.NewRequest(other)); connect.CodeOf(err) != connect.CodeAlreadyExists {
		t.Fatalf("StartSession with another token = %v, want AlreadyExists", err)
	}

	// Execute: the fake executor reports status, uploads an artifact and reports the result.
	_, err = ta.client.Execute(ctx, connect.NewRequest(&agentv1.ExecuteRequest{
		ExecutionId: "exec1", SessionId: "sess1", Language: "python", Code: "print('hello')", TimeoutSeconds: 10,
	}))
	if err != nil {
		t.Fatalf("Execute: %v", err)
	}
	for _, kind := range []string{"status", "artifact", "result"} {
		select {
		case o := <-c.exec.outcomes:
			if o.kind != kind || o.status != http.StatusOK {
				t.Fatalf("callback %s answered %+v", kind, o)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no %s callback", kind)
		}
	}
	reports := ta.cp.reportsOf("exec1")
	if len(reports) != 2 {
		t.Fatalf("reports = %v", reports)
	}
	if r := reports[0]; r.Kind != agentv1.ReportKind_REPORT_KIND_STATUS || r.State != sandboxv1.ExecutionState_EXECUTION_STATE_RUNNING || r.SessionId != "sess1" || r.AgentId != "agent-1" {
		t.Errorf("status report = %v", r)
	}
	content := []byte("artifact of exec1")
	sum := sha256.Sum256(content)
	r := reports[1]
	if r.Kind != agentv1.ReportKind_REPORT_KIND_RESULT || r.State != sandboxv1.ExecutionState_EXECUTION_STATE_COMPLETED || r.Stdout != "hello\n" || r.DurationMs != 12 {
		t.Errorf("result report = %v", r)
	}
	if len(r.Artifacts) != 1 || r.Artifacts[0].Path != "out/result.txt" || r.Artifacts[0].Sha256 != hex.EncodeToString(sum[:]) || r.Artifacts[0].SizeBytes != int64(len(content)) {
		t.Errorf("result artifacts = %v", r.Artifacts)
	}
	if !strings.Contains(r.Error, `"missing.txt"`) {
		t.Errorf("result error %q does not mention the dropped artifact", r.Error)
	}
	if got := metricValue(t, ta.registry, "sandbox_agent_callbacks_total", map[string]string{"kind": "result", "code": "200"}); got != 1 {
		t.Errorf("callbacks_total{result,200} = %v", got)
	}

	// The executor's own errors come back as Connect codes with its message.
	_, err = ta.client.Execute(ctx, connect.NewRequest(&agentv1.ExecuteRequest{ExecutionId: "exec2", SessionId: "sess1", Language: "python", Code: "reject me"}))
	if connect.CodeOf(err) != connect.CodeInvalidArgument || !strings.Contains(err.Error(), "does not like this code") {
		t.Errorf("Execute rejected by the executor = %v", err)
	}
	_, err = ta.client.CancelExecution(ctx, connect.NewRequest(&agentv1.CancelExecutionRequest{ExecutionId: "exec1", SessionId: "sess1"}))
	if connect.CodeOf(err) != connect.CodeNotFound {
		t.Errorf("CancelExecution of a finished execution = %v, want NotFound", err)
	}

	got, meta := download(t, ta.client, "exec1", "out/result.txt")
	if !bytes.Equal(got, content) || meta.GetSha256() != hex.EncodeToString(sum[:]) || meta.GetPath() != "out/result.txt" {
		t.Errorf("download = %q %v", got, meta)
	}

	list, err := ta.client.ListContainers(ctx, connect.NewRequest(&agentv1.ListContainersRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	if cs := list.Msg.Containers; len(cs) != 1 || cs[0].ContainerId != cid || cs[0].SessionId != "sess1" || !cs[0].Running {
		t.Errorf("ListContainers = %v", cs)
	}

	if _, err := ta.client.StopSession(ctx, connect.NewRequest(&agentv1.StopSessionRequest{SessionId: "sess1"})); err != nil {
		t.Fatalf("StopSession: %v", err)
	}
	if !ta.rt.wasDestroyed(cid) {
		t.Error("container not destroyed")
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket dir still there: %v", err)
	}
	if recs, _ := ta.db.Sessions(); len(recs) != 0 {
		t.Errorf("agent.db still has %v", recs)
	}
	if got := metricValue(t, ta.registry, "sandbox_agent_sessions", nil); got != 0 {
		t.Errorf("sessions gauge = %v", got)
	}
	// Stopping again is fine; the session is gone; its artifacts are not.
	if _, err := ta.client.StopSession(ctx, connect.NewRequest(&agentv1.StopSessionRequest{SessionId: "sess1"})); err != nil {
		t.Errorf("second StopSession: %v", err)
	}
	_, err = ta.client.Execute(ctx, connect.NewRequest(&agentv1.ExecuteRequest{ExecutionId: "exec3", SessionId: "sess1", Language: "python", Code: "1"}))
	if connect.CodeOf(err) != connect.CodeNotFound {
		t.Errorf("Execute after stop = %v, want NotFound", err)
	}
	if got, _ := download(t, ta.client, "exec1", "out/result.txt"); !bytes.Equal(got, content) {
		t.Error("artifact gone after StopSession")
	}
	// No reports about the exit the agent asked for.
	select {
	case e := <-ta.cp.exits:
		t.Errorf("unexpected ReportSessionExit %v", e)
	default:
	}
}

func download(t *testing.T, c agentv1connect.AgentServiceClient, execID, path string) ([]byte, *sandboxv1.Artifact) {
	t.Helper()
	stream, err := c.DownloadArtifact(context.Background(), connect.NewRequest(&agentv1.DownloadArtifactRequest{ExecutionId: execID, Path: path}))
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	var buf bytes.Buffer
	var meta *sandboxv1.Artifact
	for i := 0; stream.Receive(); i++ {
		if i == 0 {
			meta = stream.Msg().Artifact
		} else if stream.Msg().Artifact != nil {
			t.Error("metadata on a later message")
		}
		buf.Write(stream.Msg().Chunk)
	}
	if err := stream.Err(); err != nil {
		t.Fatalf("DownloadArtifact(%s, %s): %v", execID, path, err)
	}
	return buf.Bytes(), meta
}

func TestDownloadLargeArtifactInChunks(t *testing.T) {
	ta := newTestAgent(t)
	content := bytes.Repeat([]byte("0123456789abcdef"), 10000) // 160000 bytes: three chunks
	if _, err := ta.store.Put("big", "data.bin", bytes.NewReader(content), 1<<20, ""); err != nil {
		t.Fatal(err)
	}
	got, meta := download(t, ta.client, "big", "data.bin")
	if !bytes.Equal(got, content) || meta.GetSizeBytes() != int64(len(content)) {
		t.Fatalf("download: %d bytes, meta %v", len(got), meta)
	}
	for _, tc := range []struct {
		exec, path string
		code       connect.Code
	}{
		{"big", "other.bin", connect.CodeNotFound},
		{"nope", "data.bin", connect.CodeNotFound},
		{"big", "../data.bin", connect.CodeInvalidArgument},
		{"../big", "data.bin", connect.CodeInvalidArgument},
	} {
		stream, err := ta.client.DownloadArtifact(context.Background(), connect.NewRequest(&agentv1.DownloadArtifactRequest{ExecutionId: tc.exec, Path: tc.path}))
		if err == nil {
			for stream.Receive() {
			}
			err = stream.Err()
			stream.Close()
		}
		if connect.CodeOf(err) != tc.code {
			t.Errorf("DownloadArtifact(%q, %q) = %v, want %v", tc.exec, tc.path, err, tc.code)
		}
	}
}

func TestStartSessionInvalid(t *testing.T) {
	ta := newTestAgent(t)
	tests := []struct {
		name   string
		mutate func(*agentv1.StartSessionRequest)
	}{
		{"empty id", func(r *agentv1.StartSessionRequest) { r.SessionId = "" }},
		{"traversal id", func(r *agentv1.StartSessionRequest) { r.SessionId = "../x" }},
		{"slash id", func(r *agentv1.StartSessionRequest) { r.SessionId = "a/b" }},
		{"long id", func(r *agentv1.StartSessionRequest) { r.SessionId = strings.Repeat("a", 65) }},
		{"no image", func(r *agentv1.StartSessionRequest) { r.Image = "" }},
		{"no token", func(r *agentv1.StartSessionRequest) { r.CallbackToken = "" }},
		{"token with newline", func(r *agentv1.StartSessionRequest) { r.CallbackToken = "a\nb" }},
		{"bad env", func(r *agentv1.StartSessionRequest) { r.Env = map[string]string{"1X": "y"} }},
		{"negative limit", func(r *agentv1.StartSessionRequest) { r.Limits.MemoryMib = -1 }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := startReq("valid")
			tt.mutate(req)
			_, err := ta.client.StartSession(context.Background(), connect.NewRequest(req))
			if connect.CodeOf(err) != connect.CodeInvalidArgument {
				t.Fatalf("StartSession = %v, want InvalidArgument", err)
			}
		})
	}
	if list, _ := ta.rt.List(context.Background(), nil); len(list) != 0 {
		t.Error("invalid requests reached the runtime")
	}
}

func TestStartSessionFailureCleansUp(t *testing.T) {
	tests := []struct {
		name   string
		setup  func(*testAgent)
		code   connect.Code
		substr string
	}{
		{"runtime start fails", func(ta *testAgent) { ta.rt.startErr = errors.New("image not found") }, connect.CodeInternal, "image not found"},
		{"executor never healthy", func(ta *testAgent) { ta.rt.noExecutor = true; ta.healthTimeout = 50 * time.Millisecond }, connect.CodeUnavailable, "not healthy"},
		{"container exits during start", func(ta *testAgent) { ta.rt.exitOnStart = true }, connect.CodeInternal, "exit code 2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ta := newTestAgent(t)
			tt.setup(ta)
			_, err := ta.client.StartSession(context.Background(), connect.NewRequest(startReq("sess1")))
			if connect.CodeOf(err) != tt.code || !strings.Contains(err.Error(), tt.substr) {
				t.Fatalf("StartSession = %v, want %v containing %q", err, tt.code, tt.substr)
			}
			if _, ok := ta.rt.container("s-sess1"); ok {
				t.Error("container left behind")
			}
			if entries, _ := os.ReadDir(filepath.Join(ta.dataDir, "sockets")); len(entries) != 0 {
				t.Errorf("socket dirs left behind: %v", entries)
			}
			if recs, _ := ta.db.Sessions(); len(recs) != 0 {
				t.Errorf("agent.db has %v", recs)
			}
			ta.mu.Lock()
			n := len(ta.sessions)
			ta.mu.Unlock()
			if n != 0 {
				t.Errorf("agent still holds %d sessions", n)
			}
		})
	}
}

// TestStopDuringStart stops a session whose executor never comes up: the
// start is aborted rather than waiting for its deadline.
func TestStopDuringStart(t *testing.T) {
	ta := newTestAgent(t)
	ta.rt.noExecutor = true
	ta.healthTimeout = time.Minute
	errc := make(chan error, 1)
	go func() {
		_, err := ta.client.StartSession(context.Background(), connect.NewRequest(startReq("sess1")))
		errc <- err
	}()
	eventually(t, "container to be started", func() bool { _, ok := ta.rt.container("s-sess1"); return ok })
	if _, err := ta.client.StopSession(context.Background(), connect.NewRequest(&agentv1.StopSessionRequest{SessionId: "sess1"})); err != nil {
		t.Fatalf("StopSession: %v", err)
	}
	if err := <-errc; err == nil {
		t.Fatal("StartSession succeeded after StopSession")
	}
	if _, ok := ta.rt.container("s-sess1"); ok {
		t.Error("container left behind")
	}
}

// callbackTo sends one callback to a session's agent.sock as the executor would.
func callbackTo(t *testing.T, ta *testAgent, containerID, method, path, token string, body []byte, hdr http.Header) (int, string) {
	t.Helper()
	client := unixClient(filepath.Join(ta.dataDir, "sockets", containerID, executorapi.AgentSocket))
	defer client.CloseIdleConnections()
	req, err := http.NewRequest(method, "http://agent"+path, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header[k] = v
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// markExecution tells the agent an execution runs in a session, as Execute does.
func (ta *testAgent) markExecution(sessionID, executionID string) {
	ta.mu.Lock()
	defer ta.mu.Unlock()
	ta.sessions[sessionID].executions[executionID] = struct{}{}
}

func TestCallbackTokenBinding(t *testing.T) {
	ta := newTestAgent(t)
	a := ta.start(t, "sa")
	ta.start(t, "sb")
	ta.markExecution("sa", "ea")
	ta.markExecution("sb", "eb")
	status := jsonBody(executorapi.StatusReport{State: executorapi.StateRunning})

	tests := []struct {
		name   string
		path   string
		token  string
		status int
	}{
		{"no token", "/internal/executions/ea/status", "", http.StatusUnauthorized},
		{"other session's token", "/internal/executions/ea/status", "token-sb", http.StatusUnauthorized},
		{"other session's execution", "/internal/executions/eb/status", "token-sa", http.StatusNotFound},
		{"bad execution id", "/internal/executions/..%2Fx/status", "token-sa", http.StatusBadRequest},
		{"unknown route", "/internal/other", "token-sa", http.StatusNotFound},
		{"unknown route without token", "/internal/other", "", http.StatusUnauthorized},
		{"own token", "/internal/executions/ea/status", "token-sa", http.StatusOK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, body := callbackTo(t, ta, a, http.MethodPost, tt.path, tt.token, status, nil)
			if got != tt.status {
				t.Fatalf("status = %d (%s), want %d", got, body, tt.status)
			}
		})
	}
	if n := len(ta.cp.reportsOf("ea")); n != 1 {
		t.Errorf("%d reports relayed for ea, want 1", n)
	}
	if n := len(ta.cp.reportsOf("eb")); n != 0 {
		t.Errorf("%d reports relayed for eb through session a's socket", n)
	}
	if got := metricValue(t, ta.registry, "sandbox_agent_callbacks_total", map[string]string{"kind": "status", "code": "401"}); got != 2 {
		t.Errorf("callbacks_total{status,401} = %v", got)
	}
}

func TestArtifactCallback(t *testing.T) {
	ta := newTestAgent(t)
	cid := ta.start(t, "s1")
	ta.markExecution("s1", "e1")
	content := []byte("some bytes")
	h := sha256.Sum256(content)
	sum := hex.EncodeToString(h[:])
	wrong := sha256.Sum256([]byte("other"))

	tests := []struct {
		name   string
		path   string
		sha    string
		body   []byte
		status int
	}{
		{"ok", "a/b.txt", sum, content, http.StatusOK},
		{"sha mismatch", "c.txt", hex.EncodeToString(wrong[:]), content, http.StatusBadRequest},
		{"no sha", "d.txt", "", content, http.StatusBadRequest},
		{"traversal path", "../../etc/passwd", sum, content, http.StatusBadRequest},
		{"absolute path", "/etc/passwd", sum, content, http.StatusBadRequest},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, body := callbackTo(t, ta, cid, http.MethodPut, "/internal/executions/e1/artifacts?path="+tt.path, "token-s1", tt.body,
				http.Header{"X-Content-Sha256": {tt.sha}})
			if got != tt.status {
				t.Fatalf("status = %d (%s), want %d", got, body, tt.status)
			}
		})
	}
	list, err := ta.store.List("e1")
	if err != nil || len(list) != 1 || list[0].Path != "a/b.txt" {
		t.Fatalf("stored = %v, %v", list, err)
	}

	// Over the size cap: refused from Content-Length before reading.
	client := unixClient(filepath.Join(ta.dataDir, "sockets", cid, executorapi.AgentSocket))
	defer client.CloseIdleConnections()
	req, _ := http.NewRequest(http.MethodPut, "http://agent/internal/executions/e1/artifacts?path=big", io.LimitReader(zeros{}, executorapi.MaxArtifactBytes+1))
	req.ContentLength = executorapi.MaxArtifactBytes + 1
	req.Header.Set("Authorization", "Bearer token-s1")
	req.Header.Set("X-Content-Sha256", sum)
	resp, err := client.Do(req)
	if err == nil {
		resp.Body.Close()
	}
	// The server may close the connection before the client finished sending.
	if err == nil && resp.StatusCode != http.StatusRequestEntityTooLarge {
		t.Fatalf("oversized artifact: status %d", resp.StatusCode)
	}
	if _, err := ta.store.Stat("e1", "big"); err == nil {
		t.Fatal("oversized artifact stored")
	}
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) { clear(p); return len(p), nil }

func TestResultRelay(t *testing.T) {
	ta := newTestAgent(t)
	cid := ta.start(t, "s1")
	content := []byte("x,y\n1,2\n")
	h := sha256.Sum256(content)
	sum := hex.EncodeToString(h[:])

	tests := []struct {
		name      string
		failNext  int
		failCode  connect.Code
		state     string
		status    int
		wantState sandboxv1.ExecutionState
	}{
		{"committed", 0, 0, executorapi.StateCompleted, http.StatusOK, sandboxv1.ExecutionState_EXECUTION_STATE_COMPLETED},
		{"timed out", 0, 0, executorapi.StateTimedOut, http.StatusOK, sandboxv1.ExecutionState_EXECUTION_STATE_TIMED_OUT},
		{"unknown state fails the execution", 0, 0, "EXPLODED", http.StatusOK, sandboxv1.ExecutionState_EXECUTION_STATE_FAILED},
		{"transient failures are retried", 2, connect.CodeUnavailable, executorapi.StateFailed, http.StatusOK, sandboxv1.ExecutionState_EXECUTION_STATE_FAILED},
		{"servers down: executor retries", 100, connect.CodeUnavailable, executorapi.StateCompleted, http.StatusServiceUnavailable, 0},
		{"servers reject: no retry", 100, connect.CodeFailedPrecondition, executorapi.StateCompleted, http.StatusConflict, 0},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			exec := "r" + string(rune('a'+i))
			ta.markExecution("s1", exec)
			if _, err := ta.store.Put(exec, "data.csv", bytes.NewReader(content), 1<<20, sum); err != nil {
				t.Fatal(err)
			}
			ta.cp.fail(tt.failNext, tt.failCode)
			t.Cleanup(func() { ta.cp.fail(0, connect.CodeUnavailable) })
			res := executorapi.Result{
				State: tt.state, ExitCode: 3, Stdout: "out", Stderr: "err", StdoutTruncated: true, DurationMS: 42,
				Artifacts: []executorapi.Artifact{
					{Path: "data.csv", SizeBytes: int64(len(content)), SHA256: sum},
					{Path: "data.csv", SizeBytes: int64(len(content)), SHA256: sum},
					{Path: "forged.bin", SizeBytes: 1, SHA256: sum},
					{Path: "../../etc/passwd", SizeBytes: 1, SHA256: sum},
				},
			}
			got, body := callbackTo(t, ta, cid, http.MethodPost, "/internal/executions/"+exec+"/result", "token-s1", jsonBody(res), nil)
			if got != tt.status {
				t.Fatalf("status = %d (%s), want %d", got, body, tt.status)
			}
			reports := ta.cp.reportsOf(exec)
			if tt.status != http.StatusOK {
				if len(reports) != 0 {
					t.Fatalf("reports = %v", reports)
				}
				return
			}
			if len(reports) != 1 {
				t.Fatalf("reports = %v", reports)
			}
			r := reports[0]
			if r.Kind != agentv1.ReportKind_REPORT_KIND_RESULT || r.State != tt.wantState || r.ExitCode != 3 || r.Stdout != "out" || r.Stderr != "err" ||
				!r.StdoutTruncated || r.StderrTruncated || r.DurationMs != 42 || r.SessionId != "s1" {
				t.Errorf("report = %v", r)
			}
			if len(r.Artifacts) != 1 || r.Artifacts[0].Path != "data.csv" || r.Artifacts[0].Sha256 != sum {
				t.Errorf("artifacts = %v", r.Artifacts)
			}
			if !strings.Contains(r.Error, `"forged.bin"`) || !strings.Contains(r.Error, `"../../etc/passwd"`) {
				t.Errorf("error %q does not name the dropped artifacts", r.Error)
			}
		})
	}
}

func TestContainerExitIsReported(t *testing.T) {
	ta := newTestAgent(t)
	cid := ta.start(t, "s1")
	ta.rt.exit(cid, 139)
	select {
	case e := <-ta.cp.exits:
		if e.SessionId != "s1" || e.AgentId != "agent-1" || !strings.Contains(e.Reason, "exit code 139") {
			t.Fatalf("ReportSessionExit = %v", e)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no ReportSessionExit")
	}
	eventually(t, "session to be released", func() bool {
		ta.mu.Lock()
		defer ta.mu.Unlock()
		return len(ta.sessions) == 0
	})
	if _, err := os.Stat(filepath.Join(ta.dataDir, "sockets", cid)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket dir still there: %v", err)
	}
	if !ta.rt.wasDestroyed(cid) {
		t.Error("exited container not removed")
	}
}

// TestRun checks start-up cleanup, serving on ListenAddr (h2c), /metrics,
// registration, and that every container is stopped on the way out.
func TestRun(t *testing.T) {
	ta := newTestAgent(t)
	// Left by a previous run: a labelled container and a stale socket dir.
	if _, err := ta.rt.Start(context.Background(), runtime.Spec{ID: "s-old", SocketDir: t.TempDir(), Labels: map[string]string{runtime.LabelAgent: "agent-1"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := ta.rt.Start(context.Background(), runtime.Spec{ID: "foreign", SocketDir: t.TempDir(), Labels: map[string]string{runtime.LabelAgent: "agent-2"}}); err != nil {
		t.Fatal(err)
	}
	stale := filepath.Join(ta.dataDir, "sockets", "s-old")
	if err := os.Mkdir(stale, 0o700); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	runErr := make(chan error, 1)
	go func() { runErr <- ta.Run(ctx) }()

	var reg *agentv1.RegisterAgentRequest
	select {
	case reg = <-ta.cp.registers:
	case <-time.After(10 * time.Second):
		t.Fatal("agent did not register")
	}
	if reg.AgentId != "agent-1" || reg.BootId == "" || reg.CpuMillis <= 0 || !strings.HasPrefix(reg.Address, "127.0.0.1:") {
		t.Fatalf("RegisterAgent = %v", reg)
	}
	// Registration repeats (registerInterval is short in tests) with the same boot id.
	select {
	case again := <-ta.cp.registers:
		if again.BootId != reg.BootId {
			t.Errorf("boot id changed within a run: %s -> %s", reg.BootId, again.BootId)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("agent did not register again")
	}
	if !ta.rt.wasDestroyed("s-old") || ta.rt.wasDestroyed("foreign") {
		t.Errorf("start-up cleanup: s-old destroyed %v, foreign destroyed %v", ta.rt.wasDestroyed("s-old"), ta.rt.wasDestroyed("foreign"))
	}
	if _, err := os.Stat(stale); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stale socket dir still there: %v", err)
	}

	// The served port speaks h2c: gRPC over cleartext HTTP/2.
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	h2c := &http.Client{Transport: &http.Transport{Protocols: &p}}
	client := agentv1connect.NewAgentServiceClient(h2c, "http://"+reg.Address, connect.WithGRPC(), api.WithBearer(testClusterToken))
	resp, err := client.StartSession(ctx, connect.NewRequest(startReq("run1")))
	if err != nil {
		t.Fatalf("StartSession over h2c gRPC: %v", err)
	}

	mresp, err := http.Get("http://" + reg.Address + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	metricsText, _ := io.ReadAll(mresp.Body)
	mresp.Body.Close()
	for _, name := range []string{"sandbox_agent_container_start_seconds", "sandbox_agent_sessions 1"} {
		if !strings.Contains(string(metricsText), name) {
			t.Errorf("/metrics lacks %q", name)
		}
	}

	// Idle clients would otherwise hold the HTTP/2 GOAWAY grace period.
	h2c.CloseIdleConnections()
	http.DefaultClient.CloseIdleConnections()
	cancel()
	select {
	case err := <-runErr:
		if err != nil {
			t.Fatalf("Run = %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return")
	}
	if !ta.rt.wasDestroyed(resp.Msg.ContainerId) {
		t.Error("Run left its container running")
	}
	ta.cp.mu.Lock()
	defer ta.cp.mu.Unlock()
	if ta.cp.badAuth != 0 {
		t.Errorf("%d control plane calls without the cluster token", ta.cp.badAuth)
	}
}

func TestNewValidatesConfig(t *testing.T) {
	base := func() Config {
		c := DefaultConfig()
		c.ID, c.DataDir, c.ClusterToken, c.Runtime = "a1", t.TempDir(), "tok", newFakeRuntime(t)
		c.Registry = prometheus.NewRegistry()
		return c
	}
	tests := []struct {
		name   string
		mutate func(*Config)
	}{
		{"no id", func(c *Config) { c.ID = "" }},
		{"bad id", func(c *Config) { c.ID = "a/b" }},
		{"no data dir", func(c *Config) { c.DataDir = "" }},
		{"no token", func(c *Config) { c.ClusterToken = "" }},
		{"no runtime", func(c *Config) { c.Runtime = nil }},
		{"no server", func(c *Config) { c.ServerURL = "" }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := base()
			tt.mutate(&c)
			if _, err := New(c); err == nil {
				t.Fatal("New accepted an invalid config")
			}
		})
	}
}

func assertMode(t *testing.T, path string, want os.FileMode) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode() & (os.ModeType | os.ModePerm); got != want {
		t.Errorf("%s mode = %v, want %v", path, got, want)
	}
}

func assertOwner(t *testing.T, path string, uid uint32) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st := fi.Sys().(*syscall.Stat_t); st.Uid != uid || st.Gid != uid {
		t.Errorf("%s owned by %d:%d, want %d:%d", path, st.Uid, st.Gid, uid, uid)
	}
}

// metricValue reads a gauge or counter value, or a histogram's sample count,
// of the series of name with exactly labels; 0 when there is none.
func metricValue(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	series:
		for _, m := range mf.GetMetric() {
			if len(m.GetLabel()) != len(labels) {
				continue
			}
			for _, lp := range m.GetLabel() {
				if labels[lp.GetName()] != lp.GetValue() {
					continue series
				}
			}
			switch {
			case m.GetGauge() != nil:
				return m.GetGauge().GetValue()
			case m.GetCounter() != nil:
				return m.GetCounter().GetValue()
			case m.GetHistogram() != nil:
				return float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return 0
}

// TestHandOverOutlivesItsCaller: a server that dies while the agent hands an
// execution to the executor (its call is canceled) does not abandon the
// hand-over: the executor gets it, it runs, and its result is relayed.
func TestHandOverOutlivesItsCaller(t *testing.T) {
	ta := newTestAgent(t)
	cid := ta.start(t, "s1")
	c, ok := ta.rt.container(cid)
	if !ok {
		t.Fatal("runtime has no container")
	}
	c.exec.slow = make(chan string)
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- ta.execute(ctx, "s1", "x1", "slow hand-over") }()
	select {
	case <-c.exec.slow:
	case <-time.After(10 * time.Second):
		t.Fatal("the executor never saw the hand-over")
	}
	cancel() // the calling server is gone
	if err := <-errc; connect.CodeOf(err) != connect.CodeCanceled {
		t.Fatalf("Execute = %v, want canceled", err)
	}
	close(c.exec.slow) // the executor answers now
	for _, kind := range []string{"status", "artifact", "result"} {
		select {
		case o := <-c.exec.outcomes:
			if o.kind != kind || o.status != http.StatusOK {
				t.Fatalf("callback %s answered %+v", kind, o)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no %s callback: the hand-over was abandoned with its caller", kind)
		}
	}
	if reports := ta.cp.reportsOf("x1"); len(reports) == 0 || reports[len(reports)-1].GetKind() != agentv1.ReportKind_REPORT_KIND_RESULT {
		t.Fatalf("reports of x1 = %v, want its result relayed", reports)
	}
}

// TestQuickResultLeavesNoPendingRecord: the pending record is written while
// the executor takes the execution, and a result that comes back before
// the write lands must still remove it: no stale pending execution (which a
// restarted agent would report, and a server would hand over again).
func TestQuickResultLeavesNoPendingRecord(t *testing.T) {
	ta := newTestAgent(t)
	cid := ta.start(t, "s1")
	c, ok := ta.rt.container(cid)
	if !ok {
		t.Fatal("runtime has no container")
	}
	for i := range 20 {
		id := fmt.Sprintf("q%d", i)
		if err := ta.execute(context.Background(), "s1", id, "print(1)"); err != nil {
			t.Fatalf("Execute %s: %v", id, err)
		}
		for _, kind := range []string{"status", "artifact", "result"} {
			select {
			case o := <-c.exec.outcomes:
				if o.kind != kind || o.status != http.StatusOK {
					t.Fatalf("%s: callback %s answered %+v", id, kind, o)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("%s: no %s callback", id, kind)
			}
		}
	}
	// settle runs after the relay answers the executor; give it a moment.
	deadline := time.Now().Add(5 * time.Second)
	for {
		recs, err := ta.db.Sessions()
		if err != nil {
			t.Fatal(err)
		}
		var pending []string
		for _, r := range recs {
			pending = append(pending, r.PendingExecutionIDs...)
		}
		if len(pending) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent.db still records pending executions %v after their results", pending)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

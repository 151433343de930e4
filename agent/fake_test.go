package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sandboxhq/sandbox/agent/runtime"
	"github.com/sandboxhq/sandbox/api"
	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1/agentv1connect"
	"github.com/sandboxhq/sandbox/executor/executorapi"
)

// fakeRuntime is an in-memory runtime.Runtime whose containers are a tiny
// fake executor serving <SocketDir>/executor.sock.
type fakeRuntime struct {
	t *testing.T

	mu         sync.Mutex
	containers map[string]*fakeContainer
	startErr   error
	// noExecutor starts containers whose executor never comes up.
	noExecutor bool
	// exitOnStart makes containers exit right after Start.
	exitOnStart bool
	// tcp runs executors on TCP, reported as Status.Endpoint, calling back
	// on the CONTROL_PLANE_URL of their env, as Kubernetes Pods do.
	tcp       bool
	destroyed []string
}

type fakeContainer struct {
	spec   runtime.Spec
	exec   *fakeExecutor
	exitCh chan runtime.ExitResult
	exited bool
	code   int
}

func newFakeRuntime(t *testing.T) *fakeRuntime {
	return &fakeRuntime{t: t, containers: map[string]*fakeContainer{}}
}

func (f *fakeRuntime) Start(_ context.Context, spec runtime.Spec) (runtime.Status, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.startErr != nil {
		return runtime.Status{}, f.startErr
	}
	if _, ok := f.containers[spec.ID]; ok {
		return runtime.Status{}, fmt.Errorf("container %s already exists", spec.ID)
	}
	c := &fakeContainer{spec: spec, exitCh: make(chan runtime.ExitResult, 1)}
	if !f.noExecutor && !f.exitOnStart {
		var e *fakeExecutor
		var err error
		if f.tcp {
			e, err = startFakeExecutorTCP(spec)
		} else {
			e, err = startFakeExecutor(spec.SocketDir)
		}
		if err != nil {
			return runtime.Status{}, err
		}
		c.exec = e
	}
	f.containers[spec.ID] = c
	if f.exitOnStart {
		c.exited, c.code = true, 2
		c.exitCh <- runtime.ExitResult{ExitCode: 2}
	}
	return c.status(spec.ID), nil
}

// status is what Inspect and List report of c.
func (c *fakeContainer) status(id string) runtime.Status {
	st := runtime.Status{ID: id, Labels: c.spec.Labels, Running: !c.exited, ExitCode: c.code}
	if c.exec != nil && c.exec.endpoint != "" && !c.exited {
		st.Endpoint = c.exec.endpoint
	}
	return st
}

func (f *fakeRuntime) Wait(_ context.Context, id string) (<-chan runtime.ExitResult, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c, ok := f.containers[id]
	if !ok {
		return nil, runtime.ErrNotFound
	}
	return c.exitCh, nil
}

// mute stops a container's executor from answering while the container
// keeps running, as a hung executor would.
func (f *fakeRuntime) mute(id string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if c, ok := f.containers[id]; ok && c.exec != nil {
		c.exec.close()
	}
}

// exit ends a container with code, as if its executor died.
func (f *fakeRuntime) exit(id string, code int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c, ok := f.containers[id]
	if !ok || c.exited {
		return
	}
	if c.exec != nil {
		c.exec.close()
	}
	c.exited, c.code = true, code
	c.exitCh <- runtime.ExitResult{ExitCode: code}
}

func (f *fakeRuntime) Stop(_ context.Context, id string, _ time.Duration) error {
	f.exit(id, 137)
	return nil
}

func (f *fakeRuntime) Destroy(_ context.Context, id string) error {
	f.exit(id, 137)
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.containers, id)
	f.destroyed = append(f.destroyed, id)
	return nil
}

func (f *fakeRuntime) Inspect(_ context.Context, id string) (runtime.Status, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c, ok := f.containers[id]
	if !ok {
		return runtime.Status{}, runtime.ErrNotFound
	}
	return c.status(id), nil
}

func (f *fakeRuntime) List(_ context.Context, match map[string]string) ([]runtime.Status, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []runtime.Status
next:
	for id, c := range f.containers {
		for k, v := range match {
			if c.spec.Labels[k] != v {
				continue next
			}
		}
		out = append(out, c.status(id))
	}
	return out, nil
}

func (f *fakeRuntime) Update(_ context.Context, id string, u runtime.Update) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	c, ok := f.containers[id]
	if !ok || c.exited {
		return runtime.ErrNotFound
	}
	if u.Limits != nil {
		c.spec.Limits = *u.Limits
	}
	labels := maps.Clone(c.spec.Labels)
	if labels == nil {
		labels = map[string]string{}
	}
	maps.Copy(labels, u.Labels)
	c.spec.Labels = labels
	return nil
}

func (f *fakeRuntime) container(id string) (*fakeContainer, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c, ok := f.containers[id]
	return c, ok
}

func (f *fakeRuntime) wasDestroyed(id string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, d := range f.destroyed {
		if d == id {
			return true
		}
	}
	return false
}

// fakeExecutor speaks the executor side of executorapi. On /execute it
// reports back through the agent's socket like the real one: status, one
// artifact, result (which also lists an artifact it never uploaded).
type fakeExecutor struct {
	srv       *http.Server
	socketDir string
	callbacks *http.Client
	// endpoint is where a TCP executor listens, and callbackURL where it
	// calls back; both empty on unix sockets.
	endpoint, callbackURL string
	wg                    sync.WaitGroup

	// release lets executions with code "hold" report; closed by releaseHeld or close.
	release     chan struct{}
	releaseOnce sync.Once
	// slow, when set, receives a "slow hand-over" execution's request, and
	// the executor answers it only once slow is closed.
	slow chan string

	mu       sync.Mutex
	init     *executorapi.InitRequest
	executed []executorapi.ExecuteRequest
	canceled []string
	// outcomes receives the agent's answer to every callback.
	outcomes chan callbackOutcome
}

type callbackOutcome struct {
	kind   string
	status int
}

func startFakeExecutor(socketDir string) (*fakeExecutor, error) {
	ln, err := net.Listen("unix", filepath.Join(socketDir, executorapi.ExecutorSocket))
	if err != nil {
		return nil, err
	}
	return serveFakeExecutor(ln, &fakeExecutor{socketDir: socketDir, callbacks: unixClient(filepath.Join(socketDir, executorapi.AgentSocket))}), nil
}

// startFakeExecutorTCP serves on loopback TCP and calls back on the
// spec's CONTROL_PLANE_URL.
func startFakeExecutorTCP(spec runtime.Spec) (*fakeExecutor, error) {
	var cp string
	for _, e := range spec.Env {
		if v, ok := strings.CutPrefix(e, "CONTROL_PLANE_URL="); ok {
			cp = v
		}
	}
	if !strings.HasPrefix(cp, "http://") {
		return nil, fmt.Errorf("container %s: CONTROL_PLANE_URL %q is not an http URL", spec.ID, cp)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	return serveFakeExecutor(ln, &fakeExecutor{callbacks: &http.Client{}, endpoint: ln.Addr().String(), callbackURL: cp}), nil
}

func serveFakeExecutor(ln net.Listener, e *fakeExecutor) *fakeExecutor {
	e.outcomes = make(chan callbackOutcome, 64)
	e.release = make(chan struct{})
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) {
		e.mu.Lock()
		defer e.mu.Unlock()
		writeJSON(w, http.StatusOK, executorapi.Health{Status: "ok", Initialized: e.init != nil})
	})
	mux.HandleFunc("POST /init", func(w http.ResponseWriter, r *http.Request) {
		var req executorapi.InitRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		e.mu.Lock()
		defer e.mu.Unlock()
		if e.init != nil {
			writeError(w, http.StatusConflict, "already initialized")
			return
		}
		e.init = &req
		writeJSON(w, http.StatusOK, executorapi.Health{Status: "ok", SessionID: req.SessionID, Initialized: true})
	})
	mux.HandleFunc("POST /execute", func(w http.ResponseWriter, r *http.Request) {
		token, ok := e.authorized(r)
		if !ok {
			writeError(w, http.StatusUnauthorized, "bad token")
			return
		}
		var req executorapi.ExecuteRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		if req.Code == "reject me" {
			writeError(w, http.StatusUnprocessableEntity, "the executor does not like this code")
			return
		}
		if req.Code == "slow hand-over" && e.slow != nil {
			e.slow <- req.ExecutionID
			for range e.slow {
			}
			// A caller that gave up closes the connection; the server notices
			// within moments. Then the executor never took it.
			select {
			case <-r.Context().Done():
				return
			case <-time.After(500 * time.Millisecond):
			}
		}
		e.mu.Lock()
		e.executed = append(e.executed, req)
		e.mu.Unlock()
		writeJSON(w, http.StatusAccepted, executorapi.ExecuteAccepted{ExecutionID: req.ExecutionID})
		e.wg.Add(1)
		go func() {
			defer e.wg.Done()
			if req.Code == "hold" {
				<-e.release
			}
			e.run(req, token)
		}()
	})
	mux.HandleFunc("POST /executions/{id}/cancel", func(w http.ResponseWriter, r *http.Request) {
		if _, ok := e.authorized(r); !ok {
			writeError(w, http.StatusUnauthorized, "bad token")
			return
		}
		e.mu.Lock()
		e.canceled = append(e.canceled, r.PathValue("id"))
		e.mu.Unlock()
		writeError(w, http.StatusNotFound, "execution "+r.PathValue("id")+" is unknown or finished")
	})
	e.srv = &http.Server{Handler: mux}
	go e.srv.Serve(ln)
	return e
}

func (e *fakeExecutor) authorized(r *http.Request) (string, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.init == nil {
		return "", false
	}
	return e.init.Token, r.Header.Get("Authorization") == "Bearer "+e.init.Token
}

// run plays one execution's callbacks.
func (e *fakeExecutor) run(req executorapi.ExecuteRequest, token string) {
	id := req.ExecutionID
	e.call("status", http.MethodPost, "/internal/executions/"+id+"/status", token, jsonBody(executorapi.StatusReport{State: executorapi.StateRunning}), nil)
	content := []byte("artifact of " + id)
	h := sha256.Sum256(content)
	sum := hex.EncodeToString(h[:])
	e.call("artifact", http.MethodPut, "/internal/executions/"+id+"/artifacts?path="+url.QueryEscape("out/result.txt"), token, content,
		http.Header{"X-Content-Sha256": {sum}})
	e.call("result", http.MethodPost, "/internal/executions/"+id+"/result", token, jsonBody(executorapi.Result{
		State:      executorapi.StateCompleted,
		ExitCode:   0,
		Stdout:     "hello\n",
		DurationMS: 12,
		Artifacts: []executorapi.Artifact{
			{Path: "out/result.txt", SizeBytes: int64(len(content)), SHA256: sum},
			{Path: "missing.txt", SizeBytes: 3, SHA256: sum},
		},
	}), nil)
}

func (e *fakeExecutor) call(kind, method, path, token string, body []byte, hdr http.Header) {
	base := "http://agent"
	if e.callbackURL != "" {
		base = strings.TrimSuffix(e.callbackURL, "/")
	}
	req, _ := http.NewRequest(method, base+path, bytes.NewReader(body))
	for k, v := range hdr {
		req.Header[k] = v
	}
	req.Header.Set("Authorization", "Bearer "+token)
	status := 0
	if resp, err := e.callbacks.Do(req); err == nil {
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		status = resp.StatusCode
	}
	e.outcomes <- callbackOutcome{kind: kind, status: status}
}

// releaseHeld lets the held executions report.
func (e *fakeExecutor) releaseHeld() { e.releaseOnce.Do(func() { close(e.release) }) }

// calls returns the executions and cancels the executor received.
func (e *fakeExecutor) calls() (executed []string, canceled []string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, x := range e.executed {
		executed = append(executed, x.ExecutionID)
	}
	return executed, slices.Clone(e.canceled)
}

func (e *fakeExecutor) close() {
	e.srv.Close()
	e.releaseHeld()
	e.wg.Wait()
	e.callbacks.CloseIdleConnections()
}

func (e *fakeExecutor) initRequest() *executorapi.InitRequest {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.init
}

func jsonBody(v any) []byte {
	b, _ := json.Marshal(v)
	return b
}

// unixClient is an HTTP client that dials one unix socket.
func unixClient(socket string) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}}
}

// fakeControlPlane records what the agent reports and can fail on demand.
type fakeControlPlane struct {
	agentv1connect.UnimplementedControlPlaneServiceHandler
	token string

	mu        sync.Mutex
	failNext  int          // ReportExecution calls to fail with failCode
	failCode  connect.Code // default Unavailable
	reports   []*agentv1.ReportExecutionRequest
	exits     chan *agentv1.ReportSessionExitRequest
	registers chan *agentv1.RegisterAgentRequest
	badAuth   int
}

func newFakeControlPlane(t *testing.T, token string) (*fakeControlPlane, string) {
	cp := &fakeControlPlane{
		token:     token,
		failCode:  connect.CodeUnavailable,
		exits:     make(chan *agentv1.ReportSessionExitRequest, 16),
		registers: make(chan *agentv1.RegisterAgentRequest, 64),
	}
	mux := http.NewServeMux()
	mux.Handle(agentv1connect.NewControlPlaneServiceHandler(cp))
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return cp, srv.URL
}

func (cp *fakeControlPlane) auth(h http.Header) error {
	if h.Get("Authorization") != "Bearer "+cp.token {
		cp.mu.Lock()
		cp.badAuth++
		cp.mu.Unlock()
		return connect.NewError(connect.CodeUnauthenticated, errors.New("bad cluster token"))
	}
	return nil
}

func (cp *fakeControlPlane) RegisterAgent(_ context.Context, req *connect.Request[agentv1.RegisterAgentRequest]) (*connect.Response[agentv1.RegisterAgentResponse], error) {
	if err := cp.auth(req.Header()); err != nil {
		return nil, err
	}
	select {
	case cp.registers <- req.Msg:
	default:
	}
	return connect.NewResponse(&agentv1.RegisterAgentResponse{}), nil
}

func (cp *fakeControlPlane) ReportExecution(_ context.Context, req *connect.Request[agentv1.ReportExecutionRequest]) (*connect.Response[agentv1.ReportExecutionResponse], error) {
	if err := cp.auth(req.Header()); err != nil {
		return nil, err
	}
	cp.mu.Lock()
	defer cp.mu.Unlock()
	if cp.failNext > 0 {
		cp.failNext--
		return nil, connect.NewError(cp.failCode, errors.New("injected failure"))
	}
	cp.reports = append(cp.reports, req.Msg)
	return connect.NewResponse(&agentv1.ReportExecutionResponse{}), nil
}

func (cp *fakeControlPlane) ReportSessionExit(_ context.Context, req *connect.Request[agentv1.ReportSessionExitRequest]) (*connect.Response[agentv1.ReportSessionExitResponse], error) {
	if err := cp.auth(req.Header()); err != nil {
		return nil, err
	}
	cp.exits <- req.Msg
	return connect.NewResponse(&agentv1.ReportSessionExitResponse{}), nil
}

func (cp *fakeControlPlane) fail(n int, code connect.Code) {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	cp.failNext, cp.failCode = n, code
}

// reportsOf returns the recorded reports of an execution.
func (cp *fakeControlPlane) reportsOf(executionID string) []*agentv1.ReportExecutionRequest {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	var out []*agentv1.ReportExecutionRequest
	for _, r := range cp.reports {
		if r.ExecutionId == executionID {
			out = append(out, r)
		}
	}
	return out
}

// testAgent is an agent wired to a fake runtime and a fake control plane,
// its AgentService served by httptest.
type testAgent struct {
	*Agent
	rt       *fakeRuntime
	cp       *fakeControlPlane
	cpURL    string
	client   agentv1connect.AgentServiceClient
	url      string
	http     *http.Client
	dataDir  string
	registry *prometheus.Registry
}

const testClusterToken = "cluster-secret"

func newTestAgent(t *testing.T, opts ...func(*Config)) *testAgent {
	t.Helper()
	// Short paths: unix socket paths are limited to 107 bytes.
	dataDir, err := os.MkdirTemp("", "agt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dataDir) })
	rt := newFakeRuntime(t)
	cp, cpURL := newFakeControlPlane(t, testClusterToken)
	return newTestAgentOn(t, dataDir, rt, cp, cpURL, opts...)
}

// newTestAgentOn builds an agent on an existing data directory, runtime and
// control plane: the same host after a restart.
func newTestAgentOn(t *testing.T, dataDir string, rt *fakeRuntime, cp *fakeControlPlane, cpURL string, opts ...func(*Config)) *testAgent {
	t.Helper()
	cfg := DefaultConfig()
	cfg.ID = "agent-1"
	cfg.DataDir = dataDir
	cfg.ListenAddr = "127.0.0.1:0"
	cfg.ServerURL = cpURL
	cfg.ClusterToken = testClusterToken
	cfg.Runtime = rt
	cfg.Registry = prometheus.NewRegistry()
	for _, o := range opts {
		o(&cfg)
	}
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a.healthTimeout = 5 * time.Second
	a.adoptHealthTimeout = time.Second
	a.relayBackoff = time.Millisecond
	a.registerInterval = 50 * time.Millisecond
	srv := httptest.NewServer(a.Handler())
	t.Cleanup(srv.Close)
	t.Cleanup(a.shutdown)
	return &testAgent{
		Agent:    a,
		rt:       rt,
		cp:       cp,
		cpURL:    cpURL,
		client:   agentv1connect.NewAgentServiceClient(srv.Client(), srv.URL, api.WithBearer(testClusterToken)),
		url:      srv.URL,
		http:     srv.Client(),
		dataDir:  dataDir,
		registry: cfg.Registry,
	}
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// crash ends the agent as kill -9 would: no container is stopped, no record
// is deleted and the callback sockets stay on disk, stale. Its goroutines
// end and agent.db is closed, so that a new agent can open it.
func (ta *testAgent) crash(t *testing.T) {
	t.Helper()
	a := ta.Agent
	var dirs []string
	a.shutOnce.Do(func() {
		a.mu.Lock()
		a.closed = true
		var servers []*http.Server
		for _, s := range a.sessions {
			dirs = append(dirs, s.dir)
			if s.callback != nil {
				servers = append(servers, s.callback)
			}
		}
		a.mu.Unlock()
		for _, srv := range servers {
			srv.Close()
		}
		a.cancel()
		a.wg.Wait()
		if err := a.db.Close(); err != nil {
			t.Errorf("close agent.db: %v", err)
		}
	})
	// Closing the listeners removed the socket files; a killed process leaves them.
	for _, dir := range dirs {
		l, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(dir, executorapi.AgentSocket), Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		l.SetUnlinkOnClose(false)
		l.Close()
	}
}

// restart crashes the agent and builds a new one on the same host; call run
// on it to start it.
func (ta *testAgent) restart(t *testing.T) *testAgent {
	t.Helper()
	ta.crash(t)
	return newTestAgentOn(t, ta.dataDir, ta.rt, ta.cp, ta.cpURL)
}

// run runs the agent until the test ends and returns once it registered,
// which it does after its start-up recovery.
func (ta *testAgent) run(t *testing.T) {
	t.Helper()
	for len(ta.cp.registers) > 0 {
		<-ta.cp.registers
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ta.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run = %v", err)
		}
	})
	select {
	case <-ta.cp.registers:
	case err := <-done:
		done <- err
		t.Fatalf("Run ended before registering: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("agent did not register")
	}
}

package executor_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sandboxhq/sandbox/executor/executorapi"
	"github.com/sandboxhq/sandbox/internal/testenv"
)

// These tests run the real executor binary, built here, as uid 1000 (as in
// a container) with real bubblewrap, and a callback server standing in for
// the agent. Its sockets live under /run/sandbox-test-*, which the sandbox
// hides with the same --tmpfs /run that hides /run/sandbox in production.

const sandboxUID = 1000

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
	// binDir holds the binary; TestMain removes it.
	binDir string
	// mountPointMu guards createdMountPoint: whether these tests created
	// /workspace on the host, so that TestMain removes it again.
	mountPointMu      sync.Mutex
	createdMountPoint bool
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	if createdMountPoint {
		os.Remove("/workspace") // only if still empty
	}
	os.Exit(code)
}

// executorBinary builds cmd/sandbox-executor statically, once per test run.
func executorBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "sandbox-executor-bin-")
		if buildErr != nil {
			return
		}
		if buildErr = os.Chmod(binDir, 0o755); buildErr != nil {
			return
		}
		binPath = filepath.Join(binDir, "sandbox-executor")
		cmd := exec.Command("go", "build", "-o", binPath, "github.com/sandboxhq/sandbox/cmd/sandbox-executor")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// requireSandboxHost checks what the integration tests need and makes sure
// the /workspace mount point exists in the host's root filesystem, as it
// does in the template images (bwrap cannot create it on a read-only root).
func requireSandboxHost(t *testing.T) string {
	t.Helper()
	testenv.RequireRoot(t)
	bwrap := testenv.RequireBinary(t, "bwrap")
	testenv.RequireBinary(t, "python3")
	mountPointMu.Lock()
	defer mountPointMu.Unlock()
	if _, err := os.Stat("/workspace"); os.IsNotExist(err) {
		if err := os.Mkdir("/workspace", 0o755); err != nil {
			t.Fatalf("create the /workspace mount point: %v", err)
		}
		createdMountPoint = true
	}
	return bwrap
}

// ---- the callback server standing in for the agent ----

type uploaded struct {
	Body   []byte
	Header string // X-Content-Sha256
}

type callbacks struct {
	token string

	mu          sync.Mutex
	statuses    map[string][]string
	heartbeats  map[string]int
	artifacts   map[string]map[string]uploaded
	results     map[string][]executorapi.Result
	failResults map[string]int // answer 503 to this many result posts first
	authFailed  int
	order       map[string][]string // callback kinds in arrival order
}

func newCallbacks(token string) *callbacks {
	return &callbacks{
		token:       token,
		statuses:    map[string][]string{},
		heartbeats:  map[string]int{},
		artifacts:   map[string]map[string]uploaded{},
		results:     map[string][]executorapi.Result{},
		failResults: map[string]int{},
		order:       map[string][]string{},
	}
}

func (c *callbacks) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Authorization") != "Bearer "+c.token {
		c.mu.Lock()
		c.authFailed++
		c.mu.Unlock()
		http.Error(w, `{"error":"bad token"}`, http.StatusUnauthorized)
		return
	}
	rest, ok := strings.CutPrefix(r.URL.Path, "/internal/executions/")
	if !ok {
		http.NotFound(w, r)
		return
	}
	id, kind, _ := strings.Cut(rest, "/")
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.order[id] = append(c.order[id], kind)
	switch kind {
	case "status":
		var s executorapi.StatusReport
		if err := json.Unmarshal(body, &s); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		c.statuses[id] = append(c.statuses[id], s.State)
	case "heartbeat":
		c.heartbeats[id]++
	case "artifacts":
		if c.artifacts[id] == nil {
			c.artifacts[id] = map[string]uploaded{}
		}
		c.artifacts[id][r.URL.Query().Get("path")] = uploaded{Body: body, Header: r.Header.Get("X-Content-Sha256")}
	case "result":
		if c.failResults[id] > 0 {
			c.failResults[id]--
			http.Error(w, `{"error":"agent hiccup"}`, http.StatusServiceUnavailable)
			return
		}
		var res executorapi.Result
		if err := json.Unmarshal(body, &res); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		c.results[id] = append(c.results[id], res)
	default:
		http.NotFound(w, r)
		return
	}
	w.WriteHeader(http.StatusOK)
}

// waitResult polls until the execution's result arrives.
func (c *callbacks) waitResult(t *testing.T, id string, within time.Duration) executorapi.Result {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		c.mu.Lock()
		rs := c.results[id]
		c.mu.Unlock()
		if len(rs) > 0 {
			if len(rs) > 1 {
				t.Errorf("execution %s: %d results, want 1", id, len(rs))
			}
			return rs[0]
		}
		if time.Now().After(deadline) {
			t.Fatalf("execution %s: no result within %s", id, within)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (c *callbacks) waitHeartbeat(t *testing.T, id string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		c.mu.Lock()
		n := c.heartbeats[id]
		c.mu.Unlock()
		if n > 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("execution %s: no heartbeat within %s", id, within)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// ---- the executor under test ----

type harness struct {
	t         *testing.T
	ws        string
	sockDir   string
	execSock  string
	agentSock string
	token     string
	cb        *callbacks
	client    *http.Client
	cmd       *exec.Cmd
	exited    chan struct{}
	logs      *syncBuffer
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// chownAll hands paths to the sandbox user.
func chownAll(t *testing.T, paths ...string) {
	t.Helper()
	for _, p := range paths {
		if err := os.Chown(p, sandboxUID, sandboxUID); err != nil {
			t.Fatal(err)
		}
	}
}

// startExecutor starts the executor binary as uid 1000. presetToken goes
// into INTERNAL_API_TOKEN when non-empty; the callback server always
// expects token.
// startExecutor starts the executor binary; env entries (KEY=VALUE) go
// after the harness's own, so they override them.
func startExecutor(t *testing.T, token, presetToken string, env ...string) *harness {
	t.Helper()
	bwrap := requireSandboxHost(t)
	bin := executorBinary(t)

	base, err := os.MkdirTemp("", "executor-it-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	ws := filepath.Join(base, "workspace")
	if err := os.Mkdir(ws, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	sockDir, err := os.MkdirTemp("/run", "sandbox-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	chownAll(t, base, ws, sockDir)

	h := &harness{
		t: t, ws: ws, sockDir: sockDir, token: token,
		execSock:  filepath.Join(sockDir, executorapi.ExecutorSocket),
		agentSock: filepath.Join(sockDir, executorapi.AgentSocket),
		cb:        newCallbacks(token),
		exited:    make(chan struct{}),
		logs:      &syncBuffer{},
	}

	ln, err := net.Listen("unix", h.agentSock)
	if err != nil {
		t.Fatal(err)
	}
	chownAll(t, h.agentSock)
	srv := &http.Server{Handler: h.cb, ReadHeaderTimeout: 10 * time.Second}
	served := make(chan struct{})
	go func() { defer close(served); _ = srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		<-served
	})

	cmd := exec.Command(bin)
	cmd.Env = []string{
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"WORKSPACE_PATH=" + ws,
		"CONTROL_PLANE_URL=unix://" + h.agentSock,
		"EXECUTOR_SOCKET=" + h.execSock,
		"LOG_LEVEL=debug",
		"BWRAP_PATH=" + bwrap,
		"EXECUTOR_HEARTBEAT_INTERVAL=200ms",
		"EXECUTOR_STATUS_DELAY=0", // every execution reports RUNNING
	}
	if presetToken != "" {
		cmd.Env = append(cmd.Env, "INTERNAL_API_TOKEN="+presetToken)
	}
	cmd.Env = append(cmd.Env, env...)
	cmd.Dir = ws
	cmd.Stdout = h.logs
	cmd.Stderr = h.logs
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential: &syscall.Credential{Uid: sandboxUID, Gid: sandboxUID},
		Pdeathsig:  syscall.SIGKILL,
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	h.cmd = cmd
	go func() { _ = cmd.Wait(); close(h.exited) }()
	t.Cleanup(func() {
		h.stop(10 * time.Second)
		if t.Failed() {
			t.Logf("executor logs:\n%s", h.logs.String())
		}
	})

	h.client = &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", h.execSock)
		},
	}, Timeout: 10 * time.Second}

	deadline := time.Now().Add(15 * time.Second)
	for {
		resp, err := h.client.Get("http://executor/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		select {
		case <-h.exited:
			t.Fatalf("executor exited at start:\n%s", h.logs.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("executor not healthy within 15s: %v\n%s", err, h.logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return h
}

// stop sends SIGTERM and waits for the executor to exit, killing it if it does not.
func (h *harness) stop(within time.Duration) bool {
	select {
	case <-h.exited:
		return true
	default:
	}
	_ = h.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-h.exited:
		return true
	case <-time.After(within):
		_ = h.cmd.Process.Kill()
		<-h.exited
		return false
	}
}

// call sends a JSON request to the executor with the given bearer token
// ("" for none) and decodes the answer into out when out is non-nil.
func (h *harness) call(method, path, bearer string, in, out any) int {
	h.t.Helper()
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			h.t.Fatal(err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, "http://executor"+path, body)
	if err != nil {
		h.t.Fatal(err)
	}
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	resp, err := h.client.Do(req)
	if err != nil {
		h.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			h.t.Fatalf("%s %s: decode %q: %v", method, path, b, err)
		}
	}
	return resp.StatusCode
}

func (h *harness) init(env map[string]string) {
	h.t.Helper()
	if code := h.call("POST", "/init", h.token, executorapi.InitRequest{SessionID: "sess-1", Token: h.token, Env: env}, nil); code != http.StatusOK {
		h.t.Fatalf("init: status %d", code)
	}
}

// execute submits an execution and expects 202.
func (h *harness) execute(req executorapi.ExecuteRequest) {
	h.t.Helper()
	var e executorapi.Error
	if code := h.call("POST", "/execute", h.token, req, &e); code != http.StatusAccepted {
		h.t.Fatalf("execute %s: status %d: %s", req.ExecutionID, code, e.Error)
	}
}

// run submits an execution and waits for its result.
func (h *harness) run(id, lang, code string, timeout int, env map[string]string) executorapi.Result {
	h.t.Helper()
	h.execute(executorapi.ExecuteRequest{ExecutionID: id, Language: lang, Code: code, TimeoutSeconds: timeout, Env: env})
	return h.cb.waitResult(h.t, id, 60*time.Second)
}

// processesWithEnv lists processes whose environment holds marker.
func processesWithEnv(marker string) []int {
	entries, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/environ")
		if err == nil && bytes.Contains(b, []byte(marker)) {
			out = append(out, pid)
		}
	}
	return out
}

// zombiesOf lists the zombie children of ppid.
func zombiesOf(ppid int) []int {
	entries, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range entries {
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) > 1 && f[0] == "Z" && f[1] == strconv.Itoa(ppid) {
			pid, _ := strconv.Atoi(e.Name())
			out = append(out, pid)
		}
	}
	return out
}

// pollUntil polls cond until it holds or the deadline passes.
func pollUntil(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, within)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// ---- the tests ----

func TestExecutorRunsCode(t *testing.T) {
	h := startExecutor(t, "tok-run", "")
	h.init(map[string]string{"SESSION_VAR": "from-session"})

	cases := []struct {
		name, lang, code string
		needs            string
		stdout, stderr   string
		exit             int
		errContains      string
	}{
		{name: "python", lang: "python", code: "print(6*7)", stdout: "42\n"},
		{name: "python exit code", lang: "python", code: "import sys; sys.exit(3)", exit: 3},
		{name: "bash", lang: "bash", code: "echo hi; echo oops >&2; exit 5", stdout: "hi\n", stderr: "oops\n", exit: 5},
		{name: "node", lang: "node", needs: "node", code: "console.log(6*7)", stdout: "42\n"},
		{name: "killed by signal", lang: "bash", code: "kill -SEGV $$", exit: 128 + int(syscall.SIGSEGV), errContains: "SIGSEGV"},
		{name: "big code", lang: "python", code: "x = 1\n" + strings.Repeat("x += 1\n", 100_000) + "print(x)", stdout: "100001\n"},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.needs != "" {
				testenv.RequireBinary(t, tc.needs)
			}
			h.t = t
			id := fmt.Sprintf("run-%d", i)
			res := h.run(id, tc.lang, tc.code, 30, nil)
			if res.State != executorapi.StateCompleted || res.ExitCode != tc.exit {
				t.Fatalf("state %s exit %d, want COMPLETED %d (stderr %q, error %q)", res.State, res.ExitCode, tc.exit, res.Stderr, res.Error)
			}
			if res.Stdout != tc.stdout || res.Stderr != tc.stderr {
				t.Errorf("stdout %q stderr %q, want %q %q", res.Stdout, res.Stderr, tc.stdout, tc.stderr)
			}
			if tc.errContains == "" && res.Error != "" || !strings.Contains(res.Error, tc.errContains) {
				t.Errorf("error %q, want it to contain %q", res.Error, tc.errContains)
			}
			h.cb.mu.Lock()
			order := h.cb.order[id]
			statuses := h.cb.statuses[id]
			h.cb.mu.Unlock()
			if len(statuses) != 1 || statuses[0] != executorapi.StateRunning || order[len(order)-1] != "result" {
				t.Errorf("callbacks %v, statuses %v: want RUNNING status and result last", order, statuses)
			}
		})
	}
	h.cb.mu.Lock()
	if h.cb.authFailed > 0 {
		t.Errorf("%d callbacks carried a wrong token", h.cb.authFailed)
	}
	h.cb.mu.Unlock()
}

// TestExecutorStatusDelay: with a status delay, an execution that ends
// sooner reports only its result; one that runs longer reports RUNNING
// first.
func TestExecutorStatusDelay(t *testing.T) {
	h := startExecutor(t, "tok-status", "", "EXECUTOR_STATUS_DELAY=300ms")
	h.init(nil)
	for _, tc := range []struct {
		id, code string
		statuses int
	}{
		{"quick", "true", 0},
		{"slow", "sleep 1.5", 1},
	} {
		res := h.run(tc.id, "bash", tc.code, 30, nil)
		if res.State != executorapi.StateCompleted {
			t.Fatalf("%s: state %s (%s), want COMPLETED", tc.id, res.State, res.Error)
		}
		h.cb.mu.Lock()
		statuses, order := h.cb.statuses[tc.id], h.cb.order[tc.id]
		h.cb.mu.Unlock()
		if len(statuses) != tc.statuses || order[len(order)-1] != "result" {
			t.Errorf("%s: callbacks %v, statuses %v; want %d RUNNING status(es), the result last", tc.id, order, statuses, tc.statuses)
		}
	}
}

func TestExecutorTimeoutKillsEverything(t *testing.T) {
	h := startExecutor(t, "tok-timeout", "")
	h.init(nil)
	marker := fmt.Sprintf("MARKER_%d=timeout", time.Now().UnixNano())
	name, value, _ := strings.Cut(marker, "=")
	// A busy loop, plus a child in the background that would outlive a
	// careless kill.
	code := "import subprocess\nsubprocess.Popen(['sleep', '1000'])\nwhile True: pass\n"
	start := time.Now()
	res := h.run("timeout-1", "python", code, 2, map[string]string{name: value})
	if res.State != executorapi.StateTimedOut {
		t.Fatalf("state %s (error %q), want TIMED_OUT", res.State, res.Error)
	}
	if took := time.Since(start); took > 30*time.Second {
		t.Errorf("timed out after %s, want about 2s", took)
	}
	pollUntil(t, 10*time.Second, "all sandbox processes gone", func() bool { return len(processesWithEnv(marker)) == 0 })
	pollUntil(t, 10*time.Second, "no zombie children of the executor", func() bool { return len(zombiesOf(h.cmd.Process.Pid)) == 0 })

	res = h.run("timeout-2", "python", "print('still fine')", 10, nil)
	if res.State != executorapi.StateCompleted || res.Stdout != "still fine\n" {
		t.Fatalf("after a timeout: state %s stdout %q error %q", res.State, res.Stdout, res.Error)
	}
}

func TestExecutorCancel(t *testing.T) {
	h := startExecutor(t, "tok-cancel", "")
	h.init(nil)
	h.execute(executorapi.ExecuteRequest{ExecutionID: "cancel-1", Language: "python",
		Code: "import time\nprint('started')\ntime.sleep(600)\n", TimeoutSeconds: 600})
	h.cb.waitHeartbeat(t, "cancel-1", 30*time.Second)
	if code := h.call("POST", "/executions/cancel-1/cancel", h.token, nil, nil); code != http.StatusAccepted {
		t.Fatalf("cancel: status %d, want 202", code)
	}
	res := h.cb.waitResult(t, "cancel-1", 30*time.Second)
	if res.State != executorapi.StateCanceled || res.Stdout != "started\n" {
		t.Fatalf("state %s stdout %q error %q, want CANCELED after 'started'", res.State, res.Stdout, res.Error)
	}
	pollUntil(t, 10*time.Second, "cancel of a finished execution is 404", func() bool {
		return h.call("POST", "/executions/cancel-1/cancel", h.token, nil, nil) == http.StatusNotFound
	})
}

func TestExecutorArtifacts(t *testing.T) {
	h := startExecutor(t, "tok-art", "")
	h.init(nil)
	// The agent hiccups twice on the result: retries must deliver it.
	h.cb.mu.Lock()
	h.cb.failResults["art-1"] = 2
	h.cb.mu.Unlock()

	pre := filepath.Join(h.ws, "untouched.txt")
	if err := os.WriteFile(pre, []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	chownAll(t, pre)
	code := `
import os
open("/workspace/out.txt", "w").write("hello artifact\n")
os.makedirs("/workspace/sub/dir", exist_ok=True)
open("/workspace/sub/dir/data.bin", "wb").write(bytes(range(256)) * 1000)
os.symlink("/etc/passwd", "/workspace/link")
os.symlink("/etc", "/workspace/etc-link")
os.mkfifo("/workspace/fifo")
`
	res := h.run("art-1", "python", code, 30, nil)
	if res.State != executorapi.StateCompleted || res.ExitCode != 0 {
		t.Fatalf("state %s exit %d stderr %q error %q", res.State, res.ExitCode, res.Stderr, res.Error)
	}
	want := map[string][]byte{
		"out.txt": []byte("hello artifact\n"),
		"sub/dir/data.bin": bytes.Repeat(func() []byte {
			b := make([]byte, 256)
			for i := range b {
				b[i] = byte(i)
			}
			return b
		}(), 1000),
	}
	got := map[string]executorapi.Artifact{}
	for _, a := range res.Artifacts {
		got[a.Path] = a
	}
	if len(got) != len(want) {
		t.Errorf("artifacts %+v, want exactly %v", res.Artifacts, []string{"out.txt", "sub/dir/data.bin"})
	}
	h.cb.mu.Lock()
	ups := h.cb.artifacts["art-1"]
	h.cb.mu.Unlock()
	passwd, _ := os.ReadFile("/etc/passwd")
	for p, body := range ups {
		if bytes.Equal(body.Body, passwd) {
			t.Errorf("uploaded %s with the contents of /etc/passwd", p)
		}
	}
	for p, content := range want {
		a, ok := got[p]
		if !ok {
			t.Errorf("artifact %s missing", p)
			continue
		}
		if a.SizeBytes != int64(len(content)) || a.SHA256 != sha(content) {
			t.Errorf("artifact %s: size %d sha %s, want %d %s", p, a.SizeBytes, a.SHA256, len(content), sha(content))
		}
		up, ok := ups[p]
		if !ok || !bytes.Equal(up.Body, content) || up.Header != sha(content) {
			t.Errorf("upload of %s: present %v, %d bytes, header %q; want the file's bytes and sha", p, ok, len(up.Body), up.Header)
		}
	}

	// A second execution reports only what it changed.
	res = h.run("art-2", "bash", "echo more >> out.txt", 30, nil)
	if len(res.Artifacts) != 1 || res.Artifacts[0].Path != "out.txt" || res.Artifacts[0].SizeBytes != int64(len("hello artifact\nmore\n")) {
		t.Errorf("second execution artifacts %+v, want only the grown out.txt", res.Artifacts)
	}
}

func TestExecutorOutputCap(t *testing.T) {
	h := startExecutor(t, "tok-cap", "")
	h.init(nil)
	code := "import sys\nsys.stdout.write('x' * (3 << 20))\nsys.stderr.write('y' * 10)\n"
	res := h.run("cap-1", "python", code, 60, nil)
	if res.State != executorapi.StateCompleted || res.ExitCode != 0 {
		t.Fatalf("state %s exit %d error %q", res.State, res.ExitCode, res.Error)
	}
	if len(res.Stdout) != executorapi.MaxOutputBytes || !res.StdoutTruncated {
		t.Errorf("stdout %d bytes truncated %v, want %d and true", len(res.Stdout), res.StdoutTruncated, executorapi.MaxOutputBytes)
	}
	if res.Stderr != strings.Repeat("y", 10) || res.StderrTruncated {
		t.Errorf("stderr %q truncated %v", res.Stderr, res.StderrTruncated)
	}
}

func TestExecutorIsolation(t *testing.T) {
	h := startExecutor(t, "tok-iso", "tok-iso")
	h.init(map[string]string{"SESSION_VAR": "from-session", "SHADOWED": "session"})
	code := `
import json, os, socket, sys
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "allowed"
    except Exception as e:
        out[name] = "denied: " + type(e).__name__
attempt("read_kcore", lambda: open("/proc/kcore", "rb").read(1))
attempt("write_hostname", lambda: open("/proc/sys/kernel/hostname", "w").write("evil"))
attempt("write_root", lambda: open("/etc/evil", "w").write("x"))
attempt("kill_executor", lambda: os.kill(int(os.environ["EXECUTOR_PID"]), 9))
for name in ("executor", "agent"):
    path = os.environ[name.upper() + "_SOCK"]
    out[name + "_socket_visible"] = os.path.exists(path) or os.path.exists(os.path.dirname(path))
    def connect(path=path):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
    attempt("connect_" + name, connect)
out["run"] = sorted(os.listdir("/run"))
out["env"] = dict(os.environ)
out["hostname"] = socket.gethostname()
out["cwd"] = os.getcwd()
print(json.dumps(out))
`
	res := h.run("iso-1", "python", code, 30, map[string]string{
		"EXEC_VAR":      "from-exec",
		"SHADOWED":      "exec",
		"EXECUTOR_PID":  strconv.Itoa(h.cmd.Process.Pid),
		"EXECUTOR_SOCK": h.execSock,
		"AGENT_SOCK":    h.agentSock,
	})
	if res.State != executorapi.StateCompleted || res.ExitCode != 0 {
		t.Fatalf("state %s exit %d stderr %q error %q", res.State, res.ExitCode, res.Stderr, res.Error)
	}
	var out struct {
		ReadKcore       string            `json:"read_kcore"`
		WriteHostname   string            `json:"write_hostname"`
		WriteRoot       string            `json:"write_root"`
		KillExecutor    string            `json:"kill_executor"`
		ExecutorVisible bool              `json:"executor_socket_visible"`
		AgentVisible    bool              `json:"agent_socket_visible"`
		ConnectExecutor string            `json:"connect_executor"`
		ConnectAgent    string            `json:"connect_agent"`
		Run             []string          `json:"run"`
		Env             map[string]string `json:"env"`
		Hostname        string            `json:"hostname"`
		Cwd             string            `json:"cwd"`
	}
	if err := json.Unmarshal([]byte(res.Stdout), &out); err != nil {
		t.Fatalf("decode %q: %v", res.Stdout, err)
	}
	for name, v := range map[string]string{
		"read /proc/kcore":                out.ReadKcore,
		"write /proc/sys/kernel/hostname": out.WriteHostname,
		"write /etc":                      out.WriteRoot,
		"kill the executor":               out.KillExecutor,
		"connect to the executor":         out.ConnectExecutor,
		"connect to the agent":            out.ConnectAgent,
	} {
		if !strings.HasPrefix(v, "denied") {
			t.Errorf("user code could %s: %s", name, v)
		}
	}
	if out.ExecutorVisible || out.AgentVisible {
		t.Errorf("socket directory visible to user code (executor %v, agent %v)", out.ExecutorVisible, out.AgentVisible)
	}
	if len(out.Run) != 1 || out.Run[0] != "code" {
		t.Errorf("/run holds %v, want only the code directory", out.Run)
	}
	wantEnv := map[string]string{
		"PATH":             "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME":             "/workspace",
		"LANG":             "C.UTF-8",
		"PYTHONUNBUFFERED": "1",
		"SESSION_VAR":      "from-session",
		"EXEC_VAR":         "from-exec",
		"SHADOWED":         "exec",
	}
	for k, v := range wantEnv {
		if out.Env[k] != v {
			t.Errorf("env %s=%q, want %q", k, out.Env[k], v)
		}
	}
	for _, k := range []string{"INTERNAL_API_TOKEN", "CONTROL_PLANE_URL", "WORKSPACE_PATH", "EXECUTOR_SOCKET", "BWRAP_PATH", "LOG_LEVEL"} {
		if v, ok := out.Env[k]; ok {
			t.Errorf("user code sees %s=%q", k, v)
		}
	}
	for _, v := range out.Env {
		if strings.Contains(v, h.token) {
			t.Errorf("the token leaks into the env: %q", v)
		}
	}
	if out.Hostname != "sandbox" || out.Cwd != "/workspace" {
		t.Errorf("hostname %q cwd %q, want sandbox and /workspace", out.Hostname, out.Cwd)
	}
	select {
	case <-h.exited:
		t.Fatal("the executor died")
	default:
	}
}

// TestExecutorSeccomp: the filter bubblewrap installs for user code refuses
// with EPERM what the container had to allow bubblewrap and what reaches
// into other processes or the kernel, while ordinary processes still work.
// With --seccomp taken out of bwrap's arguments this test fails (the calls
// are then made, and the script dies of one of them).
func TestExecutorSeccomp(t *testing.T) {
	h := startExecutor(t, "tok-seccomp", "")
	h.init(nil)
	code := fmt.Sprintf(`
import ctypes, errno, fcntl, json, os
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def call(name, fn):
    ctypes.set_errno(0)
    rc = fn()
    out[name] = "ok" if rc >= 0 else errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
call("ptrace", lambda: libc.ptrace(0, 0, 0, 0))                   # PTRACE_TRACEME
call("keyctl", lambda: libc.syscall(%d, 0, -3, 0, 0, 0))          # KEYCTL_GET_KEYRING_ID, session keyring
call("add_key", lambda: libc.syscall(%d, b"user", b"k", b"v", 1, -3))
call("bpf", lambda: libc.syscall(%d, 0, 0, 0))
call("perf_event_open", lambda: libc.syscall(%d, 0, 0, -1, -1, 0))
call("unshare_user", lambda: libc.unshare(0x10000000))
call("unshare_net", lambda: libc.unshare(0x40000000))
call("mount", lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None))
call("umount", lambda: libc.umount2(b"/workspace", 2))
call("pivot_root", lambda: libc.syscall(%d, b"/tmp", b"/tmp"))
call("chroot", lambda: libc.chroot(b"/tmp"))
call("sethostname", lambda: libc.sethostname(b"evil", 4))
def tiocsti():
    try:
        fcntl.ioctl(0, %d, b"x")
        return 0
    except OSError as e:
        ctypes.set_errno(e.errno)
        return -1
call("tiocsti", tiocsti)
pid = os.fork()
if pid == 0:
    os._exit(7)
out["fork"] = os.waitpid(pid, 0)[1] >> 8
print(json.dumps(out))
`, unix.SYS_KEYCTL, unix.SYS_ADD_KEY, unix.SYS_BPF, unix.SYS_PERF_EVENT_OPEN, unix.SYS_PIVOT_ROOT, unix.TIOCSTI)
	res := h.run("seccomp-1", "python", code, 30, nil)
	if res.State != executorapi.StateCompleted || res.ExitCode != 0 {
		t.Fatalf("state %s exit %d stderr %q error %q", res.State, res.ExitCode, res.Stderr, res.Error)
	}
	var out map[string]any
	if err := json.Unmarshal([]byte(res.Stdout), &out); err != nil {
		t.Fatalf("decode %q: %v", res.Stdout, err)
	}
	for _, name := range []string{"ptrace", "keyctl", "add_key", "bpf", "perf_event_open", "unshare_user", "unshare_net",
		"mount", "umount", "pivot_root", "chroot", "sethostname", "tiocsti"} {
		if out[name] != "EPERM" {
			t.Errorf("%s: %v, want EPERM", name, out[name])
		}
	}
	if out["fork"] != float64(7) {
		t.Errorf("fork and wait: %v, want the child's status 7 (processes still work)", out["fork"])
	}
}

func TestExecutorInitAndAuth(t *testing.T) {
	h := startExecutor(t, "tok-init", "")
	var e executorapi.Error
	if code := h.call("POST", "/execute", "", executorapi.ExecuteRequest{ExecutionID: "a", Language: "python", Code: "print(1)"}, &e); code != http.StatusConflict || !strings.Contains(e.Error, "not initialized") {
		t.Errorf("execute before init: %d %q, want 409 naming the missing init", code, e.Error)
	}
	if code := h.call("POST", "/init", "", executorapi.InitRequest{SessionID: "s"}, &e); code != http.StatusBadRequest {
		t.Errorf("init without a token: %d, want 400", code)
	}
	h.init(nil)
	var health executorapi.Health
	if code := h.call("GET", "/health", "", nil, &health); code != http.StatusOK || !health.Initialized || health.SessionID != "sess-1" {
		t.Errorf("health after init: %d %+v", code, health)
	}
	if code := h.call("POST", "/init", h.token, executorapi.InitRequest{SessionID: "s2", Token: "other"}, nil); code != http.StatusConflict {
		t.Errorf("second init: %d, want 409", code)
	}
	req := executorapi.ExecuteRequest{ExecutionID: "auth-1", Language: "python", Code: "print(1)"}
	for _, bearer := range []string{"", "wrong"} {
		if code := h.call("POST", "/execute", bearer, req, nil); code != http.StatusUnauthorized {
			t.Errorf("execute with bearer %q: %d, want 401", bearer, code)
		}
	}
	if code := h.call("POST", "/execute", h.token, executorapi.ExecuteRequest{ExecutionID: "auth-2", Language: "cobol", Code: "x"}, &e); code != http.StatusBadRequest || !strings.Contains(e.Error, "cobol") {
		t.Errorf("unknown language: %d %q", code, e.Error)
	}
}

func TestExecutorShutdownKillsExecutions(t *testing.T) {
	h := startExecutor(t, "tok-term", "")
	h.init(nil)
	marker := fmt.Sprintf("MARKER_%d=term", time.Now().UnixNano())
	name, value, _ := strings.Cut(marker, "=")
	h.execute(executorapi.ExecuteRequest{ExecutionID: "term-1", Language: "bash", Code: "sleep 1000 & sleep 1000", TimeoutSeconds: 600,
		Env: map[string]string{name: value}})
	h.cb.waitHeartbeat(t, "term-1", 30*time.Second)
	if !h.stop(30 * time.Second) {
		t.Fatal("executor did not exit on SIGTERM")
	}
	if ws, ok := h.cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || ws.ExitStatus() != 0 {
		t.Errorf("executor exit status %v, want 0", h.cmd.ProcessState)
	}
	res := h.cb.waitResult(t, "term-1", 5*time.Second)
	if res.State != executorapi.StateCanceled {
		t.Errorf("state %s, want CANCELED", res.State)
	}
	pollUntil(t, 10*time.Second, "all sandbox processes gone", func() bool { return len(processesWithEnv(marker)) == 0 })
	if _, err := os.Stat(h.execSock); !os.IsNotExist(err) {
		t.Errorf("executor socket left behind: %v", err)
	}
}

func TestExecutorConcurrentExecutions(t *testing.T) {
	h := startExecutor(t, "tok-conc", "")
	h.init(nil)
	// Each waits until all have started (a file per execution in the shared
	// workspace), so they can only finish if they run at the same time.
	const n = 3
	code := `
import os, sys, time
open("/workspace/started-" + os.environ["ME"], "w").close()
deadline = time.time() + 60
while len([f for f in os.listdir("/workspace") if f.startswith("started-")]) < %d:
    if time.time() > deadline:
        sys.exit("not concurrent")
    time.sleep(0.05)
print("together")
`
	for i := range n {
		h.execute(executorapi.ExecuteRequest{ExecutionID: fmt.Sprintf("conc-%d", i), Language: "python",
			Code: fmt.Sprintf(code, n), TimeoutSeconds: 120, Env: map[string]string{"ME": strconv.Itoa(i)}})
	}
	for i := range n {
		res := h.cb.waitResult(t, fmt.Sprintf("conc-%d", i), 90*time.Second)
		if res.State != executorapi.StateCompleted || res.ExitCode != 0 || res.Stdout != "together\n" {
			t.Errorf("conc-%d: %s exit %d stdout %q stderr %q", i, res.State, res.ExitCode, res.Stdout, res.Stderr)
		}
	}
}

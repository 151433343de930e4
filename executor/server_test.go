package executor

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sandboxhq/sandbox/executor/executorapi"
)

// fakeAgent records the results posted to it.
type fakeAgent struct {
	mu      sync.Mutex
	results map[string]executorapi.Result
	posts   map[string]int // result posts by execution id
	auth    []string
}

func (a *fakeAgent) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.auth = append(a.auth, r.Header.Get("Authorization"))
	if id, ok := strings.CutSuffix(strings.TrimPrefix(r.URL.Path, "/internal/executions/"), "/result"); ok {
		var res executorapi.Result
		if err := json.NewDecoder(r.Body).Decode(&res); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		a.results[id] = res
		a.posts[id]++
	}
}

func (a *fakeAgent) result(t *testing.T, id string) executorapi.Result {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		a.mu.Lock()
		res, ok := a.results[id]
		a.mu.Unlock()
		if ok {
			return res
		}
		if time.Now().After(deadline) {
			t.Fatalf("no result for %s", id)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// newTestExecutor builds an executor whose bwrap does not exist, so every
// execution ends FAILED without running anything.
func newTestExecutor(t *testing.T, token string) (*Executor, *fakeAgent) {
	t.Helper()
	agent := &fakeAgent{results: map[string]executorapi.Result{}, posts: map[string]int{}}
	srv := httptest.NewServer(agent)
	t.Cleanup(srv.Close)
	cfg := DefaultConfig()
	cfg.WorkspacePath = t.TempDir()
	cfg.ControlPlaneURL = srv.URL
	cfg.BwrapPath = "/nonexistent/bwrap"
	cfg.Token = token
	cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	e, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	return e, agent
}

func do(t *testing.T, h http.Handler, method, path, bearer, body string) (int, string) {
	t.Helper()
	req := httptest.NewRequest(method, path, strings.NewReader(body))
	if bearer != "" {
		req.Header.Set("Authorization", "Bearer "+bearer)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec.Code, rec.Body.String()
}

func jsonOf(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestExecuteValidation(t *testing.T) {
	e, agent := newTestExecutor(t, "")
	h := e.Handler()
	if code, body := do(t, h, "POST", "/init", "", jsonOf(t, executorapi.InitRequest{SessionID: "s", Token: "tok"})); code != http.StatusOK {
		t.Fatalf("init: %d %s", code, body)
	}
	code, body := do(t, h, "POST", "/execute", "tok", jsonOf(t, executorapi.ExecuteRequest{ExecutionID: "ok-1", Language: "python", Code: "print(1)"}))
	if code != http.StatusAccepted {
		t.Fatalf("valid execute: %d %s", code, body)
	}
	// bwrap is missing: FAILED with an error saying so.
	if res := agent.result(t, "ok-1"); res.State != executorapi.StateFailed || !strings.Contains(res.Error, "/nonexistent/bwrap") || res.Artifacts == nil {
		t.Errorf("result %+v, want FAILED naming bwrap, with an empty artifact list", res)
	}

	req := func(mod func(*executorapi.ExecuteRequest)) string {
		r := executorapi.ExecuteRequest{ExecutionID: "x-1", Language: "python", Code: "print(1)", TimeoutSeconds: 5}
		mod(&r)
		return jsonOf(t, r)
	}
	cases := []struct {
		name   string
		body   string
		status int
		want   string
	}{
		{"unknown language", req(func(r *executorapi.ExecuteRequest) { r.Language = "cobol" }), 400, "cobol"},
		{"negative timeout", req(func(r *executorapi.ExecuteRequest) { r.TimeoutSeconds = -1 }), 400, "timeout_seconds"},
		{"timeout over the maximum", req(func(r *executorapi.ExecuteRequest) { r.TimeoutSeconds = 1 << 40 }), 400, "timeout_seconds"},
		{"missing id", req(func(r *executorapi.ExecuteRequest) { r.ExecutionID = "" }), 400, "execution_id is required"},
		{"id with a slash", req(func(r *executorapi.ExecuteRequest) { r.ExecutionID = "../x" }), 400, "execution_id"},
		{"bad env name", req(func(r *executorapi.ExecuteRequest) { r.Env = map[string]string{"A=B": "x"} }), 400, "env"},
		{"NUL in env value", req(func(r *executorapi.ExecuteRequest) { r.Env = map[string]string{"A": "x\x00y"} }), 400, "NUL"},
		{"code too big", req(func(r *executorapi.ExecuteRequest) { r.Code = strings.Repeat("#", 1<<20+1) }), 400, "code is"},
		{"not JSON", "{", 400, "not valid JSON"},
		{"body too big", `{"code":"` + strings.Repeat("a", maxExecuteBody) + `"}`, 413, "larger than"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			code, body := do(t, h, "POST", "/execute", "tok", tc.body)
			var e executorapi.Error
			if err := json.Unmarshal([]byte(body), &e); err != nil {
				t.Fatalf("error body %q is not JSON: %v", body, err)
			}
			if code != tc.status || !strings.Contains(e.Error, tc.want) {
				t.Errorf("got %d %q, want %d containing %q", code, e.Error, tc.status, tc.want)
			}
		})
	}
	// A hand-over of a taken id (its first answer was lost) is accepted
	// again and runs nothing: still one result.
	code, body = do(t, h, "POST", "/execute", "tok", req(func(r *executorapi.ExecuteRequest) { r.ExecutionID = "ok-1" }))
	var acc executorapi.ExecuteAccepted
	if err := json.Unmarshal([]byte(body), &acc); err != nil || code != 202 || !acc.Duplicate || acc.ExecutionID != "ok-1" {
		t.Errorf("duplicate id: got %d %s, want 202 with duplicate set", code, body)
	}
	time.Sleep(200 * time.Millisecond) // a run would fail at once (no bwrap) and post
	agent.mu.Lock()
	n := agent.posts["ok-1"]
	agent.mu.Unlock()
	if n != 1 {
		t.Errorf("%d results for ok-1 after its duplicate, want 1", n)
	}
}

func TestAuthAndInit(t *testing.T) {
	exec := jsonOf(t, executorapi.ExecuteRequest{ExecutionID: "e-1", Language: "bash", Code: "true"})
	t.Run("no token yet", func(t *testing.T) {
		e, _ := newTestExecutor(t, "")
		h := e.Handler()
		steps := []struct {
			method, path, bearer, body string
			status                     int
		}{
			{"GET", "/health", "", "", 200},
			{"POST", "/execute", "", exec, 409},
			{"POST", "/init", "", jsonOf(t, executorapi.InitRequest{SessionID: "s"}), 400}, // no token anywhere
			{"POST", "/init", "", jsonOf(t, executorapi.InitRequest{Token: "tok"}), 400},   // no session
			{"POST", "/init", "", jsonOf(t, executorapi.InitRequest{SessionID: "s", Token: "tok"}), 200},
			{"POST", "/init", "tok", jsonOf(t, executorapi.InitRequest{SessionID: "s2", Token: "tok"}), 409},
			{"POST", "/execute", "", exec, 401},
			{"POST", "/execute", "tok2", exec, 401},
			{"POST", "/execute", "to", exec, 401},
			{"POST", "/executions/e-1/cancel", "", "", 401},
			{"POST", "/executions/nope/cancel", "tok", "", 404},
			{"GET", "/health", "", "", 200},
			{"GET", "/nowhere", "", "", 404},
			{"POST", "/execute", "tok", exec, 202},
		}
		for i, s := range steps {
			if code, body := do(t, h, s.method, s.path, s.bearer, s.body); code != s.status {
				t.Errorf("step %d %s %s (bearer %q): %d %s, want %d", i, s.method, s.path, s.bearer, code, body, s.status)
			}
		}
	})
	t.Run("preset token", func(t *testing.T) {
		e, agent := newTestExecutor(t, "preset")
		h := e.Handler()
		steps := []struct {
			method, path, bearer, body string
			status                     int
		}{
			{"GET", "/health", "", "", 200},
			{"POST", "/init", "", jsonOf(t, executorapi.InitRequest{SessionID: "s"}), 401},
			{"POST", "/execute", "preset", exec, 409},
			{"POST", "/init", "preset", jsonOf(t, executorapi.InitRequest{SessionID: "s"}), 200},
			{"POST", "/execute", "preset", exec, 202},
		}
		for i, s := range steps {
			if code, body := do(t, h, s.method, s.path, s.bearer, s.body); code != s.status {
				t.Errorf("step %d %s %s: %d %s, want %d", i, s.method, s.path, code, body, s.status)
			}
		}
		agent.result(t, "e-1")
		agent.mu.Lock()
		defer agent.mu.Unlock()
		for _, a := range agent.auth {
			if a != "Bearer preset" {
				t.Errorf("callback carried %q", a)
			}
		}
	})
}

func TestTokenMatches(t *testing.T) {
	cases := []struct {
		header string
		want   bool
	}{
		{"Bearer secret", true},
		{"Bearer secreT", false},
		{"Bearer secret ", false},
		{"bearer secret", false},
		{"secret", false},
		{"", false},
		{"Bearer ", false},
	}
	for _, tc := range cases {
		if got := tokenMatches(tc.header, "secret"); got != tc.want {
			t.Errorf("tokenMatches(%q) = %v, want %v", tc.header, got, tc.want)
		}
	}
}

func TestHealthReportsSession(t *testing.T) {
	e, _ := newTestExecutor(t, "")
	h := e.Handler()
	do(t, h, "POST", "/init", "", jsonOf(t, executorapi.InitRequest{SessionID: "sess-9", Token: "t"}))
	_, body := do(t, h, "GET", "/health", "", "")
	var got executorapi.Health
	if err := json.NewDecoder(bytes.NewReader([]byte(body))).Decode(&got); err != nil {
		t.Fatal(err)
	}
	if got.Status != "ok" || !got.Initialized || got.SessionID != "sess-9" {
		t.Errorf("health %+v", got)
	}
}

// TestRunListens serves on a unix socket and on TCP, and stops when its
// context ends.
func TestRunListens(t *testing.T) {
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := strconv.Itoa(free.Addr().(*net.TCPAddr).Port)
	free.Close()
	sock := filepath.Join(t.TempDir(), "executor.sock")
	cases := []struct {
		name string
		mod  func(*Config)
		dial func(ctx context.Context, _, _ string) (net.Conn, error)
	}{
		{"unix", func(c *Config) { c.Socket = sock }, func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		}},
		{"tcp", func(c *Config) { c.Host, c.Port = "127.0.0.1", port }, func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "tcp", "127.0.0.1:"+port)
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := DefaultConfig()
			cfg.WorkspacePath = t.TempDir()
			cfg.ControlPlaneURL = "http://127.0.0.1:1"
			cfg.BwrapPath = "/nonexistent/bwrap"
			cfg.Logger = quietLog()
			tc.mod(&cfg)
			e, err := New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- e.Run(ctx) }()
			client := &http.Client{Transport: &http.Transport{DialContext: tc.dial}, Timeout: 5 * time.Second}
			deadline := time.Now().Add(10 * time.Second)
			for {
				resp, err := client.Get("http://executor/health")
				if err == nil {
					resp.Body.Close()
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("never healthy: %v", err)
				}
				time.Sleep(10 * time.Millisecond)
			}
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("Run: %v", err)
				}
			case <-time.After(30 * time.Second):
				t.Fatal("Run did not return")
			}
			if tc.name == "unix" {
				if _, err := os.Stat(sock); !os.IsNotExist(err) {
					t.Errorf("socket left behind: %v", err)
				}
			}
		})
	}
}

package runtimetest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sandboxhq/sandbox/agent/runtime"
	"github.com/sandboxhq/sandbox/executor/executorapi"
)

// executorEnv is the executor's environment as the agent gives it.
var executorEnv = []string{
	"WORKSPACE_PATH=/workspace",
	"CONTROL_PLANE_URL=unix://" + executorapi.SocketDir + "/" + executorapi.AgentSocket,
	"EXECUTOR_SOCKET=" + executorapi.SocketDir + "/" + executorapi.ExecutorSocket,
	"GOMAXPROCS=1",
}

// callbacks is the agent's side of a container's socket directory: it
// serves the callback socket and hands over the results it receives.
type callbacks struct {
	token   string
	results chan executorapi.Result
	// denied counts callbacks without the session's token.
	denied chan string
}

func serveCallbacks(t *testing.T, dir, token string) *callbacks {
	t.Helper()
	path := filepath.Join(dir, executorapi.AgentSocket)
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatalf("listen on the callback socket: %v", err)
	}
	// The executor (uid 1000) must be able to connect.
	if err := os.Chown(path, 1000, 1000); err != nil {
		t.Fatal(err)
	}
	cb := &callbacks{token: token, results: make(chan executorapi.Result, 4), denied: make(chan string, 4)}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer "+cb.token {
			cb.denied <- r.URL.Path
			http.Error(w, `{"error":"bad token"}`, http.StatusUnauthorized)
			return
		}
		if strings.HasSuffix(r.URL.Path, "/result") {
			var res executorapi.Result
			if err := json.NewDecoder(r.Body).Decode(&res); err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			cb.results <- res
		}
		_, _ = io.Copy(io.Discard, r.Body)
		w.WriteHeader(http.StatusOK)
	})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })
	return cb
}

// executorClient calls the executor on its socket in dir.
func executorClient(dir string) *http.Client {
	sock := filepath.Join(dir, executorapi.ExecutorSocket)
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
}

// call sends one JSON request and decodes a 2xx answer into out.
func call(ctx context.Context, c *http.Client, method, path, token string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://executor"+path, body)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, bytes.TrimSpace(b))
	}
	if out != nil {
		return json.Unmarshal(b, out)
	}
	return nil
}

// startWarm starts a container of the image's own executor as the agent's
// warm pool does (no session, no token, the pool's label), and waits until
// it answers /health.
func (s *suite) startWarm(t *testing.T, pool string) runtime.Spec {
	t.Helper()
	spec := s.spec(t)
	spec.Env = executorEnv
	spec.Labels = map[string]string{runtime.LabelAgent: s.agent, runtime.LabelWarm: pool}
	spec.LogPath = filepath.Join(t.TempDir(), "executor.log")
	s.start(t, spec)
	c := executorClient(spec.SocketDir)
	deadline := time.Now().Add(30 * time.Second)
	for {
		var h executorapi.Health
		err := call(t.Context(), c, http.MethodGet, "/health", "", nil, &h)
		if err == nil && h.Status == "ok" && !h.Initialized {
			return spec
		}
		if time.Now().After(deadline) {
			logs, _ := os.ReadFile(spec.LogPath)
			t.Fatalf("warm executor %s not healthy after 30s (%+v, %v); its log:\n%s", spec.ID, h, err, logs)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// testExecutor: the image's executor, started as a warm container, serves
// /health on its socket; a claim (new limits and the session's label, then
// /init with the session's token) makes it run code under bubblewrap and
// report the result on the callback socket with that token; the pool
// refills with a new container beside the claimed one; List tells warm
// from claimed; Destroy leaves nothing.
func (s *suite) testExecutor(t *testing.T) {
	s.needsKernel(t)
	s.needsSocketDir(t)
	pool := "pool-" + randomHex(4)
	first := s.startWarm(t, pool)

	// Claim it.
	session, token := "ses-"+randomHex(4), randomHex(16)
	cb := serveCallbacks(t, first.SocketDir, token)
	limits := first.Limits
	limits.MemoryMiB += 64
	if err := s.h.Runtime.Update(t.Context(), first.ID, runtime.Update{Limits: &limits, Labels: map[string]string{runtime.LabelSession: session}}); err != nil {
		t.Fatalf("claim: Update: %v", err)
	}
	c := executorClient(first.SocketDir)
	var h executorapi.Health
	if err := call(t.Context(), c, http.MethodPost, "/init", "", executorapi.InitRequest{SessionID: session, Token: token, Env: map[string]string{"GREETING": "hello"}}, &h); err != nil {
		t.Fatalf("claim: /init: %v", err)
	}
	if !h.Initialized || h.SessionID != session {
		t.Fatalf("/init answered %+v, want initialized for %s", h, session)
	}
	if err := call(t.Context(), c, http.MethodPost, "/execute", "wrong-token", executorapi.ExecuteRequest{ExecutionID: "exe-refused", Language: "python", Code: "print(1)", TimeoutSeconds: 10}, nil); err == nil {
		t.Error("/execute with a wrong token was accepted")
	}
	req := executorapi.ExecuteRequest{
		ExecutionID: "exe-" + randomHex(4), Language: "python", TimeoutSeconds: 30,
		Code: "import os\nprint(6 * 7, os.environ['GREETING'], os.getuid())\nopen('out.txt', 'w').write('x')",
	}
	if err := call(t.Context(), c, http.MethodPost, "/execute", token, req, nil); err != nil {
		t.Fatalf("/execute: %v", err)
	}

	// Refill while the claimed one runs.
	second := s.startWarm(t, pool)

	select {
	case res := <-cb.results:
		if res.State != executorapi.StateCompleted || res.ExitCode != 0 || res.Stdout != "42 hello 1000\n" {
			t.Errorf("result %+v, want COMPLETED, exit 0, stdout %q", res, "42 hello 1000\n")
		}
		if len(res.Artifacts) != 1 || res.Artifacts[0].Path != "out.txt" {
			t.Errorf("artifacts %+v, want out.txt", res.Artifacts)
		}
	case path := <-cb.denied:
		t.Fatalf("the executor called back on %s without the session's token", path)
	case <-time.After(time.Minute):
		logs, _ := os.ReadFile(first.LogPath)
		t.Fatalf("no result within a minute; the executor's log:\n%s", logs)
	}

	warm, err := s.h.Runtime.List(t.Context(), map[string]string{runtime.LabelWarm: pool})
	if err != nil {
		t.Fatal(err)
	}
	var unclaimed []string
	for _, st := range warm {
		if st.Labels[runtime.LabelSession] == "" {
			unclaimed = append(unclaimed, st.ID)
		}
	}
	if len(warm) != 2 || len(unclaimed) != 1 || unclaimed[0] != second.ID {
		t.Errorf("pool %s lists %d containers with unclaimed %v, want 2 with only %s unclaimed", pool, len(warm), unclaimed, second.ID)
	}
	claimed, err := s.h.Runtime.List(t.Context(), map[string]string{runtime.LabelSession: session})
	if err != nil || len(claimed) != 1 || claimed[0].ID != first.ID || !claimed[0].Running {
		t.Errorf("List by session = %+v, %v; want %s running", claimed, err, first.ID)
	}

	for _, spec := range []runtime.Spec{first, second} {
		if err := s.h.Runtime.Destroy(t.Context(), spec.ID); err != nil {
			t.Fatalf("Destroy %s: %v", spec.ID, err)
		}
		if s.h.Leftovers != nil {
			if err := s.h.Leftovers(t.Context(), spec.ID); err != nil {
				t.Errorf("after Destroy: %v", err)
			}
		}
	}
}

package containerd_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/agent/runtime"
	"github.com/sandboxhq/sandbox/agent/runtime/containerd"
	"github.com/sandboxhq/sandbox/executor/executorapi"
)

// TestExecLatency measures Execute of print(1) and echo 1 in one running
// container, from POST /execute to the result callback, as the agent sees
// it. A measurement, not a test: it runs only when SANDBOX_EXEC_LATENCY=N
// (executions per language) is set; SANDBOX_FOOTPRINT_ENV adds to the
// executor's environment, e.g. GOMAXPROCS=2.
func TestExecLatency(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("SANDBOX_EXEC_LATENCY"))
	if n <= 0 {
		t.Skip("a measurement: set SANDBOX_EXEC_LATENCY=N to run it")
	}
	rt, image := newRuntime(t, containerd.Config{})
	dir := filepath.Join(t.TempDir(), "s")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, 1000, 1000); err != nil {
		t.Fatal(err)
	}
	results := serveAgent(t, dir)
	spec := runtime.Spec{
		ID:        fmt.Sprintf("execlat-%d", time.Now().UnixNano()%1e6),
		Image:     image,
		Limits:    sandbox.DefaultLimits,
		SocketDir: dir,
		Env: []string{
			"WORKSPACE_PATH=/workspace",
			"CONTROL_PLANE_URL=unix://" + executorapi.SocketDir + "/" + executorapi.AgentSocket,
			"EXECUTOR_SOCKET=" + executorapi.SocketDir + "/" + executorapi.ExecutorSocket,
			"LOG_LEVEL=info",
		},
		LogPath: filepath.Join(dir, "..", "executor.log"),
	}
	if e := os.Getenv("SANDBOX_FOOTPRINT_ENV"); e != "" {
		spec.Env = append(spec.Env, strings.Split(e, ",")...)
	}
	if _, err := rt.Start(t.Context(), spec); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rt.Destroy(context.Background(), spec.ID) })
	waitHealth(t, dir, spec.LogPath)
	client := unixClient(filepath.Join(dir, executorapi.ExecutorSocket))
	const token = "measure-token"
	post(t, client, "/init", token, executorapi.InitRequest{SessionID: "ses-measure", Token: token})
	for _, lang := range []struct{ name, code string }{{"python", "print(1)"}, {"bash", "echo 1"}} {
		var d []time.Duration
		for i := range n + 3 {
			id := fmt.Sprintf("%s-%d", lang.name, i)
			begin := time.Now()
			post(t, client, "/execute", token, executorapi.ExecuteRequest{ExecutionID: id, Language: lang.name, Code: lang.code, TimeoutSeconds: 30})
			select {
			case res := <-results:
				if res.State != executorapi.StateCompleted || strings.TrimSpace(res.Stdout) != "1" {
					t.Fatalf("%s: %+v", id, res)
				}
			case <-time.After(30 * time.Second):
				t.Fatalf("%s: no result", id)
			}
			if i >= 3 { // the first few warm the page cache
				d = append(d, time.Since(begin))
			}
		}
		t.Logf("Execute %s: %s", lang.name, percentiles(d))
	}
}

// serveAgent answers the executor's callbacks on the agent socket in dir
// and delivers each result.
func serveAgent(t *testing.T, dir string) <-chan executorapi.Result {
	sock := filepath.Join(dir, executorapi.AgentSocket)
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(sock, 1000, 1000); err != nil {
		t.Fatal(err)
	}
	results := make(chan executorapi.Result, 1)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/result") {
			var res executorapi.Result
			if err := json.NewDecoder(r.Body).Decode(&res); err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			results <- res
		}
		w.WriteHeader(http.StatusOK)
	})}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { srv.Close() })
	return results
}

func unixClient(sock string) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
}

func post(t *testing.T, c *http.Client, path, token string, body any) {
	b, err := json.Marshal(body)
	if err != nil {
		t.Fatal(err)
	}
	req, err := http.NewRequest(http.MethodPost, "http://executor"+path, bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		t.Fatalf("POST %s: %s", path, resp.Status)
	}
}

package agent

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"connectrpc.com/connect"
	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/executor/executorapi"
)

// newTCPTestAgent is a test agent whose runtime reports TCP endpoints and
// whose executors call back on its TCP callback listener, as on Kubernetes.
func newTCPTestAgent(t *testing.T) (*testAgent, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	ta := newTestAgent(t, func(c *Config) {
		c.CallbackListen, c.CallbackURL = addr, "http://"+addr
	})
	ta.rt.tcp = true
	stop, err := ta.serveCallbacksTCP()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	return ta, "http://" + addr
}

// TestTCPTransport: with a runtime that reports TCP endpoints, the agent
// reaches executors there (health, /init, /execute), gives them the TCP
// callback URL, and serves their callbacks on one listener, each for the
// session whose token it carries.
func TestTCPTransport(t *testing.T) {
	ta, url := newTCPTestAgent(t)
	srv := ta.client
	ctx := context.Background()
	if _, err := srv.StartSession(ctx, connect.NewRequest(startReq("s1"))); err != nil {
		t.Fatalf("StartSession: %v", err)
	}
	if _, err := srv.StartSession(ctx, connect.NewRequest(startReq("s2"))); err != nil {
		t.Fatalf("StartSession: %v", err)
	}
	c, ok := ta.rt.container("s-s1")
	if !ok {
		t.Fatal("no container s-s1")
	}
	if !slices.Contains(c.spec.Env, "CONTROL_PLANE_URL="+url) {
		t.Errorf("executor env %v lacks CONTROL_PLANE_URL=%s", c.spec.Env, url)
	}
	// No unix callback socket is bound when callbacks come over TCP.
	if _, err := os.Stat(filepath.Join(c.spec.SocketDir, executorapi.AgentSocket)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("callback socket in %s: %v, want none", c.spec.SocketDir, err)
	}
	c.exec.mu.Lock()
	inited := c.exec.init != nil && c.exec.init.Token == "token-s1"
	c.exec.mu.Unlock()
	if !inited {
		t.Fatal("the executor on TCP was not initialised with the session's token")
	}

	if _, err := srv.Execute(ctx, connect.NewRequest(&agentv1.ExecuteRequest{
		ExecutionId: "e1", SessionId: "s1", Language: "python", Code: "print('hello')", TimeoutSeconds: 10,
	})); err != nil {
		t.Fatalf("Execute: %v", err)
	}
	for _, kind := range []string{"status", "artifact", "result"} {
		select {
		case o := <-c.exec.outcomes:
			if o.kind != kind || o.status != http.StatusOK {
				t.Fatalf("callback %s over TCP answered %+v", kind, o)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no %s callback", kind)
		}
	}
	reports := ta.cp.reportsOf("e1")
	if len(reports) != 2 || reports[1].State != sandboxv1.ExecutionState_EXECUTION_STATE_COMPLETED || reports[1].SessionId != "s1" {
		t.Fatalf("reports = %v", reports)
	}

	ta.markExecution("s2", "e2")
	status := jsonBody(executorapi.StatusReport{State: executorapi.StateRunning})
	for _, tt := range []struct {
		name, path, token string
		want              int
	}{
		{"no token", "/internal/executions/e2/status", "", http.StatusUnauthorized},
		{"unknown token", "/internal/executions/e2/status", "token-nobody", http.StatusUnauthorized},
		{"another session's execution", "/internal/executions/e2/status", "token-s1", http.StatusNotFound},
		{"own", "/internal/executions/e2/status", "token-s2", http.StatusOK},
	} {
		req, _ := http.NewRequest(http.MethodPost, url+tt.path, bytes.NewReader(status))
		if tt.token != "" {
			req.Header.Set("Authorization", "Bearer "+tt.token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tt.want {
			t.Errorf("%s: %d (%s), want %d", tt.name, resp.StatusCode, body, tt.want)
		}
	}
}

package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"connectrpc.com/grpchealth"

	"github.com/sandboxhq/sandbox/api"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/v1/sandboxv1connect"
	"github.com/sandboxhq/sandbox/internal/testenv"
)

// TestPlatform walks the skeleton's acceptance list on one real cluster.
func TestPlatform(t *testing.T) {
	c := startCluster(t)

	t.Run("exec python prints and exits 0", func(t *testing.T) {
		out, errs, code := c.ctl("", "exec", "--template", "python-basic", "-c", "print(6*7)")
		if out != "42\n" || code != 0 {
			t.Fatalf("stdout %q, exit %d, stderr %q; want 42 and 0", out, code, errs)
		}
	})
	t.Run("exec exit code passes through", func(t *testing.T) {
		_, errs, code := c.ctl("", "exec", "--template", "python-basic", "-c", "import sys; sys.exit(3)")
		if code != 3 {
			t.Fatalf("exit %d (stderr %q), want 3", code, errs)
		}
	})
	t.Run("exec node", func(t *testing.T) {
		out, errs, code := c.ctl("", "exec", "--template", "nodejs-basic", "--language", "node", "-c", "console.log(6*7)")
		if out != "42\n" || code != 0 {
			t.Fatalf("stdout %q, exit %d, stderr %q", out, code, errs)
		}
	})
	t.Run("exec bash from stdin", func(t *testing.T) {
		out, errs, code := c.ctl("echo $((6*7)); echo err >&2", "exec", "--template", "python-basic", "--language", "bash", "-")
		if out != "42\n" || code != 0 || !strings.Contains(errs, "err") {
			t.Fatalf("stdout %q, exit %d, stderr %q", out, code, errs)
		}
	})

	t.Run("artifacts listed, downloadable after terminate, symlinks not followed", func(t *testing.T) {
		s := c.createSession(&sandboxv1.CreateSessionRequest{TemplateId: "python-basic"})
		e := c.execute(&sandboxv1.ExecuteRequest{SessionId: s.GetId(), Language: "python", Code: `
import os
open("/workspace/out.txt", "w").write("hello artifact\n")
os.symlink("/etc/passwd", "/workspace/link")
print("done")`})
		if e.GetState() != sandboxv1.ExecutionState_EXECUTION_STATE_COMPLETED || e.GetExitCode() != 0 {
			t.Fatalf("execution %v exit %d: %s %s", e.GetState(), e.GetExitCode(), e.GetStderr(), e.GetStateReason())
		}
		want := sha256.Sum256([]byte("hello artifact\n"))
		var found bool
		for _, a := range e.GetArtifacts() {
			switch a.GetPath() {
			case "out.txt":
				found = true
				if a.GetSizeBytes() != 15 || a.GetSha256() != hex.EncodeToString(want[:]) {
					t.Errorf("artifact %v; want size 15 sha %x", a, want)
				}
			case "link":
				t.Errorf("the symlink was collected: %v", a)
			}
		}
		if !found {
			t.Fatalf("out.txt not among artifacts %v", e.GetArtifacts())
		}
		c.terminate(s.GetId())
		dest := filepath.Join(t.TempDir(), "got.txt")
		_, errs, code := c.ctl("", "artifacts", "get", e.GetId(), "out.txt", "-o", dest)
		if code != 0 {
			t.Fatalf("artifacts get: exit %d: %s", code, errs)
		}
		if b, _ := os.ReadFile(dest); string(b) != "hello artifact\n" {
			t.Fatalf("downloaded %q", b)
		}
		stream, err := c.executions.DownloadArtifact(context.Background(), connect.NewRequest(&sandboxv1.DownloadArtifactRequest{ExecutionId: e.GetId(), Path: "link"}))
		if err == nil {
			for stream.Receive() {
				t.Fatalf("the symlink is downloadable: %v", stream.Msg())
			}
			err = stream.Err()
		}
		wantCode(t, err, connect.CodeNotFound)
	})

	t.Run("timeout then the session still works", func(t *testing.T) {
		s := c.createSession(&sandboxv1.CreateSessionRequest{TemplateId: "python-basic"})
		defer c.terminate(s.GetId())
		start := time.Now()
		e := c.execute(&sandboxv1.ExecuteRequest{SessionId: s.GetId(), Language: "python", Code: "while True: pass", TimeoutSeconds: 2})
		if e.GetState() != sandboxv1.ExecutionState_EXECUTION_STATE_TIMED_OUT {
			t.Fatalf("state %v, want TIMED_OUT", e.GetState())
		}
		if d := time.Since(start); d > 20*time.Second {
			t.Fatalf("a 2s timeout took %v", d)
		}
		e = c.execute(&sandboxv1.ExecuteRequest{SessionId: s.GetId(), Language: "python", Code: "print('after')"})
		if e.GetStdout() != "after\n" || e.GetState() != sandboxv1.ExecutionState_EXECUTION_STATE_COMPLETED {
			t.Fatalf("next execution %v %q", e.GetState(), e.GetStdout())
		}
	})

	t.Run("async execution can be canceled", func(t *testing.T) {
		s := c.createSession(&sandboxv1.CreateSessionRequest{TemplateId: "python-basic"})
		defer c.terminate(s.GetId())
		e := c.execute(&sandboxv1.ExecuteRequest{SessionId: s.GetId(), Language: "python", Code: "import time; time.sleep(60)", Async: true})
		if st := e.GetState(); st != sandboxv1.ExecutionState_EXECUTION_STATE_QUEUED && st != sandboxv1.ExecutionState_EXECUTION_STATE_RUNNING {
			t.Fatalf("async execution is %v", st)
		}
		resp, err := c.executions.CancelExecution(context.Background(), connect.NewRequest(&sandboxv1.CancelExecutionRequest{ExecutionId: e.GetId()}))
		if err != nil {
			t.Fatal(err)
		}
		if st := resp.Msg.GetExecution().GetState(); st != sandboxv1.ExecutionState_EXECUTION_STATE_CANCELED {
			t.Fatalf("after cancel: %v", st)
		}
	})

	t.Run("user code cannot reach the host or the executor", func(t *testing.T) {
		s := c.createSession(&sandboxv1.CreateSessionRequest{TemplateId: "python-basic"})
		defer c.terminate(s.GetId())
		e := c.execute(&sandboxv1.ExecuteRequest{SessionId: s.GetId(), Language: "bash", Code: `
cat /proc/kcore >/dev/null 2>&1 && echo KCORE-READ
echo x 2>/dev/null >/proc/sys/kernel/hostname && echo PROCSYS-WRITTEN
echo 1 2>/dev/null >/proc/sysrq-trigger && echo SYSRQ-WRITTEN
ls /run/sandbox 2>/dev/null && echo SOCKETDIR-VISIBLE
env | grep -i token && echo TOKEN-VISIBLE
cat /etc/shadow >/dev/null 2>&1 && echo SHADOW-READ
echo ok`})
		if e.GetStdout() != "ok\n" {
			t.Fatalf("isolation breached: stdout %q stderr %q", e.GetStdout(), e.GetStderr())
		}
		// The executor's socket path, tried directly.
		e = c.execute(&sandboxv1.ExecuteRequest{SessionId: s.GetId(), Language: "python", Code: `
import socket
for p in ["/run/sandbox/executor.sock", "/run/sandbox/agent.sock"]:
    try:
        s = socket.socket(socket.AF_UNIX); s.connect(p); print("CONNECTED", p)
    except OSError:
        pass
print("ok")`})
		if e.GetStdout() != "ok\n" {
			t.Fatalf("socket reachable: %q %q", e.GetStdout(), e.GetStderr())
		}
	})

	t.Run("bad input is refused and changes nothing", func(t *testing.T) {
		s := c.createSession(&sandboxv1.CreateSessionRequest{TemplateId: "python-basic"})
		defer c.terminate(s.GetId())
		noKey := sandboxv1connect.NewSessionServiceClient(api.NewH2CClient(), "http://"+c.apiAddr)
		_, err := noKey.GetSession(context.Background(), connect.NewRequest(&sandboxv1.GetSessionRequest{SessionId: s.GetId()}))
		wantCode(t, err, connect.CodeUnauthenticated)
		_, err = c.sessions.GetSession(context.Background(), connect.NewRequest(&sandboxv1.GetSessionRequest{SessionId: "ses_nope"}))
		wantCode(t, err, connect.CodeNotFound)
		_, err = c.executions.Execute(context.Background(), connect.NewRequest(&sandboxv1.ExecuteRequest{SessionId: "ses_nope", Language: "python", Code: "1"}))
		wantCode(t, err, connect.CodeNotFound)
		_, err = c.executions.Execute(context.Background(), connect.NewRequest(&sandboxv1.ExecuteRequest{SessionId: s.GetId(), Language: "cobol", Code: "1"}))
		wantCode(t, err, connect.CodeInvalidArgument)
		_, err = c.executions.Execute(context.Background(), connect.NewRequest(&sandboxv1.ExecuteRequest{SessionId: s.GetId(), Language: "python", Code: "1", TimeoutSeconds: -1}))
		wantCode(t, err, connect.CodeInvalidArgument)
		_, err = c.sessions.CreateSession(context.Background(), connect.NewRequest(&sandboxv1.CreateSessionRequest{TemplateId: "no-such-template"}))
		wantCode(t, err, connect.CodeNotFound)
		list, err := c.executions.ListExecutions(context.Background(), connect.NewRequest(&sandboxv1.ListExecutionsRequest{SessionId: s.GetId()}))
		if err != nil || len(list.Msg.GetExecutions()) != 0 {
			t.Fatalf("refused calls left executions: %v %v", list, err)
		}
	})

	t.Run("curl-style JSON and gRPC on the same port", func(t *testing.T) {
		req, _ := http.NewRequest("POST", "http://"+c.apiAddr+"/sandbox.v1.SessionService/CreateSession", strings.NewReader(`{"templateId":"python-basic"}`))
		req.Header.Set("Authorization", "Bearer "+apiKey)
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var got struct {
			Session struct{ ID, State string } `json:"session"`
		}
		if resp.StatusCode != 200 || json.Unmarshal(body, &got) != nil || got.Session.State != "SESSION_STATE_RUNNING" {
			t.Fatalf("HTTP %d: %s", resp.StatusCode, body)
		}
		grpc := sandboxv1connect.NewSessionServiceClient(api.NewH2CClient(), "http://"+c.apiAddr, connect.WithGRPC(), api.WithBearer(apiKey))
		if _, err := grpc.TerminateSession(context.Background(), connect.NewRequest(&sandboxv1.TerminateSessionRequest{SessionId: got.Session.ID})); err != nil {
			t.Fatalf("gRPC TerminateSession: %v", err)
		}
		health := grpchealth.NewClient(api.NewH2CClient(), "http://"+c.apiAddr, connect.WithGRPC())
		hr, err := health.Check(context.Background(), &grpchealth.CheckRequest{Service: sandboxv1connect.SessionServiceName})
		if err != nil || hr.Status != grpchealth.StatusServing {
			t.Fatalf("health: %v %v", hr, err)
		}
	})

	t.Run("terminate and idle timeout leave nothing in containerd", func(t *testing.T) {
		s := c.createSession(&sandboxv1.CreateSessionRequest{TemplateId: "python-basic"})
		if ids := containersOf(t, s.GetId()); len(ids) == 0 {
			t.Fatalf("running session %s has no container", s.GetId())
		}
		if got := c.terminate(s.GetId()); got.GetState() != sandboxv1.SessionState_SESSION_STATE_TERMINATED {
			t.Fatalf("after terminate: %v", got.GetState())
		}
		if ids := containersOf(t, s.GetId()); len(ids) != 0 {
			t.Fatalf("containerd still holds %v", ids)
		}

		idle := c.createSession(&sandboxv1.CreateSessionRequest{TemplateId: "python-basic", IdleTimeoutSeconds: 2})
		deadline := time.Now().Add(30 * time.Second)
		for {
			r, err := c.sessions.GetSession(context.Background(), connect.NewRequest(&sandboxv1.GetSessionRequest{SessionId: idle.GetId()}))
			if err != nil {
				t.Fatal(err)
			}
			if r.Msg.GetSession().GetState() == sandboxv1.SessionState_SESSION_STATE_TERMINATED {
				if !strings.Contains(r.Msg.GetSession().GetStateReason(), "idle") {
					t.Errorf("reason %q", r.Msg.GetSession().GetStateReason())
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("idle session still %v", r.Msg.GetSession().GetState())
			}
			time.Sleep(200 * time.Millisecond)
		}
		if ids := containersOf(t, idle.GetId()); len(ids) != 0 {
			t.Fatalf("containerd still holds %v after idle timeout", ids)
		}
	})

	t.Run("a warm pool: sessions claim ready containers and the pool refills", func(t *testing.T) {
		waitReady := func(want int32) { t.Helper(); c.waitWarm(t, "python-basic", want) }
		if out, errOut, code := c.ctl("", "templates", "update", "python-basic", "--warm-pool", "2"); code != 0 || !strings.Contains(out, "Warm pool") {
			t.Fatalf("templates update: %d %s %s", code, out, errOut)
		}
		t.Cleanup(func() { c.ctl("", "templates", "update", "python-basic", "--warm-pool", "0") })
		waitReady(2)

		s := c.createSession(&sandboxv1.CreateSessionRequest{TemplateId: "python-basic", Env: map[string]string{"WHO": "warm"}})
		if !strings.HasPrefix(s.GetContainerId(), "w-") {
			t.Fatalf("session runs in %s, want a claimed warm container (w-...)", s.GetContainerId())
		}
		e := c.execute(&sandboxv1.ExecuteRequest{SessionId: s.GetId(), Language: "python", Code: "import os; print(6*7, os.environ['WHO'])"})
		if e.GetStdout() != "42 warm\n" || e.GetExitCode() != 0 {
			t.Fatalf("execution in a claimed container: %q %q exit %d", e.GetStdout(), e.GetStderr(), e.GetExitCode())
		}
		waitReady(2) // refilled behind the claim
		c.terminate(s.GetId())
		if ids := containersOf(t, s.GetId()); len(ids) != 0 {
			t.Fatalf("containerd still holds %v: a claimed container is never reused", ids)
		}

		if _, _, code := c.ctl("", "templates", "update", "python-basic", "--warm-pool", "0"); code != 0 {
			t.Fatal("templates update --warm-pool 0 failed")
		}
		waitReady(0)
		deadline := time.Now().Add(30 * time.Second)
		for len(warmContainers(t)) != 0 {
			if time.Now().After(deadline) {
				t.Fatalf("warm containers left after the pool went to 0: %v", warmContainers(t))
			}
			time.Sleep(100 * time.Millisecond)
		}
	})

	t.Run("an executor that dies takes its session to FAILED", func(t *testing.T) {
		s := c.createSession(&sandboxv1.CreateSessionRequest{TemplateId: "python-basic"})
		killTask(t, s.GetContainerId())
		deadline := time.Now().Add(30 * time.Second)
		for {
			r, err := c.sessions.GetSession(context.Background(), connect.NewRequest(&sandboxv1.GetSessionRequest{SessionId: s.GetId()}))
			if err != nil {
				t.Fatal(err)
			}
			if r.Msg.GetSession().GetState() == sandboxv1.SessionState_SESSION_STATE_FAILED {
				t.Logf("reason: %s", r.Msg.GetSession().GetStateReason())
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("session still %v after its executor died", r.Msg.GetSession().GetState())
			}
			time.Sleep(100 * time.Millisecond)
		}
		if ids := containersOf(t, s.GetId()); len(ids) != 0 {
			t.Fatalf("containerd still holds %v", ids)
		}
		_, err := c.executions.Execute(context.Background(), connect.NewRequest(&sandboxv1.ExecuteRequest{SessionId: s.GetId(), Language: "python", Code: "1"}))
		wantCode(t, err, connect.CodeFailedPrecondition)
	})

	t.Run("metrics are valid and move", func(t *testing.T) {
		promtool, err := exec.LookPath("promtool")
		if err != nil {
			testenv.Unavailable(t, "promtool (Debian package prometheus) is needed")
		}
		before := metrics(t, c.apiAddr)
		c.ctl("", "exec", "--template", "python-basic", "-c", "print(1)")
		after := metrics(t, c.apiAddr)
		for _, name := range []string{
			`sandbox_api_requests_total{code="ok",method="Execute"}`,
			`sandbox_api_requests_total{code="ok",method="CreateSession"}`,
			`sandbox_sessions{state="TERMINATED"}`,
			`sandbox_executions{language="python",state="COMPLETED"}`,
		} {
			if b, a := metricValue(before, name), metricValue(after, name); !(a > b) {
				t.Errorf("%s did not move: %v -> %v", name, b, a)
			}
		}
		for name, text := range map[string]string{"scheduler": after, "agent": metrics(t, c.agentAddr)} {
			cmd := exec.Command(promtool, "check", "metrics")
			cmd.Stdin = strings.NewReader(text)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Errorf("promtool check metrics (%s): %v\n%s", name, err, out)
			}
		}
		if !strings.Contains(metrics(t, c.agentAddr), "sandbox_agent_container_start_seconds") {
			t.Error("agent does not export sandbox_agent_container_start_seconds")
		}
	})

	t.Run("a restarted scheduler keeps sessions and executions", func(t *testing.T) {
		s := c.createSession(&sandboxv1.CreateSessionRequest{TemplateId: "python-basic"})
		e := c.execute(&sandboxv1.ExecuteRequest{SessionId: s.GetId(), Language: "python", Code: "print('persisted')"})
		c.restartScheduler()
		got, err := c.executions.GetExecution(context.Background(), connect.NewRequest(&sandboxv1.GetExecutionRequest{ExecutionId: e.GetId()}))
		if err != nil {
			t.Fatalf("GetExecution after restart: %v", err)
		}
		if got.Msg.GetExecution().GetStdout() != "persisted\n" {
			t.Fatalf("execution after restart: %v", got.Msg.GetExecution())
		}
		gs, err := c.sessions.GetSession(context.Background(), connect.NewRequest(&sandboxv1.GetSessionRequest{SessionId: s.GetId()}))
		if err != nil || gs.Msg.GetSession().GetState() != sandboxv1.SessionState_SESSION_STATE_RUNNING {
			t.Fatalf("session after restart: %v %v", gs, err)
		}
		// The agent re-registers with the new process; the session keeps working.
		deadline := time.Now().Add(30 * time.Second)
		for {
			resp, err := c.executions.Execute(context.Background(), connect.NewRequest(&sandboxv1.ExecuteRequest{SessionId: s.GetId(), Language: "python", Code: "print(2)"}))
			if err == nil && resp.Msg.GetExecution().GetStdout() == "2\n" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("execute after restart: %v %v", resp, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
		c.terminate(s.GetId())
	})
}

func wantCode(t *testing.T, err error, code connect.Code) {
	t.Helper()
	if connect.CodeOf(err) != code {
		t.Fatalf("got %v, want %v", err, code)
	}
	var ce *connect.Error
	if errors.As(err, &ce) && ce.Message() == "" {
		t.Fatalf("%v has no message", err)
	}
}

// metricValue reads one sample from the text exposition format (0 if absent).
func metricValue(text, series string) float64 {
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` (\S+)$`)
	m := re.FindStringSubmatch(text)
	if m == nil {
		return 0
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	return v
}

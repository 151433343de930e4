package kubernetes

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sandboxhq/sandbox/agent"
	"github.com/sandboxhq/sandbox/api"
	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1/agentv1connect"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/executor/executorapi"
)

// The agent on this adapter, end to end on the fake cluster: the kubelet
// double runs, for each pod of the image's entrypoint, a stand-in executor
// on the pod's IP (a loopback address of its own, 127.0.0.N, on the
// adapter's executor port), which calls back on the CONTROL_PLANE_URL of
// the pod's env with the token /init gave it. No real executor, container
// or cluster is involved: what this checks is that the agent and the
// adapter fit (endpoints, env, pod names, labels, warm pods, resize on
// claim, callbacks by token), not isolation.

// podExecutor is the stand-in executor of one pod.
type podExecutor struct {
	srv     *http.Server
	cpURL   string
	mu      sync.Mutex
	token   string
	session string
}

var nextLoopback atomic.Int32

// startPodExecutor serves the executor API on 127.0.0.N:port for pod p.
func startPodExecutor(t *testing.T, p *corev1.Pod, port int32) (string, func()) {
	var cp string
	for _, e := range p.Spec.Containers[0].Env {
		if e.Name == "CONTROL_PLANE_URL" {
			cp = e.Value
		}
	}
	ip := fmt.Sprintf("127.0.0.%d", 2+nextLoopback.Add(1)%250)
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, fmt.Sprint(port)))
	if err != nil {
		t.Errorf("pod %s: executor stand-in: %v", p.Name, err)
		return "", func() {}
	}
	e := &podExecutor{cpURL: strings.TrimSuffix(cp, "/")}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", func(w http.ResponseWriter, r *http.Request) {
		e.mu.Lock()
		defer e.mu.Unlock()
		_ = json.NewEncoder(w).Encode(executorapi.Health{Status: "ok", SessionID: e.session, Initialized: e.token != ""})
	})
	mux.HandleFunc("POST /init", func(w http.ResponseWriter, r *http.Request) {
		var req executorapi.InitRequest
		_ = json.NewDecoder(r.Body).Decode(&req)
		e.mu.Lock()
		defer e.mu.Unlock()
		if e.token != "" {
			http.Error(w, `{"error":"already initialized"}`, http.StatusConflict)
			return
		}
		e.token, e.session = req.Token, req.SessionID
		_ = json.NewEncoder(w).Encode(executorapi.Health{Status: "ok", SessionID: req.SessionID, Initialized: true})
	})
	mux.HandleFunc("POST /execute", func(w http.ResponseWriter, r *http.Request) {
		e.mu.Lock()
		token := e.token
		e.mu.Unlock()
		if token == "" || r.Header.Get("Authorization") != "Bearer "+token {
			http.Error(w, `{"error":"bad token"}`, http.StatusUnauthorized)
			return
		}
		var req executorapi.ExecuteRequest
		_ = json.NewDecoder(r.Body).Decode(&req)
		w.WriteHeader(http.StatusAccepted)
		_ = json.NewEncoder(w).Encode(executorapi.ExecuteAccepted{ExecutionID: req.ExecutionID})
		go func() {
			body, _ := json.Marshal(executorapi.Result{State: executorapi.StateCompleted, Stdout: "ran " + req.Code + " in " + p.Name + "\n", DurationMS: 1})
			creq, _ := http.NewRequest(http.MethodPost, e.cpURL+"/internal/executions/"+req.ExecutionID+"/result", bytes.NewReader(body))
			creq.Header.Set("Authorization", "Bearer "+token)
			resp, err := http.DefaultClient.Do(creq)
			if err != nil {
				t.Errorf("pod %s: result callback: %v", p.Name, err)
				return
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Errorf("pod %s: result callback answered %s", p.Name, resp.Status)
			}
		}()
	})
	e.srv = &http.Server{Handler: mux}
	go func() { _ = e.srv.Serve(ln) }()
	return ip, func() { _ = e.srv.Close() }
}

// recordingControlPlane takes the agent's reports.
type recordingControlPlane struct {
	agentv1connect.UnimplementedControlPlaneServiceHandler
	results chan *agentv1.ReportExecutionRequest
}

func (c *recordingControlPlane) RegisterAgent(context.Context, *connect.Request[agentv1.RegisterAgentRequest]) (*connect.Response[agentv1.RegisterAgentResponse], error) {
	return connect.NewResponse(&agentv1.RegisterAgentResponse{}), nil
}

func (c *recordingControlPlane) ReportExecution(_ context.Context, req *connect.Request[agentv1.ReportExecutionRequest]) (*connect.Response[agentv1.ReportExecutionResponse], error) {
	if req.Msg.GetKind() == agentv1.ReportKind_REPORT_KIND_RESULT {
		c.results <- req.Msg
	}
	return connect.NewResponse(&agentv1.ReportExecutionResponse{}), nil
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func TestAgentOnKubernetes(t *testing.T) {
	if testing.Short() {
		t.Skip("runs an agent")
	}
	const token = "cluster-token-for-the-kubernetes-test"
	const image = "registry.test/sandbox/python-basic:latest"
	fc := newFakeCluster(t, fakeNamespace, image)
	port := int32(20000 + time.Now().UnixNano()%20000)
	fc.kubelet.executor = func(p *corev1.Pod) (string, func()) { return startPodExecutor(t, p, port) }
	rt := newFakeRuntime(t, fc, func(c *Config) { c.ExecutorPort = port })

	cp := &recordingControlPlane{results: make(chan *agentv1.ReportExecutionRequest, 8)}
	mux := http.NewServeMux()
	mux.Handle(agentv1connect.NewControlPlaneServiceHandler(cp))
	cpAddr := freeAddr(t)
	cpSrv := &http.Server{Addr: cpAddr, Handler: mux}
	go func() { _ = cpSrv.ListenAndServe() }()
	t.Cleanup(func() { _ = cpSrv.Close() })

	dataDir, err := os.MkdirTemp("", "agk")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dataDir) })
	listen, callbacks := freeAddr(t), freeAddr(t)
	cfg := agent.DefaultConfig()
	cfg.ID, cfg.DataDir, cfg.ListenAddr = "node-1", dataDir, listen
	cfg.ServerURL, cfg.ClusterToken, cfg.Runtime = "http://"+cpAddr, token, rt
	cfg.CallbackListen, cfg.CallbackURL = callbacks, "http://"+callbacks
	cfg.Registry = prometheus.NewRegistry()
	a, err := agent.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-ran; err != nil {
			t.Errorf("agent Run: %v", err)
		}
	})
	client := agentv1connect.NewAgentServiceClient(api.NewH2CClient(), "http://"+listen, api.WithBearer(token))
	limits := &sandboxv1.ResourceLimits{CpuMillis: 500, MemoryMib: 256, Pids: 64, DiskMib: 64, MaxExecutionTimeoutSeconds: 30}

	// A warm pod of the template first, claimed by the second session.
	deadline := time.Now().Add(20 * time.Second)
	for {
		_, err := client.SetWarmPools(ctx, connect.NewRequest(&agentv1.SetWarmPoolsRequest{Pools: []*agentv1.WarmPoolTarget{{
			TemplateId: "python-basic", Image: image, Limits: limits, Size: 1,
		}}}))
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("SetWarmPools: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	waitFor(t, "a warm pod", func() bool {
		l, err := rt.List(ctx, map[string]string{"sandbox.warm": "true"})
		return err == nil && len(l) == 1 && l[0].Running && l[0].Endpoint != ""
	})

	for i, sid := range []string{"ses_Cold1", "ses_Warm2"} {
		start := &agentv1.StartSessionRequest{SessionId: sid, TemplateId: "python-basic", Image: image, Limits: limits, CallbackToken: "token-" + sid}
		if i == 0 {
			start.TemplateId = "" // no pool: a cold start
		}
		resp, err := client.StartSession(ctx, connect.NewRequest(start))
		if err != nil {
			t.Fatalf("StartSession %s: %v", sid, err)
		}
		cid := resp.Msg.GetContainerId()
		st, err := rt.Inspect(ctx, cid)
		if err != nil || !st.Running || st.Endpoint == "" {
			t.Fatalf("container %s of %s: %+v, %v", cid, sid, st, err)
		}
		if name := PodName(cid); name == cid && strings.ContainsAny(cid, "_ABCDEFGHIJKLMNOPQRSTUVWXYZ") {
			t.Errorf("container id %s was used as a pod name", cid)
		}
		if _, err := client.Execute(ctx, connect.NewRequest(&agentv1.ExecuteRequest{
			ExecutionId: "exe-" + sid, SessionId: sid, Language: "python", Code: "print(1)", TimeoutSeconds: 10,
		})); err != nil {
			t.Fatalf("Execute in %s: %v", sid, err)
		}
		select {
		case r := <-cp.results:
			if r.GetExecutionId() != "exe-"+sid || r.GetSessionId() != sid || r.GetState() != sandboxv1.ExecutionState_EXECUTION_STATE_COMPLETED ||
				!strings.HasPrefix(r.GetStdout(), "ran print(1) in "+PodName(cid)) {
				t.Errorf("result of %s: %v", sid, r)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("no result of %s", sid)
		}
		if i == 1 {
			// The claim resized the warm pod to the session's limits.
			p, err := fc.CoreV1().Pods(fakeNamespace).Get(ctx, PodName(cid), metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if got := p.Spec.Containers[0].Resources.Limits.Memory().Value(); got != 256<<20 {
				t.Errorf("claimed warm pod's memory limit = %d, want %d", got, 256<<20)
			}
			if !strings.HasPrefix(cid, "w-") {
				t.Errorf("session %s got container %s, want the warm pod", sid, cid)
			}
		}
		if _, err := client.StopSession(ctx, connect.NewRequest(&agentv1.StopSessionRequest{SessionId: sid})); err != nil {
			t.Fatalf("StopSession %s: %v", sid, err)
		}
		waitFor(t, "the session's pod to go", func() bool {
			_, err := rt.Inspect(ctx, cid)
			return err != nil
		})
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

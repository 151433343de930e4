package e2e

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/sandboxhq/sandbox/api"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/v1/sandboxv1connect"
)

func (c *cluster) clusterClient(srv *server) sandboxv1connect.ClusterServiceClient {
	return sandboxv1connect.NewClusterServiceClient(api.NewH2CClient(), "http://"+srv.apiAddr, api.WithBearer(apiKey))
}

// leader waits until the live servers agree on a leader and returns it.
func (c *cluster) leader(t *testing.T, live []*server) *server {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var id string
		agree := true
		for _, srv := range live {
			req := connect.NewRequest(&sandboxv1.GetClusterStatusRequest{})
			req.Header().Set("Sandbox-Read-Consistency", "stale")
			st, err := c.clusterClient(srv).GetClusterStatus(context.Background(), req)
			if err != nil || st.Msg.GetLeaderId() == "" || (id != "" && st.Msg.GetLeaderId() != id) {
				agree = false
				break
			}
			id = st.Msg.GetLeaderId()
		}
		if agree {
			for _, srv := range live {
				if srv.id == id {
					return srv
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("servers do not agree on a leader among %d live ones", len(live))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// retryUnavailable retries a call that failed with unavailable (a leader
// change) for up to 30 s; the idempotency key makes the retry safe.
func retryUnavailable[T any](call func() (T, error)) (T, error) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		v, err := call()
		if err == nil || connect.CodeOf(err) != connect.CodeUnavailable || time.Now().After(deadline) {
			return v, err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// agentLostBound is the generous bound asserted on how soon a killed agent's
// sessions are LOST (the goal, p99 <= 3 s, is measured by make test-chaos into
// agent-death.jsonl).
const agentLostBound = 10 * time.Second

// TestCluster runs three servers as separate processes: any server answers,
// writes survive the leader's kill -9, and retried writes are not applied twice.
func TestCluster(t *testing.T) {
	c := startServers(t, 3)
	ctx := context.Background()

	t.Run("every server answers and agrees on the leader", func(t *testing.T) {
		lead := c.leader(t, c.servers)
		st, err := c.clusterClient(c.servers[2]).GetClusterStatus(ctx, connect.NewRequest(&sandboxv1.GetClusterStatusRequest{}))
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Msg.GetServers()) != 3 || st.Msg.GetLeaderId() != lead.id {
			t.Fatalf("status %v", st.Msg)
		}
		for _, srv := range c.servers {
			c.useServer(srv)
			out, errs, code := c.ctl("", "--addr", "http://"+srv.apiAddr, "exec", "--template", "python-basic", "-c", "print(6*7)")
			if out != "42\n" || code != 0 {
				t.Fatalf("exec through %s: %q %q %d", srv.id, out, errs, code)
			}
		}
	})

	t.Run("an idempotency key makes a retried create return the same session", func(t *testing.T) {
		c.useServer(c.servers[1])
		req := &sandboxv1.CreateSessionRequest{TemplateId: "python-basic", IdempotencyKey: "e2e-key-1"}
		a := c.createSession(req)
		c.useServer(c.servers[2])
		b := c.createSession(req)
		if a.GetId() != b.GetId() {
			t.Fatalf("two sessions for one key: %s and %s", a.GetId(), b.GetId())
		}
		c.terminate(a.GetId())
	})

	t.Run("an agent killed -9 and started again keeps its sessions", func(t *testing.T) {
		c.useServer(c.servers[0])
		sess := c.createSession(&sandboxv1.CreateSessionRequest{TemplateId: "python-basic"})
		e := c.execute(&sandboxv1.ExecuteRequest{SessionId: sess.GetId(), Language: "python", Code: "open('/workspace/state','w').write('kept')"})
		if e.GetState() != sandboxv1.ExecutionState_EXECUTION_STATE_COMPLETED {
			t.Fatalf("setup execution %v", e)
		}
		kill9(c.agent)
		c.startAgent(c.containerd)
		deadline := time.Now().Add(30 * time.Second)
		for {
			resp, err := c.executions.Execute(ctx, connect.NewRequest(&sandboxv1.ExecuteRequest{SessionId: sess.GetId(), Language: "python", Code: "print(open('/workspace/state').read())"}))
			if err == nil && resp.Msg.GetExecution().GetStdout() == "kept\n" {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the session did not survive its agent's restart: %v %v", resp, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
		got, err := c.sessions.GetSession(ctx, connect.NewRequest(&sandboxv1.GetSessionRequest{SessionId: sess.GetId()}))
		if err != nil || got.Msg.GetSession().GetState() != sandboxv1.SessionState_SESSION_STATE_RUNNING {
			t.Fatalf("session after the agent restart: %v %v", got, err)
		}
		if ids := containersOf(t, sess.GetId()); len(ids) != 2 { // the container and its task, once
			t.Fatalf("containers of the session after restart: %v", ids)
		}
		c.terminate(sess.GetId())
	})

	t.Run("acknowledged executions survive the leader's kill -9", func(t *testing.T) {
		lead := c.leader(t, c.servers)
		var others []*server
		for _, srv := range c.servers {
			if srv != lead {
				others = append(others, srv)
			}
		}
		c.useServer(others[0])
		sess := c.createSession(&sandboxv1.CreateSessionRequest{TemplateId: "python-basic"})
		client := sandboxv1connect.NewExecutionServiceClient(api.NewH2CClient(), "http://"+others[1].apiAddr, api.WithBearer(apiKey))

		var mu sync.Mutex
		acked := map[string]string{} // idempotency key -> execution id
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				key := fmt.Sprintf("load-%d", i)
				resp, err := retryUnavailable(func() (*connect.Response[sandboxv1.ExecuteResponse], error) {
					return client.Execute(ctx, connect.NewRequest(&sandboxv1.ExecuteRequest{
						SessionId: sess.GetId(), Language: "python", Code: fmt.Sprintf("print(%d)", i), IdempotencyKey: key,
					}))
				})
				if err != nil {
					t.Errorf("execution %d: %v", i, err)
					return
				}
				mu.Lock()
				acked[key] = resp.Msg.GetExecution().GetId()
				mu.Unlock()
			}
		}()
		// When the leader dies is drawn from the chaos seed (logged), so
		// repeated runs kill it at different points of the load.
		seed, _ := chaosSettings(t)
		delay := time.Duration(300+rand.New(rand.NewSource(seed)).Intn(1700)) * time.Millisecond
		t.Logf("chaos seed %d: killing the leader %s after %v of load", seed, lead.id, delay)
		time.Sleep(delay)
		kill9(lead.cmd)
		newLead := c.leader(t, others)
		time.Sleep(2 * time.Second)
		close(stop)
		wg.Wait()
		if t.Failed() {
			return
		}
		t.Logf("new leader %s; %d executions acknowledged", newLead.id, len(acked))

		list, err := sandboxv1connect.NewExecutionServiceClient(api.NewH2CClient(), "http://"+newLead.apiAddr, api.WithBearer(apiKey)).
			ListExecutions(ctx, connect.NewRequest(&sandboxv1.ListExecutionsRequest{SessionId: sess.GetId(), PageSize: 1000}))
		if err != nil {
			t.Fatal(err)
		}
		byID := map[string]*sandboxv1.Execution{}
		for _, e := range list.Msg.GetExecutions() {
			byID[e.GetId()] = e
		}
		for key, id := range acked {
			e, ok := byID[id]
			if !ok {
				t.Errorf("acknowledged execution %s (%s) is lost", id, key)
				continue
			}
			if e.GetState() != sandboxv1.ExecutionState_EXECUTION_STATE_COMPLETED {
				t.Errorf("acknowledged execution %s is %v", id, e.GetState())
			}
		}
		if len(byID) != len(acked) {
			t.Errorf("%d executions recorded for %d acknowledged requests (a retry ran twice?)", len(byID), len(acked))
		}

		// The killed server comes back with its state and rejoins.
		c.startServer(lead)
		deadline := time.Now().Add(30 * time.Second)
		for {
			st, err := c.clusterClient(newLead).GetClusterStatus(ctx, connect.NewRequest(&sandboxv1.GetClusterStatusRequest{}))
			if err == nil && len(st.Msg.GetServers()) == 3 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("cluster status after the old leader restarted: %v %v", st, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
		c.useServer(lead)
		c.waitAPI()
		if _, err := c.executions.GetExecution(ctx, connect.NewRequest(&sandboxv1.GetExecutionRequest{ExecutionId: acked["load-0"]})); err != nil {
			t.Fatalf("the restarted server cannot answer: %v", err)
		}
		c.terminate(sess.GetId())
	})

	t.Run("a server is removed and joined again at run time", func(t *testing.T) {
		lead := c.leader(t, liveServers(c))
		var f *server
		for _, srv := range liveServers(c) {
			if srv != lead {
				f = srv
				break
			}
		}
		c.useServer(lead)
		if _, errs, code := c.ctl("", "cluster", "remove", f.id); code != 0 {
			t.Fatalf("cluster remove: %s", errs)
		}
		status := func() *sandboxv1.GetClusterStatusResponse {
			st, err := c.clusterClient(lead).GetClusterStatus(ctx, connect.NewRequest(&sandboxv1.GetClusterStatusRequest{}))
			if err != nil {
				t.Fatal(err)
			}
			return st.Msg
		}
		if n := len(status().GetServers()); n != 2 {
			t.Fatalf("%d servers after remove", n)
		}
		stopProcess(f.cmd)
		must(t, os.RemoveAll(filepath.Join(c.dir, f.id)))
		f.standalone = true
		c.startServer(f)
		deadline := time.Now().Add(30 * time.Second)
		for {
			_, errs, code := c.ctl("", "cluster", "join", f.internalAddr)
			if code == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("cluster join: %s", errs)
			}
			time.Sleep(200 * time.Millisecond)
		}
		deadline = time.Now().Add(30 * time.Second)
		for {
			st := status()
			voters := 0
			for _, s := range st.GetServers() {
				if s.GetVoter() {
					voters++
				}
			}
			// The rejoined server answers with the replicated state.
			c.useServer(f)
			_, err := c.templates.GetTemplate(ctx, connect.NewRequest(&sandboxv1.GetTemplateRequest{TemplateId: "python-basic"}))
			if voters == 3 && err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("after join: %v servers, template read %v", st.GetServers(), err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	})

	t.Run("a dead agent's sessions end LOST with a reason", func(t *testing.T) {
		c.useServer(c.leader(t, liveServers(c)))
		// The session lands on the only agent; then a second one joins.
		sess := c.createSession(&sandboxv1.CreateSessionRequest{TemplateId: "python-basic"})
		exec := c.execute(&sandboxv1.ExecuteRequest{SessionId: sess.GetId(), Language: "python", Code: "import time; time.sleep(300)", Async: true})
		other := c.startSecondAgent()
		victim, survivor := c.agent, other.id
		killed := time.Now()
		kill9(victim)
		deadline := time.Now().Add(60 * time.Second)
		for {
			got, err := c.sessions.GetSession(ctx, connect.NewRequest(&sandboxv1.GetSessionRequest{SessionId: sess.GetId()}))
			if err == nil && got.Msg.GetSession().GetState() == sandboxv1.SessionState_SESSION_STATE_LOST {
				if got.Msg.GetSession().GetStateReason() == "" {
					t.Error("LOST without a reason")
				}
				lost := time.Since(killed)
				t.Logf("LOST %v after the kill: %s", lost.Round(time.Millisecond), got.Msg.GetSession().GetStateReason())
				chaosRecord(t, "agent-death.jsonl", map[string]any{"at": time.Now().UTC().Format(time.RFC3339), "lost_ms": foMS(lost)})
				if lost > agentLostBound {
					t.Errorf("the session became LOST %v after its agent's kill; the goal is within %v", lost.Round(time.Millisecond), agentLostBound)
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("session of a dead agent: %v %v", got, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
		e, err := c.executions.GetExecution(ctx, connect.NewRequest(&sandboxv1.GetExecutionRequest{ExecutionId: exec.GetId()}))
		if err != nil || e.Msg.GetExecution().GetState() != sandboxv1.ExecutionState_EXECUTION_STATE_LOST {
			t.Fatalf("execution of a dead agent: %v %v", e, err)
		}
		// New sessions go to the surviving agent.
		next := c.createSession(&sandboxv1.CreateSessionRequest{TemplateId: "python-basic"})
		if next.GetAgentId() != survivor {
			t.Errorf("a new session went to %s, want the surviving agent %s", next.GetAgentId(), survivor)
		}
		c.terminate(next.GetId())
		// The agent comes back, re-adopts the container, learns its session
		// is gone and removes it.
		c.startAgent(c.containerd)
		deadline = time.Now().Add(60 * time.Second)
		for len(containersOf(t, sess.GetId())) != 0 {
			if time.Now().After(deadline) {
				t.Fatalf("the LOST session's container is still there: %v", containersOf(t, sess.GetId()))
			}
			time.Sleep(200 * time.Millisecond)
		}
	})
}

// liveServers are the servers whose process runs.
func liveServers(c *cluster) []*server {
	var out []*server
	for _, srv := range c.servers {
		if srv.cmd != nil && srv.cmd.ProcessState == nil {
			out = append(out, srv)
		}
	}
	return out
}

package agent

import (
	"context"
	"strings"
	"testing"

	"connectrpc.com/connect"

	"github.com/sandboxhq/sandbox/agent/runtime"
	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
)

// readyOf is what the agent advertises for its pools.
func readyOf(ta *testAgent) map[string]int32 {
	counts, _ := ta.pools.counts()
	return counts
}

// runPoolsFor starts the agent's pool loop, as Run does.
func (ta *testAgent) runPoolsFor(t *testing.T) {
	t.Helper()
	ta.wg.Add(1)
	go func() {
		defer ta.wg.Done()
		ta.runPools(ta.baseCtx)
	}()
}

func (ta *testAgent) setPools(t *testing.T, pools ...*agentv1.WarmPoolTarget) error {
	t.Helper()
	_, err := ta.client.SetWarmPools(context.Background(), connect.NewRequest(&agentv1.SetWarmPoolsRequest{Pools: pools}))
	return err
}

func pythonPool(size int32) *agentv1.WarmPoolTarget {
	return &agentv1.WarmPoolTarget{
		TemplateId: "python-basic", Image: "localhost/sandbox/python-basic:latest", Size: size,
		Limits: &sandboxv1.ResourceLimits{CpuMillis: 1000, MemoryMib: 512, Pids: 128, DiskMib: 100, MaxExecutionTimeoutSeconds: 60},
	}
}

// warmIDs lists the runtime's unclaimed warm containers.
func (ta *testAgent) warmIDs() []string {
	ta.rt.mu.Lock()
	defer ta.rt.mu.Unlock()
	var out []string
	for id, c := range ta.rt.containers {
		if c.spec.Labels[runtime.LabelWarm] != "" && c.spec.Labels[runtime.LabelSession] == "" && !c.exited {
			out = append(out, id)
		}
	}
	return out
}

func TestWarmPoolClaimAndRefill(t *testing.T) {
	ta := newTestAgent(t)
	ta.runPoolsFor(t)
	if err := ta.setPools(t, pythonPool(2)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "two ready warm containers", func() bool { return readyOf(ta)["python-basic"] == 2 })
	if got := len(ta.warmIDs()); got != 2 {
		t.Fatalf("%d warm containers in the runtime, want 2", got)
	}
	// The servers do not see unclaimed warm containers.
	if cs := ta.containers(t); len(cs) != 0 {
		t.Fatalf("ListContainers shows %v, want nothing before a claim", cs)
	}

	// A session of the template claims one: no new container, the session's
	// limits and label applied, the executor initialised with its token.
	cid := ta.start(t, "s1")
	if !strings.HasPrefix(cid, warmPrefix) {
		t.Fatalf("session started on %s, want a claimed warm container", cid)
	}
	c, _ := ta.rt.container(cid)
	ta.rt.mu.Lock()
	spec := c.spec
	ta.rt.mu.Unlock()
	if spec.Limits.CPUMillis != 500 || spec.Limits.MemoryMiB != 256 || spec.Limits.Pids != 64 {
		t.Fatalf("claimed container limits %+v, want the session's", spec.Limits)
	}
	// The session's label follows, off the start's path.
	eventually(t, "the session's label on the claimed container", func() bool {
		ta.rt.mu.Lock()
		defer ta.rt.mu.Unlock()
		return c.spec.Labels[runtime.LabelSession] == "s1"
	})
	c.exec.mu.Lock()
	init := c.exec.init
	c.exec.mu.Unlock()
	if init == nil || init.SessionID != "s1" || init.Token != "token-s1" || init.Env["GREETING"] != "hi" {
		t.Fatalf("executor init = %+v", init)
	}
	if cs := ta.containers(t); len(cs) != 1 || cs[cid].GetSessionId() != "s1" || !cs[cid].GetRunning() {
		t.Fatalf("ListContainers = %v, want the claimed container for s1", cs)
	}
	// The pool refills behind the claim.
	eventually(t, "the pool refilled", func() bool { return readyOf(ta)["python-basic"] == 2 })

	// A session whose disk limit differs cannot use a warm workspace: cold.
	req := startReq("s2")
	req.Limits.DiskMib = 200
	resp, err := ta.client.StartSession(context.Background(), connect.NewRequest(req))
	if err != nil || resp.Msg.GetContainerId() != containerPrefix+"s2" {
		t.Fatalf("StartSession with another disk limit = %v, %v; want a new container", resp, err)
	}

	// Stopping the claimed session destroys its container: never reused.
	if _, err := ta.client.StopSession(context.Background(), connect.NewRequest(&agentv1.StopSessionRequest{SessionId: "s1"})); err != nil {
		t.Fatal(err)
	}
	if !ta.rt.wasDestroyed(cid) {
		t.Fatalf("claimed container %s not destroyed with its session", cid)
	}

	// A smaller target trims the pool.
	if err := ta.setPools(t); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the pool emptied", func() bool { return len(ta.warmIDs()) == 0 && readyOf(ta)["python-basic"] == 0 })
}

func TestWarmContainerExitingInThePoolIsReplaced(t *testing.T) {
	ta := newTestAgent(t)
	ta.runPoolsFor(t)
	if err := ta.setPools(t, pythonPool(1)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "a ready warm container", func() bool { return len(ta.warmIDs()) == 1 && readyOf(ta)["python-basic"] == 1 })
	first := ta.warmIDs()[0]
	ta.rt.exit(first, 137)
	eventually(t, "a replacement", func() bool {
		ids := ta.warmIDs()
		return len(ids) == 1 && ids[0] != first && readyOf(ta)["python-basic"] == 1
	})
	eventually(t, "the dead one destroyed", func() bool { return ta.rt.wasDestroyed(first) })
}

func TestSetWarmPoolsRefusesBadTargets(t *testing.T) {
	ta := newTestAgent(t)
	noImage := pythonPool(1)
	noImage.Image = ""
	zeroLimits := pythonPool(1)
	zeroLimits.Limits = &sandboxv1.ResourceLimits{CpuMillis: 100}
	negative := pythonPool(-1)
	badID := pythonPool(1)
	badID.TemplateId = "../x"
	for name, pools := range map[string][]*agentv1.WarmPoolTarget{
		"no image":      {noImage},
		"zero limits":   {zeroLimits},
		"negative size": {negative},
		"bad id":        {badID},
		"twice":         {pythonPool(1), pythonPool(2)},
	} {
		if err := ta.setPools(t, pools...); connect.CodeOf(err) != connect.CodeInvalidArgument {
			t.Errorf("%s: SetWarmPools = %v, want invalid_argument", name, err)
		}
	}
	if n := len(ta.pools.targets); n != 0 {
		t.Errorf("a refused SetWarmPools changed the targets: %v", ta.pools.targets)
	}
}

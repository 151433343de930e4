package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

	"github.com/sandboxhq/sandbox/api"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/v1/sandboxv1connect"
)

// cluster is the benchmark's handle on a running cluster. It remembers what
// it changed (sessions it created, warm pool sizes it set) so that close
// can put the cluster back as it found it.
type cluster struct {
	http       *http.Client
	sessions   sandboxv1connect.SessionServiceClient
	executions sandboxv1connect.ExecutionServiceClient
	templates  sandboxv1connect.TemplateServiceClient
	nodes      sandboxv1connect.ClusterServiceClient
	// poolTimeout is how long a warm pool may make no progress towards its
	// target before waitPool gives up.
	poolTimeout time.Duration

	mu sync.Mutex
	// stalled is the first pool that made no progress: later waits for a
	// pool to grow fail at once instead of waiting out the timeout again.
	stalled   error
	live      map[string]bool  // sessions created and not yet terminated
	origPools map[string]int32 // templates whose pool size was changed: the size before
}

func newCluster(addr, key string, poolTimeout time.Duration) *cluster {
	hc := api.NewH2CClient()
	opt := api.WithBearer(key)
	return &cluster{
		http:        hc,
		sessions:    sandboxv1connect.NewSessionServiceClient(hc, addr, opt),
		executions:  sandboxv1connect.NewExecutionServiceClient(hc, addr, opt),
		templates:   sandboxv1connect.NewTemplateServiceClient(hc, addr, opt),
		nodes:       sandboxv1connect.NewClusterServiceClient(hc, addr, opt),
		poolTimeout: poolTimeout,
		live:        map[string]bool{},
		origPools:   map[string]int32{},
	}
}

// check makes sure the API answers and the key is accepted.
func (c *cluster) check(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := c.nodes.ListNodes(ctx, connect.NewRequest(&sandboxv1.ListNodesRequest{})); err != nil {
		return fmt.Errorf("the cluster does not answer (start one with make cluster): %w", err)
	}
	return nil
}

// leaderURL is the URL of the leader's API port.
func (c *cluster) leaderURL(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	st, err := c.nodes.GetClusterStatus(ctx, connect.NewRequest(&sandboxv1.GetClusterStatusRequest{}))
	if err != nil {
		return "", fmt.Errorf("find the leader (or run with -direct): %w", err)
	}
	for _, s := range st.Msg.GetServers() {
		if s.GetId() == st.Msg.GetLeaderId() && s.GetApiAddress() != "" {
			addr := s.GetApiAddress()
			if !strings.Contains(addr, "://") {
				addr = "http://" + addr
			}
			return strings.TrimRight(addr, "/"), nil
		}
	}
	return "", fmt.Errorf("the cluster names no leader with an API address (leader %q); run with -direct", st.Msg.GetLeaderId())
}

// create creates a session of template and returns its id and how long the
// call took. limits may be nil (the template's defaults).
func (c *cluster) create(ctx context.Context, template string, limits *sandboxv1.ResourceLimits) (string, time.Duration, error) {
	t0 := time.Now()
	resp, err := c.sessions.CreateSession(ctx, connect.NewRequest(&sandboxv1.CreateSessionRequest{TemplateId: template, ResourceLimits: limits}))
	d := time.Since(t0)
	if err != nil {
		return "", d, fmt.Errorf("CreateSession %s: %w", template, err)
	}
	s := resp.Msg.GetSession()
	c.mu.Lock()
	c.live[s.GetId()] = true
	c.mu.Unlock()
	if s.GetState() != sandboxv1.SessionState_SESSION_STATE_RUNNING {
		return s.GetId(), d, fmt.Errorf("CreateSession %s: session %s is %s, want RUNNING", template, s.GetId(), s.GetState())
	}
	return s.GetId(), d, nil
}

// terminate ends a session and returns how long the call took.
func (c *cluster) terminate(ctx context.Context, id string) (time.Duration, error) {
	t0 := time.Now()
	_, err := c.sessions.TerminateSession(ctx, connect.NewRequest(&sandboxv1.TerminateSessionRequest{SessionId: id}))
	d := time.Since(t0)
	if err != nil && connect.CodeOf(err) != connect.CodeNotFound {
		return d, fmt.Errorf("TerminateSession %s: %w", id, err)
	}
	c.mu.Lock()
	delete(c.live, id)
	c.mu.Unlock()
	return d, nil
}

// execute runs code in session id and checks that it printed "1".
func (c *cluster) execute(ctx context.Context, id, language, code string) (time.Duration, error) {
	t0 := time.Now()
	resp, err := c.executions.Execute(ctx, connect.NewRequest(&sandboxv1.ExecuteRequest{SessionId: id, Language: language, Code: code}))
	d := time.Since(t0)
	if err != nil {
		return d, fmt.Errorf("Execute %s in session %s: %w", language, id, err)
	}
	ex := resp.Msg.GetExecution()
	if ex.GetState() != sandboxv1.ExecutionState_EXECUTION_STATE_COMPLETED || ex.GetExitCode() != 0 || ex.GetStdout() != "1\n" {
		return d, fmt.Errorf("Execute %s in session %s: %s exit %d stdout %q stderr %q %s",
			language, id, ex.GetState(), ex.GetExitCode(), ex.GetStdout(), ex.GetStderr(), ex.GetStateReason())
	}
	return d, nil
}

// setPool sets template's warm pool size, remembering the first size it
// replaced so that close restores it. A size already in place is left alone
// (no UpdateTemplate call).
func (c *cluster) setPool(ctx context.Context, template string, size int) error {
	resp, err := c.templates.GetTemplate(ctx, connect.NewRequest(&sandboxv1.GetTemplateRequest{TemplateId: template}))
	if err != nil {
		return fmt.Errorf("GetTemplate %s: %w", template, err)
	}
	cur := resp.Msg.GetTemplate().GetWarmPoolSize()
	if int(cur) == size {
		return nil
	}
	c.mu.Lock()
	if _, saved := c.origPools[template]; !saved {
		c.origPools[template] = cur
	}
	c.mu.Unlock()
	n := int32(size)
	if _, err := c.templates.UpdateTemplate(ctx, connect.NewRequest(&sandboxv1.UpdateTemplateRequest{TemplateId: template, WarmPoolSize: &n})); err != nil {
		return fmt.Errorf("UpdateTemplate %s warm_pool_size=%d: %w", template, size, err)
	}
	return nil
}

// poolReady sums the ready warm containers of template over every node.
func (c *cluster) poolReady(ctx context.Context, template string) (int, []*sandboxv1.Node, error) {
	resp, err := c.nodes.ListNodes(ctx, connect.NewRequest(&sandboxv1.ListNodesRequest{}))
	if err != nil {
		return 0, nil, fmt.Errorf("ListNodes: %w", err)
	}
	return readyOf(resp.Msg.GetNodes(), template), resp.Msg.GetNodes(), nil
}

// readyOf sums Node.warm_pools[template].ready.
func readyOf(nodes []*sandboxv1.Node, template string) int {
	sum := 0
	for _, n := range nodes {
		for _, p := range n.GetWarmPools() {
			if p.GetTemplateId() == template {
				sum += int(p.GetReady())
			}
		}
	}
	return sum
}

// errPoolStalled is returned when a warm pool stops moving towards its target.
var errPoolStalled = errors.New("warm pool made no progress")

// waitPool waits until the cluster reports exactly want ready containers of
// template (ListNodes, summed over nodes: what the servers heard by gossip)
// and the agents' own count (sandbox_agent_warm_ready on their /metrics)
// agrees: gossip can lag an agent that has just handed out a container, and
// a create made on a stale count measures a miss, not the warm path. It
// fails when the count has not
// moved towards want for c.poolTimeout, so that a build whose agents keep no
// warm pools fails with a message instead of hanging.
func (c *cluster) waitPool(ctx context.Context, template string, want int) error {
	c.mu.Lock()
	stalled := c.stalled
	c.mu.Unlock()
	if stalled != nil && want > 0 {
		return fmt.Errorf("not waiting again: %w", stalled)
	}
	start := time.Now()
	best, lastMove := -1, time.Now()
	for {
		got, _, err := c.poolReady(ctx, template)
		if err != nil {
			return err
		}
		if got == want {
			if truth, ok := c.agentReady(ctx, template); !ok || truth == want {
				return nil
			}
		}
		dist := abs(want - got)
		if best < 0 || dist < best {
			best, lastMove = dist, time.Now()
		}
		if time.Since(lastMove) > c.poolTimeout {
			err := fmt.Errorf("%w: %s has %d of %d ready containers (ClusterService.ListNodes) after %s, unchanged for %s: "+
				"are warm pools working in this build (agent and scheduler)? See the agents' logs",
				errPoolStalled, template, got, want, time.Since(start).Round(time.Second), c.poolTimeout)
			if want > 0 {
				c.mu.Lock()
				c.stalled = cmpOr(c.stalled, err)
				c.mu.Unlock()
			}
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s's warm pool (%d of %d ready): %w", template, got, want, ctx.Err())
		case <-time.After(25 * time.Millisecond):
		}
	}
}

func abs(v int) int {
	if v < 0 {
		return -v
	}
	return v
}

// terminateAll ends sessions with up to 16 calls at a time.
func (c *cluster) terminateAll(ctx context.Context, ids []string) error {
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
		sem   = make(chan struct{}, 16)
	)
	for _, id := range ids {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if _, err := c.terminate(ctx, id); err != nil {
				mu.Lock()
				first = cmpOr(first, err)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return first
}

func cmpOr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

// close terminates the sessions still live and restores the pool sizes.
func (c *cluster) close(ctx context.Context) error {
	c.mu.Lock()
	var ids []string
	for id := range c.live {
		ids = append(ids, id)
	}
	pools := c.origPools
	c.origPools = map[string]int32{}
	c.mu.Unlock()
	err := c.terminateAll(ctx, ids)
	for t, size := range pools {
		n := size
		if _, e := c.templates.UpdateTemplate(ctx, connect.NewRequest(&sandboxv1.UpdateTemplateRequest{TemplateId: t, WarmPoolSize: &n})); e != nil {
			err = cmpOr(err, fmt.Errorf("restore %s warm_pool_size=%d: %w", t, size, e))
		}
	}
	return err
}

// agentReady sums sandbox_agent_warm_ready of template over the agents'
// /metrics; ok is false when no agent answered.
func (c *cluster) agentReady(ctx context.Context, template string) (int, bool) {
	resp, err := c.nodes.ListNodes(ctx, connect.NewRequest(&sandboxv1.ListNodesRequest{}))
	if err != nil {
		return 0, false
	}
	sum, ok := 0, false
	for _, n := range resp.Msg.GetNodes() {
		addr := n.GetAddress()
		if !strings.Contains(addr, "://") {
			addr = "http://" + addr
		}
		m, err := c.scrape(ctx, addr+"/metrics", "sandbox_agent_warm_ready", map[string]string{"template": template}, "template")
		if err != nil {
			continue
		}
		ok = true
		sum += int(m[template])
	}
	return sum, ok
}

// claimCounts sums sandbox_agent_warm_claims_total of template by result
// (hit, miss) over the agents' /metrics. ok is false when no agent answered.
func (c *cluster) claimCounts(ctx context.Context, template string) (map[string]float64, bool) {
	resp, err := c.nodes.ListNodes(ctx, connect.NewRequest(&sandboxv1.ListNodesRequest{}))
	if err != nil {
		return nil, false
	}
	out := map[string]float64{}
	ok := false
	for _, n := range resp.Msg.GetNodes() {
		addr := n.GetAddress()
		if !strings.Contains(addr, "://") {
			addr = "http://" + addr
		}
		m, err := c.scrape(ctx, addr+"/metrics", "sandbox_agent_warm_claims_total", map[string]string{"template": template}, "result")
		if err != nil {
			continue
		}
		ok = true
		for k, v := range m {
			out[k] += v
		}
	}
	return out, ok
}

func (c *cluster) scrape(ctx context.Context, url, metric string, match map[string]string, by string) (map[string]float64, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return parseCounter(resp.Body, metric, match, by)
}

// parseCounter reads the Prometheus text format and sums the samples of
// metric whose labels include match, keyed by the value of label by.
func parseCounter(r io.Reader, metric string, match map[string]string, by string) (map[string]float64, error) {
	out := map[string]float64{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		rest, ok := strings.CutPrefix(line, metric)
		if !ok || (rest != "" && rest[0] != '{' && rest[0] != ' ') {
			continue
		}
		labels := map[string]string{}
		if strings.HasPrefix(rest, "{") {
			end := strings.LastIndex(rest, "}")
			if end < 0 {
				continue
			}
			for _, kv := range splitLabels(rest[1:end]) {
				k, v, _ := strings.Cut(kv, "=")
				if uq, err := strconv.Unquote(v); err == nil {
					labels[k] = uq
				}
			}
			rest = rest[end+1:]
		}
		fields := strings.Fields(rest)
		if len(fields) == 0 {
			continue
		}
		v, err := strconv.ParseFloat(fields[0], 64)
		if err != nil {
			continue
		}
		matched := true
		for k, want := range match {
			matched = matched && labels[k] == want
		}
		if matched {
			out[labels[by]] += v
		}
	}
	return out, sc.Err()
}

// splitLabels splits `a="x",b="y,z"` at the commas outside quotes.
func splitLabels(s string) []string {
	var out []string
	inQuote, escaped, start := false, false, 0
	for i, ch := range s {
		switch {
		case escaped:
			escaped = false
		case ch == '\\':
			escaped = true
		case ch == '"':
			inQuote = !inQuote
		case ch == ',' && !inQuote:
			out = append(out, s[start:i])
			start = i + 1
		}
	}
	if start < len(s) {
		out = append(out, s[start:])
	}
	return out
}

// claimNote describes the warm claims between two claimCounts readings.
func claimNote(before, after map[string]float64, okBefore, okAfter bool) string {
	if !okBefore || !okAfter {
		return ""
	}
	hit := after["hit"] - before["hit"]
	miss := after["miss"] - before["miss"]
	return fmt.Sprintf("agents counted %.0f warm hits, %.0f misses", hit, miss)
}

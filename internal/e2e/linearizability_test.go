package e2e

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/anishathalye/porcupine"

	"github.com/sandboxhq/sandbox/api"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/v1/sandboxv1connect"
)

// The chaos knobs, read from the environment so that a failure can be
// replayed: SANDBOX_CHAOS_SEED fixes the base seed (run N uses base+N, and
// the subtest's name shows it), SANDBOX_CHAOS_RUNS repeats the scenario on a
// fresh cluster, SANDBOX_CHAOS_OUT is where a failing history's
// visualization is written.
const (
	chaosSeedEnv = "SANDBOX_CHAOS_SEED"
	chaosRunsEnv = "SANDBOX_CHAOS_RUNS"
	chaosOutEnv  = "SANDBOX_CHAOS_OUT"
)

// The workload's shape.
const (
	linClients   = 4
	linKeys      = 5
	linOpTimeout = 5 * time.Second
)

// chaosSettings reads the base seed and the number of runs.
func chaosSettings(t *testing.T) (base int64, runs int) {
	t.Helper()
	base = time.Now().UnixNano()
	if s := os.Getenv(chaosSeedEnv); s != "" {
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			t.Fatalf("%s=%q: %v", chaosSeedEnv, s, err)
		}
		base = v
	}
	runs = 1
	if s := os.Getenv(chaosRunsEnv); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil || v < 1 {
			t.Fatalf("%s=%q: want a positive integer", chaosRunsEnv, s)
		}
		runs = v
	}
	return base, runs
}

// TestLinearizability drives a key-value register, built on replicated
// templates, from several clients through every server while leaders are
// killed -9 and restarted, and checks the history with porcupine: every
// acknowledged put, delete and get must fit one sequential order that
// respects real time. Afterwards every server converges on the same state.
func TestLinearizability(t *testing.T) {
	base, runs := chaosSettings(t)
	t.Logf("chaos base seed %d, %d run(s); replay run N with %s=<its seed> %s=1", base, runs, chaosSeedEnv, chaosRunsEnv)
	for i := range runs {
		seed := base + int64(i)
		t.Run(fmt.Sprintf("run-%d-seed-%d", i, seed), func(t *testing.T) {
			t.Logf("seed %d", seed)
			runLinearizability(t, seed)
		})
	}
}

// linKind is a register operation.
type linKind int

const (
	linPut    linKind = iota // CreateTemplate: sets the value if the key is absent
	linDelete                // DeleteTemplate: removes the key if present
	linGet                   // GetTemplate: reads the value
)

// linInput is an operation's input: a key and, for a put, the value.
type linInput struct {
	kind  linKind
	key   string
	value string
}

// linOutput is an operation's result. ok means created (put), deleted
// (delete) or present (get, with value). unknown marks a write whose outcome
// the client could not learn: it may or may not have been applied, and the
// model accepts any result for it.
type linOutput struct {
	unknown bool
	ok      bool
	value   string
}

// registerModel is one key's register; the state is its value, "" when the
// key is absent.
var registerModel = porcupine.Model{
	Partition: func(history []porcupine.Operation) [][]porcupine.Operation {
		byKey := map[string][]porcupine.Operation{}
		for _, op := range history {
			k := op.Input.(linInput).key
			byKey[k] = append(byKey[k], op)
		}
		var out [][]porcupine.Operation
		for _, k := range slices.Sorted(maps.Keys(byKey)) {
			out = append(out, byKey[k])
		}
		return out
	},
	Init: func() any { return "" },
	Step: func(state, input, output any) (bool, any) {
		st, in, out := state.(string), input.(linInput), output.(linOutput)
		switch in.kind {
		case linPut:
			switch {
			case st == "" && (out.ok || out.unknown):
				return true, in.value
			case st != "" && (!out.ok || out.unknown):
				return true, st
			}
			return false, st
		case linDelete:
			if out.unknown || out.ok == (st != "") {
				return true, ""
			}
			return false, st
		default:
			return out.ok == (st != "") && out.value == st, st
		}
	},
	DescribeOperation: func(input, output any) string {
		in, out := input.(linInput), output.(linOutput)
		res := "?"
		switch {
		case out.unknown:
		case in.kind == linGet && out.ok:
			res = strconv.Quote(out.value)
		case in.kind == linGet:
			res = "absent"
		case out.ok:
			res = "ok"
		case in.kind == linPut:
			res = "already_exists"
		default:
			res = "not_found"
		}
		switch in.kind {
		case linPut:
			return fmt.Sprintf("put(%s, %q) -> %s", in.key, in.value, res)
		case linDelete:
			return fmt.Sprintf("delete(%s) -> %s", in.key, res)
		}
		return fmt.Sprintf("get(%s) -> %s", in.key, res)
	},
	DescribeState: func(state any) string {
		if state.(string) == "" {
			return "absent"
		}
		return strconv.Quote(state.(string))
	},
}

// linHistory collects operations from concurrent clients, with timestamps
// from one monotonic clock.
type linHistory struct {
	start time.Time

	mu       sync.Mutex
	ops      []porcupine.Operation
	unknown  []int // indexes of ops whose Return is the history's end
	notSent  int   // writes refused before any byte left (connection refused)
	failed   int   // reads that failed; a read changes nothing, so they are left out
	annotate []porcupine.Annotation
}

func (h *linHistory) now() int64 { return int64(time.Since(h.start)) }

func (h *linHistory) add(op porcupine.Operation) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if op.Output.(linOutput).unknown {
		h.unknown = append(h.unknown, len(h.ops))
	}
	h.ops = append(h.ops, op)
}

func (h *linHistory) count(n *int) {
	h.mu.Lock()
	*n++
	h.mu.Unlock()
}

// event records a chaos action for the visualization.
func (h *linHistory) event(t *testing.T, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	ts := h.now()
	t.Logf("chaos at %v: %s", time.Duration(ts).Round(time.Millisecond), msg)
	h.mu.Lock()
	h.annotate = append(h.annotate, porcupine.Annotation{Tag: "chaos", Start: ts, End: ts, Description: msg})
	h.mu.Unlock()
}

// finish closes the history: operations of unknown outcome stay open until
// its end, so they may be placed anywhere after their call.
func (h *linHistory) finish() []porcupine.Operation {
	h.mu.Lock()
	defer h.mu.Unlock()
	end := h.now()
	for _, i := range h.unknown {
		h.ops[i].Return = end
	}
	return slices.Clone(h.ops)
}

func linKey(i int) string { return fmt.Sprintf("lin-k%d", i) }

// linDo runs one operation against a server and classifies its result.
// sent is false when the request provably never reached the server.
func linDo(ctx context.Context, tc sandboxv1connect.TemplateServiceClient, in linInput) (out linOutput, sent bool, err error) {
	ctx, cancel := context.WithTimeout(ctx, linOpTimeout)
	defer cancel()
	switch in.kind {
	case linPut:
		_, err = tc.CreateTemplate(ctx, connect.NewRequest(&sandboxv1.CreateTemplateRequest{Template: &sandboxv1.Template{
			Id: in.key, Image: "img-" + in.value, Languages: []string{"python"},
		}}))
		switch {
		case err == nil:
			return linOutput{ok: true}, true, nil
		case connect.CodeOf(err) == connect.CodeAlreadyExists:
			return linOutput{}, true, nil
		}
	case linDelete:
		_, err = tc.DeleteTemplate(ctx, connect.NewRequest(&sandboxv1.DeleteTemplateRequest{TemplateId: in.key}))
		switch {
		case err == nil:
			return linOutput{ok: true}, true, nil
		case connect.CodeOf(err) == connect.CodeNotFound:
			return linOutput{}, true, nil
		}
	case linGet:
		var resp *connect.Response[sandboxv1.GetTemplateResponse]
		resp, err = tc.GetTemplate(ctx, connect.NewRequest(&sandboxv1.GetTemplateRequest{TemplateId: in.key}))
		switch {
		case err == nil:
			return linOutput{ok: true, value: strings.TrimPrefix(resp.Msg.GetTemplate().GetImage(), "img-")}, true, nil
		case connect.CodeOf(err) == connect.CodeNotFound:
			return linOutput{}, true, nil
		}
	}
	// Unavailable (from the forwarding layer or a leader that lost its
	// term), a deadline, a broken connection: the write may have been
	// committed or not. Only a refused connection proves nothing was sent.
	return linOutput{unknown: true}, !errors.Is(err, syscall.ECONNREFUSED), err
}

// linClient issues random operations round-robin over the servers until
// stop closes, so that most calls go through a follower that forwards them.
// Stopping lets the operation in flight finish: a write abandoned at the end
// could still be committed after the final reads. ctx ends the test's calls.
func linClient(ctx context.Context, stop <-chan struct{}, id int, seed int64, servers []*server, h *linHistory) {
	rng := rand.New(rand.NewPCG(uint64(seed), uint64(id)))
	clients := make([]sandboxv1connect.TemplateServiceClient, len(servers))
	for i, srv := range servers {
		clients[i] = sandboxv1connect.NewTemplateServiceClient(api.NewH2CClient(), "http://"+srv.apiAddr, api.WithBearer(apiKey))
	}
	pause := func(d time.Duration) bool {
		select {
		case <-stop:
			return false
		case <-ctx.Done():
			return false
		case <-time.After(d):
			return true
		}
	}
	for n := 0; ; n++ {
		in := linInput{key: linKey(rng.IntN(linKeys))}
		switch r := rng.IntN(100); {
		case r < 40:
			in.kind = linGet
		case r < 75:
			in.kind, in.value = linPut, fmt.Sprintf("c%d-%d", id, n)
		default:
			in.kind = linDelete
		}
		call := h.now()
		out, sent, err := linDo(ctx, clients[(id+n)%len(servers)], in)
		ret := h.now()
		switch {
		case !out.unknown:
			h.add(porcupine.Operation{ClientId: id, Input: in, Call: call, Output: out, Return: ret})
		case in.kind == linGet:
			h.count(&h.failed)
		case !sent:
			h.count(&h.notSent)
		default:
			h.add(porcupine.Operation{ClientId: id, Input: in, Call: call, Output: out, Metadata: err.Error()})
		}
		// Back off after an error, so that an election does not fill the
		// history with open writes.
		wait := time.Duration(5+rng.IntN(30)) * time.Millisecond
		if err != nil {
			wait = time.Duration(50+rng.IntN(100)) * time.Millisecond
		}
		if !pause(wait) {
			return
		}
	}
}

// chaosPause waits a random duration in [lo, lo+spread).
func chaosPause(rng *rand.Rand, lo, spread time.Duration) {
	time.Sleep(lo + time.Duration(rng.Int64N(int64(spread))))
}

func runLinearizability(t *testing.T, seed int64) {
	c := startServersIn(t, 3, chaosDir(t))
	rng := rand.New(rand.NewPCG(uint64(seed), 0))
	h := &linHistory{start: time.Now()}

	ctx, cancel := context.WithCancel(context.Background())
	stop := make(chan struct{})
	stopLoad := sync.OnceFunc(func() { close(stop) })
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	defer stopLoad()
	for id := range linClients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			linClient(ctx, stop, id, seed, c.servers, h)
		}()
	}

	// The chaos schedule: kill the leader, bring it back, kill the next
	// leader, bring it back, all under load.
	loadStart := time.Now()
	for round := 1; round <= 2; round++ {
		chaosPause(rng, 700*time.Millisecond, 800*time.Millisecond)
		lead := c.leader(t, liveServers(c))
		kill9(lead.cmd)
		h.event(t, "kill -9 %s (leader, round %d)", lead.id, round)
		chaosPause(rng, 1500*time.Millisecond, time.Second)
		c.startServer(lead)
		h.event(t, "restart %s", lead.id)
		next := c.leader(t, c.servers) // all three follow one leader again
		h.event(t, "all servers follow %s", next.id)
	}
	chaosPause(rng, 500*time.Millisecond, 500*time.Millisecond)
	stopLoad()
	wg.Wait()
	load := time.Since(loadStart)

	// Final reads, once the cluster is quiet, pin the end state of every key.
	for k := range linKeys {
		in := linInput{kind: linGet, key: linKey(k)}
		deadline := time.Now().Add(30 * time.Second)
		for i := 0; ; i++ {
			tc := sandboxv1connect.NewTemplateServiceClient(api.NewH2CClient(), "http://"+c.servers[(k+i)%len(c.servers)].apiAddr, api.WithBearer(apiKey))
			call := h.now()
			out, _, err := linDo(context.Background(), tc, in)
			ret := h.now()
			if err == nil {
				h.add(porcupine.Operation{ClientId: linClients, Input: in, Call: call, Output: out, Return: ret, Metadata: "final read"})
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("final read of %s: %v", in.key, err)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	checkConverged(t, c, h)
	ops := h.finish()
	t.Logf("%v of load: %d operations recorded (%d of unknown outcome), %d writes refused before sending, %d failed reads left out",
		load.Round(time.Millisecond), len(ops), len(h.unknown), h.notSent, h.failed)

	checkStart := time.Now()
	res, info := porcupine.CheckOperationsVerbose(registerModel, ops, 30*time.Second)
	t.Logf("porcupine: %s in %v", res, time.Since(checkStart).Round(time.Millisecond))
	if res != porcupine.Ok {
		info.AddAnnotations(h.annotate)
		t.Errorf("the history is not linearizable (porcupine says %s; seed %d); visualization: %s; illegal keys: %s",
			res, seed, writeVisualization(t, seed, info), writeIllegalKeys(t, seed, ops, h.annotate))
	}
}

// chaosDir returns a maker of a short directory for a run's cluster (the
// subtest's name would make t.TempDir too long for the agent's socket
// paths). A failed run keeps it, with every server's full log.
func chaosDir(t *testing.T) func() string {
	return func() string {
		dir, err := os.MkdirTemp("", "chaos-")
		must(t, err)
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("the run's cluster files and full logs are kept in %s", dir)
				return
			}
			_ = os.RemoveAll(dir)
		})
		return dir
	}
}

// chaosOut is where a failing run's files go: $SANDBOX_CHAOS_OUT, or the
// system's temporary directory, so that they outlive the test.
func chaosOut(t *testing.T, seed int64, suffix string) string {
	t.Helper()
	dir := os.Getenv(chaosOutEnv)
	if dir == "" {
		dir = os.TempDir()
	}
	must(t, os.MkdirAll(dir, 0o755))
	return filepath.Join(dir, fmt.Sprintf("linearizability-seed-%d-%d%s", seed, time.Now().Unix(), suffix))
}

// writeIllegalKeys checks each key's history alone and writes the ones that
// are not linearizable as text, in call order with the chaos events, which
// is easier to read next to the servers' logs than the visualization.
func writeIllegalKeys(t *testing.T, seed int64, ops []porcupine.Operation, events []porcupine.Annotation) string {
	t.Helper()
	var b strings.Builder
	var keys []string
	for _, part := range registerModel.Partition(ops) {
		if porcupine.CheckOperationsTimeout(registerModel, part, 30*time.Second) == porcupine.Ok {
			continue
		}
		key := part[0].Input.(linInput).key
		keys = append(keys, key)
		type line struct {
			at   int64
			text string
		}
		var lines []line
		for _, op := range part {
			ret := time.Duration(op.Return).Round(time.Microsecond).String()
			if op.Output.(linOutput).unknown {
				ret = "end (outcome unknown: " + fmt.Sprint(op.Metadata) + ")"
			}
			lines = append(lines, line{op.Call, fmt.Sprintf("%12v .. %s  client %d  %s",
				time.Duration(op.Call).Round(time.Microsecond), ret, op.ClientId, registerModel.DescribeOperation(op.Input, op.Output))})
		}
		for _, e := range events {
			lines = append(lines, line{e.Start, fmt.Sprintf("%12v  *** %s", time.Duration(e.Start).Round(time.Microsecond), e.Description)})
		}
		slices.SortStableFunc(lines, func(a, b line) int { return int(min(max(a.at-b.at, -1), 1)) })
		fmt.Fprintf(&b, "=== key %s\n", key)
		for _, l := range lines {
			b.WriteString(l.text + "\n")
		}
	}
	path := chaosOut(t, seed, ".txt")
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Errorf("write the illegal keys' histories: %v", err)
	}
	return strings.Join(keys, ",") + " (history: " + path + ")"
}

// writeVisualization writes porcupine's HTML view of a history and returns
// its path.
func writeVisualization(t *testing.T, seed int64, info porcupine.LinearizationInfo) string {
	t.Helper()
	path := chaosOut(t, seed, ".html")
	if err := porcupine.VisualizePath(registerModel, info, path); err != nil {
		t.Errorf("write visualization: %v", err)
		return ""
	}
	return path
}

// checkConverged waits until every server's local state (a stale read)
// holds the same templates, and adds that state of the register's keys to
// the history as reads over the last round of polling: replicas that agree
// with each other but not with the acknowledged operations fail the check.
func checkConverged(t *testing.T, c *cluster, h *linHistory) {
	t.Helper()
	local := func(srv *server) (map[string]string, error) {
		req := connect.NewRequest(&sandboxv1.ListTemplatesRequest{})
		req.Header().Set("Sandbox-Read-Consistency", "stale")
		resp, err := sandboxv1connect.NewTemplateServiceClient(api.NewH2CClient(), "http://"+srv.apiAddr, api.WithBearer(apiKey)).
			ListTemplates(context.Background(), req)
		if err != nil {
			return nil, err
		}
		out := map[string]string{}
		for _, tmpl := range resp.Msg.GetTemplates() {
			out[tmpl.GetId()] = tmpl.GetImage()
		}
		return out, nil
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		call := h.now()
		var states []map[string]string
		var problem error
		for _, srv := range c.servers {
			st, err := local(srv)
			if err != nil {
				problem = fmt.Errorf("%s: %w", srv.id, err)
				break
			}
			if len(states) > 0 && !maps.Equal(st, states[0]) {
				problem = fmt.Errorf("%s has %v, %s has %v", c.servers[0].id, states[0], srv.id, st)
				break
			}
			states = append(states, st)
		}
		if problem == nil {
			ret := h.now()
			for k := range linKeys {
				in := linInput{kind: linGet, key: linKey(k)}
				img, ok := states[0][in.key]
				out := linOutput{ok: ok, value: strings.TrimPrefix(img, "img-")}
				h.add(porcupine.Operation{ClientId: linClients + 1, Input: in, Call: call, Output: out, Return: ret, Metadata: "converged state"})
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the servers do not converge on one template set: %v", problem)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

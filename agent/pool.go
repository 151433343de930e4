package agent

import (
	"context"
	"crypto/rand"
	"encoding/base32"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/agent/runtime"
	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	"github.com/sandboxhq/sandbox/executor/executorapi"
)

// Warm pools: per template, the agent keeps ready containers (executor up
// and healthy, no session, no token) so that a session starts by claiming
// one instead of creating a container. A claimed container belongs to its
// session for good and is destroyed with it; the pool refills in the
// background, a bounded number of starts at a time. The servers set the
// targets (SetWarmPools); the agent advertises what is ready over gossip.

// warmPrefix starts the container ids of warm containers.
const warmPrefix = "w-"

// Pool tuning.
const (
	// defaultRefillConcurrency bounds concurrent warm container starts.
	defaultRefillConcurrency = 2
	// poolRetryMin and poolRetryMax bound the pause after a failed start
	// of a template's container, so a broken image does not spin.
	poolRetryMin = time.Second
	poolRetryMax = 30 * time.Second
	// warmGroupSize is how many warm containers share one runtime
	// supervisor (on containerd, one runc shim: about 2 MiB each instead of
	// 2.5 MiB per container). A supervisor's crash takes its group down;
	// their sessions then fail like any whose container exits.
	warmGroupSize = 10
	// poolTick re-checks the pools even when nothing asks.
	poolTick = 5 * time.Second
	// refillQuiet is how long refills wait after the latest claim: the
	// starts of a burst of sessions do not compete for the cpu with
	// container starts that only matter later.
	refillQuiet = 250 * time.Millisecond
)

// poolTarget is one template's wanted pool.
type poolTarget struct {
	image  string
	limits sandbox.Limits
	size   int
}

// warmContainer is a ready container of a pool.
type warmContainer struct {
	id, dir    string
	templateID string
	image      string
	limits     sandbox.Limits
	// exec is its executor's client, connected by the health checks.
	exec *executorClient
	// ctx ends its pool watcher: cancelled when claimed or destroyed.
	ctx    context.Context
	cancel context.CancelFunc
	// exitCh is the runtime's wait on the container, bound to waitCtx
	// (cancelled by waitCancel when the container is destroyed, or when its
	// session is released), so that a claim hands it to the session
	// without waiting on the runtime again. watcherDone is closed when the
	// pool watcher stopped; an exit it read after a claim is in handoff.
	exitCh      <-chan runtime.ExitResult
	waitCancel  context.CancelFunc
	watcherDone chan struct{}
	handoff     chan runtime.ExitResult
	// exited is closed by the watcher when the container ended in the pool.
	exited chan struct{}
	exit   runtime.ExitResult
	// callbacks is the bound, not yet served, callback socket its session
	// will be served on (see listenCallbacks); nil once taken.
	cbMu      sync.Mutex
	callbacks net.Listener
}

// takeCallbacks hands the callback listener over to the claiming session.
func (w *warmContainer) takeCallbacks() net.Listener {
	w.cbMu.Lock()
	defer w.cbMu.Unlock()
	ln := w.callbacks
	w.callbacks = nil
	return ln
}

// pools holds the agent's warm pools. Lock order: Agent.mu, then pools.mu.
type pools struct {
	mu       sync.Mutex
	targets  map[string]poolTarget
	ready    map[string][]*warmContainer
	starting map[string]int
	// failures counts consecutive failed starts per template; retryAt is
	// when the next may be tried.
	failures map[string]int
	retryAt  map[string]time.Time
	closed   bool
	// version grows with every change of ready: servers keep the newest
	// count they hear (gossip and StartSession answers race).
	version uint64
	// unanswered counts, per template, the containers claimed by session
	// starts that have not answered their server yet. The count the agent
	// reports is ready plus unanswered: the server subtracts its own
	// unanswered warm picks, so a claim is neither missed nor subtracted
	// twice, however the answers and gossip interleave.
	unanswered map[string]int
	// started counts warm container starts, to fill runtime groups in turn.
	started int
	// lastClaim is when a session last claimed a container; quiet is the
	// timer that pokes once the refill pause after it is over.
	lastClaim time.Time
	quiet     *time.Timer
	kick      chan struct{}
	// concurrency bounds starts in flight over all templates.
	concurrency int
}

func newPools(concurrency int) *pools {
	if concurrency <= 0 {
		concurrency = defaultRefillConcurrency
	}
	return &pools{
		targets:     map[string]poolTarget{},
		unanswered:  map[string]int{},
		ready:       map[string][]*warmContainer{},
		starting:    map[string]int{},
		failures:    map[string]int{},
		retryAt:     map[string]time.Time{},
		kick:        make(chan struct{}, 1),
		concurrency: concurrency,
	}
}

// poke wakes the pool loop; it never blocks.
func (p *pools) poke() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// counts is what the agent advertises: containers per template that are
// ready or claimed by a start not answered yet, with the version of that
// count.
func (p *pools) counts() (map[string]int32, uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.countsLocked(), p.version
}

// answered is counts for the answer of a session start that claimed a
// container of template claimedFrom (empty: none): the claim is answered
// now, so it leaves the unanswered count.
func (p *pools) answered(claimedFrom string) (map[string]int32, uint64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if claimedFrom != "" {
		if p.unanswered[claimedFrom]--; p.unanswered[claimedFrom] <= 0 {
			delete(p.unanswered, claimedFrom)
		}
		p.version++
	}
	return p.countsLocked(), p.version
}

func (p *pools) countsLocked() map[string]int32 {
	out := map[string]int32{}
	for t, n := range p.unanswered {
		out[t] = int32(n)
	}
	for t, ws := range p.ready {
		if len(ws) > 0 {
			out[t] += int32(len(ws))
		}
	}
	return out
}

// setWarmPools validates and applies the servers' targets.
func (a *Agent) setWarmPools(m *agentv1.SetWarmPoolsRequest) error {
	targets := map[string]poolTarget{}
	for _, t := range m.GetPools() {
		if err := validateID("template_id", t.GetTemplateId()); err != nil {
			return err
		}
		if _, dup := targets[t.GetTemplateId()]; dup {
			return fmt.Errorf("%w: template %s is listed twice", sandbox.ErrInvalidArgument, t.GetTemplateId())
		}
		if t.GetSize() < 0 {
			return fmt.Errorf("%w: template %s: pool size must not be negative, got %d", sandbox.ErrInvalidArgument, t.GetTemplateId(), t.GetSize())
		}
		if t.GetSize() == 0 {
			continue
		}
		if t.GetImage() == "" {
			return fmt.Errorf("%w: template %s: image is required", sandbox.ErrInvalidArgument, t.GetTemplateId())
		}
		l := limitsOf(t.GetLimits())
		if l.CPUMillis <= 0 || l.MemoryMiB <= 0 || l.Pids <= 0 || l.DiskMiB <= 0 {
			return fmt.Errorf("%w: template %s: pool limits must all be positive: %+v", sandbox.ErrInvalidArgument, t.GetTemplateId(), l)
		}
		targets[t.GetTemplateId()] = poolTarget{image: t.GetImage(), limits: l, size: int(t.GetSize())}
	}
	p := a.pools
	p.mu.Lock()
	changed := len(targets) != len(p.targets)
	for id, t := range targets {
		if p.targets[id] != t {
			changed = true
		}
	}
	p.targets = targets
	p.mu.Unlock()
	if changed {
		a.log.Info("warm pool targets", "pools", describeTargets(targets))
	}
	p.poke()
	return nil
}

func describeTargets(ts map[string]poolTarget) string {
	parts := make([]string, 0, len(ts))
	for id, t := range ts {
		parts = append(parts, fmt.Sprintf("%s=%d", id, t.size))
	}
	sort.Strings(parts)
	return strings.Join(parts, " ")
}

// runPools keeps the pools at their targets until ctx ends, then destroys
// every ready container.
func (a *Agent) runPools(ctx context.Context) {
	p := a.pools
	t := time.NewTicker(poolTick)
	defer t.Stop()
	for {
		a.balancePools(ctx)
		select {
		case <-ctx.Done():
			a.drainPools()
			return
		case <-p.kick:
		case <-t.C:
		}
	}
}

// balancePools destroys what no target wants and starts what targets lack,
// within the concurrency bound; starts finish in the background and poke.
func (a *Agent) balancePools(ctx context.Context) {
	p := a.pools
	var surplus []*warmContainer
	type job struct {
		templateID string
		target     poolTarget
		seq        int
	}
	var jobs []job
	now := time.Now()
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	inFlight := 0
	for _, n := range p.starting {
		inFlight += n
	}
	for tmpl, ws := range p.ready {
		t, ok := p.targets[tmpl]
		keep := ws[:0]
		for _, w := range ws {
			if ok && w.image == t.image && w.limits == t.limits {
				keep = append(keep, w)
			} else {
				surplus = append(surplus, w)
			}
		}
		if over := len(keep) - t.size; over > 0 {
			surplus = append(surplus, keep[len(keep)-over:]...)
			keep = keep[:len(keep)-over]
		}
		if len(keep) != len(ws) {
			p.version++
		}
		p.ready[tmpl] = keep
	}
	ids := make([]string, 0, len(p.targets))
	for id := range p.targets {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	if wait := p.lastClaim.Add(refillQuiet).Sub(now); wait > 0 {
		if p.quiet == nil {
			p.quiet = time.AfterFunc(wait, func() {
				p.mu.Lock()
				p.quiet = nil
				p.mu.Unlock()
				p.poke()
			})
		}
		ids = nil // surplus goes now; refills after the pause
	}
	for _, id := range ids {
		t := p.targets[id]
		if now.Before(p.retryAt[id]) {
			continue
		}
		for len(p.ready[id])+p.starting[id] < t.size && inFlight < p.concurrency {
			p.starting[id]++
			inFlight++
			p.started++
			jobs = append(jobs, job{id, t, p.started})
		}
	}
	p.mu.Unlock()

	for _, w := range surplus {
		a.destroyWarm(w, "no longer wanted by the pool's target")
	}
	if len(surplus) > 0 {
		a.sessionsChanged()
	}
	for _, j := range jobs {
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			a.fillOne(ctx, j.templateID, j.target, j.seq)
		}()
	}
}

// fillOne starts one warm container of a template and adds it to the pool.
func (a *Agent) fillOne(ctx context.Context, templateID string, t poolTarget, seq int) {
	p := a.pools
	begin := time.Now()
	w, err := a.startWarm(ctx, templateID, t, warmGroup(a.cfg.ID, seq, p.concurrency))
	p.mu.Lock()
	p.starting[templateID]--
	if err == nil && !p.closed {
		p.ready[templateID] = append(p.ready[templateID], w)
		p.version++
		delete(p.failures, templateID)
		delete(p.retryAt, templateID)
	} else if err != nil {
		p.failures[templateID]++
		pause := poolRetryMin << min(p.failures[templateID]-1, 5)
		p.retryAt[templateID] = time.Now().Add(min(pause, poolRetryMax))
	}
	closed := p.closed
	p.mu.Unlock()
	switch {
	case err != nil:
		if ctx.Err() == nil {
			a.log.Warn("warm container start failed", "template", templateID, "image", t.image, "err", err)
		}
		a.metrics.warmStarts.WithLabelValues(templateID, "error").Inc()
	case closed:
		a.destroyWarm(w, "the agent is shutting down")
	default:
		a.metrics.warmStarts.WithLabelValues(templateID, "ok").Inc()
		a.metrics.warmRefillSeconds.WithLabelValues(templateID).Observe(time.Since(begin).Seconds())
		a.sessionsChanged()
	}
	p.poke()
}

// startWarm starts a container of a template with no session: its executor
// is healthy and waits for /init. On error nothing is left behind.
func (a *Agent) startWarm(ctx context.Context, templateID string, t poolTarget, group string) (*warmContainer, error) {
	id := warmPrefix + randomID()
	w := &warmContainer{
		id: id, dir: filepath.Join(a.socketsDir, id), templateID: templateID, image: t.image, limits: t.limits,
		exited: make(chan struct{}), watcherDone: make(chan struct{}), handoff: make(chan runtime.ExitResult, 1),
		exec: newExecutorClient(id, filepath.Join(a.socketsDir, id, executorapi.ExecutorSocket), ""),
	}
	w.ctx, w.cancel = context.WithCancel(a.baseCtx)
	waitCtx, waitCancel := context.WithCancel(a.baseCtx)
	w.waitCancel = waitCancel
	fail := func(err error) (*warmContainer, error) {
		a.destroyWarm(w, "its start failed")
		return nil, err
	}
	if err := os.RemoveAll(w.dir); err != nil {
		return fail(fmt.Errorf("clear socket dir %s: %w", w.dir, err))
	}
	if err := os.Mkdir(w.dir, 0o700); err != nil {
		return fail(fmt.Errorf("create socket dir: %w", err))
	}
	if err := chownSandbox(w.dir); err != nil {
		return fail(err)
	}
	ln, err := a.listenCallbacks(w.dir)
	if err != nil {
		return fail(err)
	}
	w.callbacks = ln
	sctx, cancel := context.WithTimeout(ctx, maxStartTime)
	defer cancel()
	spec := a.containerSpec(id, w.dir, t.image, t.limits, map[string]string{
		runtime.LabelAgent:    a.cfg.ID,
		runtime.LabelTemplate: templateID,
		runtime.LabelWarm:     "true",
	})
	spec.Group = group
	st, err := a.rt.Start(sctx, spec)
	if err != nil {
		return fail(fmt.Errorf("runtime start of warm container %s (image %s): %w", id, t.image, err))
	}
	if st.Endpoint != "" {
		w.exec = newTCPExecutorClient(id, st.Endpoint, "")
	}
	exitCh, err := a.rt.Wait(waitCtx, id)
	if err != nil {
		close(w.watcherDone)
		return fail(fmt.Errorf("wait on warm container %s: %w", id, err))
	}
	w.exitCh = exitCh
	a.wg.Add(1)
	go a.watchWarm(w)
	if _, err := pollHealth(sctx, w.exec, w.exited, a.healthInterval, a.healthTimeout, func() string {
		return fmt.Sprintf("warm container %s exited before its executor was healthy: %s", id, exitReason(w.exit))
	}); err != nil {
		return fail(err)
	}
	return w, nil
}

// watchWarm takes a warm container that ends while in the pool out of it.
func (a *Agent) watchWarm(w *warmContainer) {
	defer a.wg.Done()
	defer close(w.watcherDone)
	var res runtime.ExitResult
	select {
	case r, ok := <-w.exitCh:
		if !ok {
			r = runtime.ExitResult{ExitCode: -1, Err: errors.New("runtime closed the wait channel")}
		}
		res = r
	case <-w.ctx.Done():
		return
	}
	if w.ctx.Err() != nil {
		w.handoff <- res // claimed meanwhile: the session's watcher gets it
		return
	}
	w.exit = res
	close(w.exited)
	p := a.pools
	p.mu.Lock()
	ws := p.ready[w.templateID]
	for i, x := range ws {
		if x == w {
			p.ready[w.templateID] = append(ws[:i:i], ws[i+1:]...)
			p.version++
			break
		}
	}
	p.mu.Unlock()
	a.log.Warn("warm container exited in the pool", "container", w.id, "template", w.templateID, "exit", exitReason(res))
	a.destroyWarm(w, "it exited in the pool")
	a.sessionsChanged()
	p.poke()
}

// claimWarm takes a ready container of the template for a session with
// limits l, or returns nil: its image must match, and its disk limit too
// (the workspace's size is fixed when the container is created).
func (a *Agent) claimWarm(templateID, image string, l sandbox.Limits) *warmContainer {
	p := a.pools
	p.mu.Lock()
	defer p.mu.Unlock()
	ws := p.ready[templateID]
	for i := len(ws) - 1; i >= 0; i-- {
		w := ws[i]
		if w.image != image || w.limits.DiskMiB != l.DiskMiB {
			continue
		}
		select {
		case <-w.exited:
			continue // its watcher takes it out
		default:
		}
		p.ready[templateID] = append(ws[:i:i], ws[i+1:]...)
		p.unanswered[templateID]++
		p.version++
		p.lastClaim = time.Now()
		w.cancel()
		a.metrics.warmClaims.WithLabelValues(templateID, "hit").Inc()
		p.poke()
		return w
	}
	if templateID != "" {
		a.metrics.warmClaims.WithLabelValues(templateID, "miss").Inc()
	}
	return nil
}

// destroyWarm removes a warm container and its files.
func (a *Agent) destroyWarm(w *warmContainer, why string) {
	w.cancel()
	defer w.exec.close()
	if ln := w.takeCallbacks(); ln != nil {
		_ = ln.Close()
	}
	if w.waitCancel != nil {
		defer w.waitCancel()
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(a.baseCtx), destroyTimeout)
	defer cancel()
	if err := a.rt.Destroy(ctx, w.id); err != nil {
		a.log.Error("destroy warm container", "container", w.id, "template", w.templateID, "why", why, "err", err)
		return
	}
	_ = os.RemoveAll(w.dir)
	_ = os.Remove(a.executorLog(w.id))
	a.log.Debug("warm container destroyed", "container", w.id, "template", w.templateID, "why", why)
}

// drainPools destroys every ready container (the agent is stopping).
func (a *Agent) drainPools() {
	p := a.pools
	p.mu.Lock()
	p.closed = true
	var all []*warmContainer
	for _, ws := range p.ready {
		all = append(all, ws...)
	}
	p.ready = map[string][]*warmContainer{}
	p.version++
	if p.quiet != nil {
		p.quiet.Stop()
	}
	p.mu.Unlock()
	for _, w := range all {
		a.destroyWarm(w, "the agent is shutting down")
	}
}

// warmGroup names the runtime group of the seq-th warm container start:
// groups of warmGroupSize, the concurrent starts spread over as many groups
// (a runtime creates a group's containers one after another). Group names
// carry the agent's id: agents on one host share the runtime.
func warmGroup(agentID string, seq, concurrency int) string {
	lanes := max(concurrency, 1)
	lane := seq % lanes
	return fmt.Sprintf("%s/warm-%d-%d", agentID, lane, seq/(lanes*warmGroupSize))
}

// randomID is 50 random bits in lower-case base32: short, for socket paths.
func randomID() string {
	b := make([]byte, 10)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	return strings.ToLower(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(b)[:10])
}

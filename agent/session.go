package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/agent/runtime"
	"github.com/sandboxhq/sandbox/agent/state"
	"github.com/sandboxhq/sandbox/executor/executorapi"
)

// sandboxUID and sandboxGID own the socket directory; the executor runs as them.
const (
	sandboxUID = 1000
	sandboxGID = 1000
)

// maxSessionIDBytes keeps container ids and socket paths short.
const maxSessionIDBytes = 64

// maxUnixPath is the longest socket path the kernel accepts (sun_path less the NUL).
const maxUnixPath = 107

// containerPrefix makes a container id from a session id.
const containerPrefix = "s-"

type sessionState int

const (
	sessionStarting sessionState = iota
	sessionRunning
	sessionStopping
)

// session is one session's container and everything the agent keeps for it.
// The fields after "Guarded by Agent.mu" are read and written with Agent.mu held.
type session struct {
	id          string
	containerID string
	templateID  string
	image       string
	token       string
	dir         string
	limits      sandbox.Limits
	auth        bearerMatcher
	exec        *executorClient

	// ctx ends the session's watcher and callback server; cancel is called by release.
	ctx    context.Context
	cancel context.CancelFunc
	// stopWait, when set, ends the runtime wait a claimed warm container
	// brought along; release calls it.
	stopWait context.CancelFunc

	callback *http.Server
	// exited is closed by the watcher when the container ended; exit is set before.
	exited chan struct{}
	exit   runtime.ExitResult
	// done is closed once the session is released and gone from the agent's map.
	done chan struct{}

	// Guarded by Agent.mu.
	state         sessionState
	started       bool // Runtime.Start succeeded; Destroy is due
	stopRequested bool
	cancelStart   context.CancelFunc
	// executions are the ids handed to this session's executor (its
	// callbacks are accepted for them); pending are those whose result has
	// not been relayed yet, mirrored in agent.db.
	executions map[string]struct{}
	pending    map[string]struct{}
	// recording holds, per execution whose pending record is being written,
	// a channel closed once the write ended (see execute and settle).
	recording map[string]chan struct{}
}

// newSession builds the agent's view of a session's container; the caller
// sets state and started.
func (a *Agent) newSession(id, containerID, templateID, image, token, dir string, limits sandbox.Limits) *session {
	sctx, scancel := context.WithCancel(a.baseCtx)
	return &session{
		id:          id,
		containerID: containerID,
		templateID:  templateID,
		image:       image,
		token:       token,
		dir:         dir,
		limits:      limits,
		auth:        newBearerMatcher(token),
		exec:        newExecutorClient(id, filepath.Join(dir, executorapi.ExecutorSocket), token),
		ctx:         sctx,
		cancel:      scancel,
		exited:      make(chan struct{}),
		done:        make(chan struct{}),
		executions:  map[string]struct{}{},
		pending:     map[string]struct{}{},
		recording:   map[string]chan struct{}{},
	}
}

// startParams is a validated StartSession request.
type startParams struct {
	SessionID  string
	TemplateID string
	Image      string
	Limits     sandbox.Limits
	Env        map[string]string
	Token      string
}

func (p startParams) validate() error {
	if err := validateID("session_id", p.SessionID); err != nil {
		return err
	}
	if len(p.SessionID) > maxSessionIDBytes {
		return fmt.Errorf("%w: session_id %q is longer than %d characters", sandbox.ErrInvalidArgument, p.SessionID, maxSessionIDBytes)
	}
	if p.TemplateID != "" {
		if err := validateID("template_id", p.TemplateID); err != nil {
			return err
		}
	}
	if p.Image == "" {
		return fmt.Errorf("%w: image is required for session %s", sandbox.ErrInvalidArgument, p.SessionID)
	}
	if err := validateToken(p.Token); err != nil {
		return fmt.Errorf("session %s: %w", p.SessionID, err)
	}
	if err := sandbox.ValidateEnv("env", p.Env); err != nil {
		return fmt.Errorf("session %s: %w", p.SessionID, err)
	}
	l := p.Limits
	if l.CPUMillis < 0 || l.MemoryMiB < 0 || l.Pids < 0 || l.DiskMiB < 0 || l.MaxExecutionTimeoutSeconds < 0 {
		return fmt.Errorf("%w: session %s: limits must not be negative: %+v", sandbox.ErrInvalidArgument, p.SessionID, l)
	}
	return nil
}

// startSession starts a container for a session and returns once its
// executor is healthy and initialised. Starting a running session again with
// the same token returns its container (a retried call); anything else about
// an existing session is ErrAlreadyExists.
//
// claimed names the template whose warm container the start claimed (empty
// when it claimed none), so that the answer can count it (see pools.answered).
func (a *Agent) startSession(ctx context.Context, p startParams) (id string, claimed string, err error) {
	if err := p.validate(); err != nil {
		return "", "", err
	}
	containerID := containerPrefix + p.SessionID
	dir := filepath.Join(a.socketsDir, containerID)
	if n := len(filepath.Join(dir, executorapi.ExecutorSocket)); n > maxUnixPath {
		return "", "", fmt.Errorf("%w: socket path for session %s would be %d bytes (max %d); use a shorter DataDir", sandbox.ErrInvalidArgument, p.SessionID, n, maxUnixPath)
	}

	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		return "", "", fmt.Errorf("%w: agent %s is shutting down", sandbox.ErrUnavailable, a.cfg.ID)
	}
	if s, ok := a.sessions[p.SessionID]; ok {
		st, same := s.state, s.auth.match("Bearer "+p.Token)
		a.mu.Unlock()
		if st == sessionRunning && same && s.image == p.Image {
			return s.containerID, "", nil
		}
		return "", "", fmt.Errorf("%w: session %s already has container %s on agent %s", sandbox.ErrAlreadyExists, p.SessionID, s.containerID, a.cfg.ID)
	}
	// The start finishes even if the server that asked goes away (a leader
	// killed mid-call): the next leader finds the container running and
	// adopts the session. StopSession still cancels it.
	launchCtx, cancelLaunch := context.WithTimeout(context.WithoutCancel(ctx), maxStartTime)
	defer cancelLaunch()
	s := a.newSession(p.SessionID, containerID, p.TemplateID, p.Image, p.Token, dir, p.Limits)
	s.state = sessionStarting
	s.cancelStart = cancelLaunch
	a.sessions[p.SessionID] = s
	a.metrics.sessions.Set(float64(len(a.sessions)))
	a.sessionsChanged()
	a.mu.Unlock()

	used := false
	if w := a.claimWarm(p.TemplateID, p.Image, p.Limits); w != nil {
		claimed = p.TemplateID
		used, err = a.claim(launchCtx, s, w, p)
		if !used {
			a.log.Warn("claiming a warm container failed; starting a new one", "session", s.id, "container", w.id, "err", err)
		}
	}
	if !used {
		err = a.launch(launchCtx, s, p)
	}
	log := a.log.With("session", s.id, "container", s.containerID, "warm", used)

	a.mu.Lock()
	if err == nil {
		select {
		case <-s.exited:
			err = fmt.Errorf("container %s of session %s exited during start: %s", s.containerID, s.id, exitReason(s.exit))
		default:
		}
	}
	if err == nil && s.stopRequested {
		err = fmt.Errorf("%w: session %s was stopped while it started", context.Canceled, s.id)
	}
	if err == nil {
		s.state = sessionRunning
		s.cancelStart = nil
	} else {
		s.state = sessionStopping
	}
	a.mu.Unlock()

	if err != nil {
		log.Warn("session start failed", "err", err)
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), destroyTimeout)
		defer cancel()
		if derr := a.destroy(cctx, s); derr != nil {
			log.Error("destroy container after failed start", "err", derr)
		}
		a.release(s)
		return "", claimed, fmt.Errorf("start session %s on agent %s: %w", s.id, a.cfg.ID, err)
	}
	log.Info("session started", "template", s.templateID, "image", s.image)
	return s.containerID, claimed, nil
}

// launch does the work of a start: socket directory, callback server,
// container, health, init, record. It leaves cleanup to its caller.
func (a *Agent) launch(ctx context.Context, s *session, p startParams) error {
	if err := os.RemoveAll(s.dir); err != nil {
		return fmt.Errorf("clear socket dir %s: %w", s.dir, err)
	}
	if err := os.Mkdir(s.dir, 0o700); err != nil {
		return fmt.Errorf("create socket dir: %w", err)
	}
	if err := chownSandbox(s.dir); err != nil {
		return err
	}
	if err := a.serveCallbacks(s); err != nil {
		return err
	}

	spec := a.containerSpec(s.containerID, s.dir, s.image, p.Limits, map[string]string{
		runtime.LabelAgent:    a.cfg.ID,
		runtime.LabelSession:  s.id,
		runtime.LabelTemplate: s.templateID,
	})
	begin := time.Now()
	st, err := a.rt.Start(ctx, spec)
	if err != nil {
		return fmt.Errorf("runtime start of container %s (image %s): %w", s.containerID, s.image, err)
	}
	a.mu.Lock()
	s.started = true
	if st.Endpoint != "" {
		s.exec = newTCPExecutorClient(s.id, st.Endpoint, s.token)
	}
	a.mu.Unlock()

	exitCh, err := a.rt.Wait(s.ctx, s.containerID)
	if err != nil {
		return fmt.Errorf("wait on container %s: %w", s.containerID, err)
	}
	a.wg.Add(1)
	go a.watch(s, exitCh)

	if _, err := a.waitHealthy(ctx, s, a.healthTimeout); err != nil {
		return err
	}
	a.metrics.startSeconds.Observe(time.Since(begin).Seconds())

	if err := s.exec.init(ctx, executorapi.InitRequest{SessionID: s.id, Token: s.token, Env: p.Env}); err != nil {
		return fmt.Errorf("init executor: %w", err)
	}
	return a.recordSession(s, p)
}

// claim gives a warm container to a session: the session's limits on the
// container, then the callback server, the exit watcher, its token and env
// to the executor (/init) and the record; the session's label follows off
// the start's path. Should the container refuse the limits, it is destroyed
// and claim returns used false (the caller starts a new container); after
// that a failure fails the start, whose cleanup destroys the container.
func (a *Agent) claim(ctx context.Context, s *session, w *warmContainer, p startParams) (used bool, err error) {
	if err := a.rt.Update(ctx, w.id, runtime.Update{Limits: &p.Limits}); err != nil {
		a.destroyWarm(w, "the claim could not apply the session's limits")
		return false, fmt.Errorf("apply the session's limits to warm container %s: %w", w.id, err)
	}
	// The session takes over the pool's wait on the container (and an exit
	// its watcher saw meanwhile) and the executor's open connection.
	<-w.watcherDone
	exitCh := w.exitCh
	select {
	case r := <-w.handoff:
		ch := make(chan runtime.ExitResult, 1)
		ch <- r
		exitCh = ch
	default:
	}
	exec := w.exec.forSession(s.id, s.token)
	a.mu.Lock()
	s.containerID, s.dir, s.exec = w.id, w.dir, exec
	s.stopWait = w.waitCancel
	s.started = true
	a.mu.Unlock()
	// From here the container is the session's: a failure fails the start,
	// whose cleanup destroys it. The record is written beside the init.
	recorded := make(chan error, 1)
	go func() { recorded <- a.recordSession(s, p) }()
	ln := w.takeCallbacks()
	if ln == nil { // not bound at creation: nil again over TCP
		var err error
		if ln, err = a.listenCallbacks(s.dir); err != nil {
			<-recorded
			return true, err
		}
	}
	a.serveCallbacksOn(s, ln)
	a.wg.Add(1)
	go a.watch(s, exitCh)
	if err := exec.init(ctx, executorapi.InitRequest{SessionID: s.id, Token: s.token, Env: p.Env}); err != nil {
		<-recorded
		return true, fmt.Errorf("init executor of warm container %s: %w", w.id, err)
	}
	if err := <-recorded; err != nil {
		return true, err
	}
	a.labelLater(s)
	return true, nil
}

// labelLater puts the session's label on its claimed container, off the
// start's path: agent.db is what maps a session to its container; the label
// is for operators (and a cross-check at re-adoption). Labels are written
// one at a time once claims pause, so a burst of claims does not queue on
// the runtime's metadata store.
func (a *Agent) labelLater(s *session) {
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		for {
			p := a.pools
			p.mu.Lock()
			wait := p.lastClaim.Add(refillQuiet).Sub(time.Now())
			p.mu.Unlock()
			if wait <= 0 {
				break
			}
			select {
			case <-s.ctx.Done():
				return
			case <-time.After(wait):
			}
		}
		select {
		case a.labelSlot <- struct{}{}:
		case <-s.ctx.Done():
			return
		}
		defer func() { <-a.labelSlot }()
		lctx, cancel := context.WithTimeout(s.ctx, destroyTimeout)
		defer cancel()
		if err := a.rt.Update(lctx, s.containerID, runtime.Update{Labels: map[string]string{runtime.LabelSession: s.id}}); err != nil && s.ctx.Err() == nil {
			a.log.Warn("label a claimed container with its session", "session", s.id, "container", s.containerID, "err", err)
		}
	}()
}

// containerSpec is the runtime spec of a sandbox container, for a session
// or a warm pool.
func (a *Agent) containerSpec(id, dir, image string, l sandbox.Limits, labels map[string]string) runtime.Spec {
	return runtime.Spec{
		ID:        id,
		Image:     image,
		Limits:    l,
		SocketDir: dir,
		LogPath:   a.executorLog(id),
		Env: []string{
			"WORKSPACE_PATH=/workspace",
			"CONTROL_PLANE_URL=" + a.controlPlaneURL(),
			"EXECUTOR_SOCKET=" + executorapi.SocketDir + "/" + executorapi.ExecutorSocket,
			"LOG_LEVEL=" + a.cfg.ExecutorLogLevel,
			// The executor runs on one OS thread; set here, it need not
			// re-execute itself to get it (see cmd/sandbox-executor).
			"GOMAXPROCS=1",
		},
		Labels: labels,
	}
}

// recordSession writes a started session to agent.db. Written last: a
// container without a record is destroyed at the next start-up, so a crash
// before it leaves nothing behind.
func (a *Agent) recordSession(s *session, p startParams) error {
	rec := state.Session{
		SessionID:   s.id,
		ContainerID: s.containerID,
		TemplateID:  s.templateID,
		Image:       s.image,
		Token:       s.token,
		SocketDir:   s.dir,
		Limits: state.Limits{
			CPUMillis:                  p.Limits.CPUMillis,
			MemoryMiB:                  p.Limits.MemoryMiB,
			Pids:                       p.Limits.Pids,
			DiskMiB:                    p.Limits.DiskMiB,
			MaxExecutionTimeoutSeconds: p.Limits.MaxExecutionTimeoutSeconds,
		},
		CreatedAt: time.Now().UTC(),
	}
	if err := a.db.PutSession(rec); err != nil {
		return err
	}
	return nil
}

// waitHealthy polls a session's executor until /health answers ok, the
// container exits, or timeout passes.
func (a *Agent) waitHealthy(ctx context.Context, s *session, timeout time.Duration) (executorapi.Health, error) {
	return pollHealth(ctx, s.exec, s.exited, a.healthInterval, timeout, func() string {
		return fmt.Sprintf("container %s of session %s exited before its executor was healthy: %s", s.containerID, s.id, exitReason(s.exit))
	})
}

// pollHealth polls an executor's /health until it answers ok, exited is
// closed (then the error is exitMsg()), or timeout passes. The socket
// appears asynchronously, so a short poll interval keeps starts fast.
func pollHealth(ctx context.Context, c *executorClient, exited <-chan struct{}, interval, timeout time.Duration, exitMsg func() string) (executorapi.Health, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	tick := time.NewTicker(interval)
	defer tick.Stop()
	var last error
	for {
		if c.present() {
			actx, acancel := context.WithTimeout(ctx, 2*time.Second)
			h, err := c.health(actx)
			acancel()
			if err == nil && h.Status == "ok" {
				return h, nil
			}
			if err == nil {
				err = fmt.Errorf("status %q", h.Status)
			}
			last = err
		} else {
			last = fmt.Errorf("socket %s not there yet", c.socket)
		}
		select {
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return executorapi.Health{}, fmt.Errorf("%w: executor of %s not healthy after %s: %v", sandbox.ErrUnavailable, c.sessionID, timeout, last)
			}
			return executorapi.Health{}, fmt.Errorf("waiting for executor of %s: %w", c.sessionID, ctx.Err())
		case <-exited:
			return executorapi.Health{}, errors.New(exitMsg())
		case <-tick.C:
		}
	}
}

// watch waits for the container's exit. An exit the agent did not ask for is
// reported to the servers and the session is cleaned up.
func (a *Agent) watch(s *session, exitCh <-chan runtime.ExitResult) {
	defer a.wg.Done()
	select {
	case res, ok := <-exitCh:
		if !ok {
			res = runtime.ExitResult{ExitCode: -1, Err: errors.New("runtime closed the wait channel")}
		}
		s.exit = res
		close(s.exited)
	case <-s.ctx.Done():
		return
	}

	a.mu.Lock()
	st := s.state
	if st == sessionRunning {
		s.state = sessionStopping
	}
	a.mu.Unlock()
	if st != sessionRunning {
		// Starting: the start fails and cleans up. Stopping: expected.
		return
	}
	reason := "container exited: " + exitReason(s.exit)
	log := a.log.With("session", s.id, "container", s.containerID)
	log.Warn("session container exited unexpectedly", "exit_code", s.exit.ExitCode, "err", s.exit.Err)

	ctx, cancel := context.WithTimeout(a.baseCtx, destroyTimeout)
	defer cancel()
	if err := a.destroy(ctx, s); err != nil {
		log.Error("destroy exited container", "err", err)
	}
	a.release(s)
	a.reportExit(s.id, reason)
}

// reportExit tells the servers a session's container is gone, logging a
// failure: the servers also learn it from ListContainers.
func (a *Agent) reportExit(sessionID, reason string) {
	if err := a.reportSessionExit(a.baseCtx, sessionID, reason); err != nil {
		a.log.Error("report session exit", "session", sessionID, "reason", reason, "err", err)
	}
}

func exitReason(r runtime.ExitResult) string {
	if r.Err != nil {
		return fmt.Sprintf("exit code %d: %v", r.ExitCode, r.Err)
	}
	return fmt.Sprintf("exit code %d", r.ExitCode)
}

// stopSession destroys a session's container and forgets the session.
// Stopping an unknown session is not an error; stopping a starting one
// aborts the start.
func (a *Agent) stopSession(ctx context.Context, id string) error {
	a.mu.Lock()
	s, ok := a.sessions[id]
	if !ok {
		a.mu.Unlock()
		return nil
	}
	switch s.state {
	case sessionStarting, sessionStopping:
		if s.state == sessionStarting {
			s.stopRequested = true
			s.cancelStart()
		}
		a.mu.Unlock()
		select {
		case <-s.done:
			return nil
		case <-ctx.Done():
			return fmt.Errorf("stop session %s: %w", id, ctx.Err())
		}
	}
	s.state = sessionStopping
	a.mu.Unlock()

	if err := a.destroy(ctx, s); err != nil {
		// Keep the session so that a retried stop destroys it.
		a.mu.Lock()
		s.state = sessionRunning
		a.mu.Unlock()
		return fmt.Errorf("stop session %s: %w", id, err)
	}
	a.release(s)
	a.log.Info("session stopped", "session", id, "container", s.containerID)
	return nil
}

// destroy removes the session's container if the runtime started it.
func (a *Agent) destroy(ctx context.Context, s *session) error {
	a.mu.Lock()
	started := s.started
	a.mu.Unlock()
	if !started {
		return nil
	}
	if err := a.rt.Destroy(ctx, s.containerID); err != nil {
		return fmt.Errorf("destroy container %s: %w", s.containerID, err)
	}
	a.mu.Lock()
	s.started = false
	a.mu.Unlock()
	return nil
}

// release frees everything but the container: watcher, callback server,
// executor connections, socket directory, the bbolt record, the map entry.
func (a *Agent) release(s *session) {
	s.cancel()
	if s.stopWait != nil {
		s.stopWait()
	}
	if s.callback != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		if err := s.callback.Shutdown(ctx); err != nil {
			_ = s.callback.Close()
		}
		cancel()
	}
	s.exec.close()
	_ = os.Remove(a.executorLog(s.containerID))
	if err := os.RemoveAll(s.dir); err != nil {
		a.log.Error("remove socket dir", "session", s.id, "dir", s.dir, "err", err)
	}
	if err := a.db.DeleteSession(s.id); err != nil {
		a.log.Error("forget session", "session", s.id, "err", err)
	}
	a.mu.Lock()
	if a.sessions[s.id] == s {
		delete(a.sessions, s.id)
	}
	a.metrics.sessions.Set(float64(len(a.sessions)))
	a.sessionsChanged()
	a.mu.Unlock()
	close(s.done)
}

// serveCallbacks starts the session's callback server on <dir>/agent.sock,
// reachable by the sandbox user only.
func (a *Agent) serveCallbacks(s *session) error {
	ln, err := a.listenCallbacks(s.dir)
	if err != nil {
		return err
	}
	a.serveCallbacksOn(s, ln)
	return nil
}

// listenCallbacks binds <dir>/agent.sock for the sandbox user only. Binding
// creates an inode, which on a busy ext4 costs a quarter of a millisecond:
// warm containers bind theirs when they are created, not when claimed.
// With callbacks over TCP (Config.CallbackListen) there is no socket to
// bind: it returns a nil listener.
func (a *Agent) listenCallbacks(dir string) (net.Listener, error) {
	if a.cfg.CallbackListen != "" {
		return nil, nil
	}
	path := filepath.Join(dir, executorapi.AgentSocket)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen on callback socket %s: %w", path, err)
	}
	if err := chownSandbox(path); err != nil {
		ln.Close()
		return nil, err
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("chmod callback socket %s: %w", path, err)
	}
	return ln, nil
}

// serveCallbacksOn serves the session's callbacks on ln until release; a
// nil ln (callbacks over TCP) serves nothing.
func (a *Agent) serveCallbacksOn(s *session, ln net.Listener) {
	if ln == nil {
		return
	}
	srv := &http.Server{
		Handler:           a.callbacks,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		BaseContext:       func(net.Listener) context.Context { return sessionContext(s) },
	}
	s.callback = srv
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("callback server", "session", s.id, "err", err)
		}
	}()
}

// chownSandbox hands path to the sandbox user. An agent that is not root
// cannot, and then the path stays its own (only useful for tests).
func chownSandbox(path string) error {
	if os.Geteuid() != 0 {
		return nil
	}
	if err := os.Lchown(path, sandboxUID, sandboxGID); err != nil {
		return fmt.Errorf("chown %s to %d:%d: %w", path, sandboxUID, sandboxGID, err)
	}
	return nil
}

// lookup returns a running session, or ErrNotFound.
func (a *Agent) lookup(id string) (*session, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	s, ok := a.sessions[id]
	if !ok || s.state != sessionRunning {
		return nil, fmt.Errorf("%w: session %s is not running on agent %s", sandbox.ErrNotFound, id, a.cfg.ID)
	}
	return s, nil
}

// validateID checks an id used in container names, labels and paths:
// 1-128 characters of [A-Za-z0-9_.-], starting with a letter or digit.
func validateID(field, id string) error {
	if id == "" || len(id) > 128 {
		return fmt.Errorf("%w: %s %q must be 1-128 characters", sandbox.ErrInvalidArgument, field, id)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case (c == '-' || c == '_' || c == '.') && i > 0:
		default:
			return fmt.Errorf("%w: %s %q may only hold letters, digits, '-', '_' and '.', and must start with a letter or digit", sandbox.ErrInvalidArgument, field, id)
		}
	}
	return nil
}

// validateToken checks a callback token: 1-512 printable ASCII characters without spaces.
func validateToken(tok string) error {
	if tok == "" || len(tok) > 512 {
		return fmt.Errorf("%w: callback_token must be 1-512 characters", sandbox.ErrInvalidArgument)
	}
	for i := 0; i < len(tok); i++ {
		if tok[i] <= ' ' || tok[i] > '~' {
			return fmt.Errorf("%w: callback_token must be printable ASCII without spaces", sandbox.ErrInvalidArgument)
		}
	}
	return nil
}

// executorLog is the host file that receives a container's executor output;
// it lives as long as the session, for debugging.
func (a *Agent) executorLog(containerID string) string {
	return filepath.Join(a.cfg.DataDir, "logs", containerID+".log")
}

// maxStartTime bounds one session start (image unpack, container, executor
// health), independently of the caller's deadline.
const maxStartTime = 2 * time.Minute

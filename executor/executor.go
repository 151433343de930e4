// Package executor is the PID 1 of every sandbox container. It serves the
// agent's calls described in executorapi (health, init, execute, cancel),
// runs each execution's code under bubblewrap with a timeout and output
// caps, collects the files the execution created or changed under the
// workspace as artifacts, and reports status, heartbeats, artifacts and the
// result back to the control plane.
//
// Initialization: an executor starts without a session (a warm container).
// POST /init gives it one (id, bearer token, env) exactly once; until then
// /execute answers 409. INTERNAL_API_TOKEN, when set, is the token from the
// start: then every call but /health, /init included, must carry it, and the
// init request may leave its token empty.
//
// Results: COMPLETED carries the program's exit status, non-zero included
// (a death by signal N reads 128+N, with Error naming the signal);
// TIMED_OUT, CANCELED and FAILED (the sandbox could not start) carry exit
// code -1 and an Error saying why. Artifacts are collected in every case
// where the program ran.
//
// Several executions may run at once; they share the workspace, so a file
// written by one while another runs may be reported by both.
package executor

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sandboxhq/sandbox/executor/executorapi"
)

// Executor serves one sandbox container's executions.
type Executor struct {
	cfg    Config
	log    *slog.Logger
	cp     *controlPlane
	reaper *reaper // nil unless cfg.Reaper

	// execCtx ends at shutdown and kills what runs; cbCtx ends a grace
	// period later and stops the last callbacks.
	execCtx    context.Context
	stopExec   context.CancelFunc
	cbCtx      context.Context
	stopCb     context.CancelFunc
	executions sync.WaitGroup

	mu          sync.Mutex
	token       string
	sessionID   string
	sessionEnv  map[string]string
	initialized bool
	closing     bool
	running     map[string]*execution // accepted and not yet reported
	seen        map[string]struct{}   // every id ever accepted
}

// New checks cfg and builds an Executor; Run serves it.
func New(cfg Config) (*Executor, error) {
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("executor config: %w", err)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: cfg.LogLevel}))
	}
	if cfg.BwrapPath == "" {
		p, err := exec.LookPath("bwrap")
		if err != nil {
			return nil, fmt.Errorf("executor config: bubblewrap: %w", err)
		}
		cfg.BwrapPath = p
	}
	if fi, err := os.Stat(cfg.WorkspacePath); err != nil || !fi.IsDir() {
		return nil, fmt.Errorf("executor config: workspace %s is not a directory (%v)", cfg.WorkspacePath, err)
	}
	if cfg.HeartbeatInterval <= 0 {
		cfg.HeartbeatInterval = executorapi.HeartbeatInterval
	}
	if cfg.CallbackRetryBudget <= 0 {
		cfg.CallbackRetryBudget = time.Minute
	}
	e := &Executor{
		cfg:     cfg,
		log:     log,
		token:   cfg.Token,
		running: map[string]*execution{},
		seen:    map[string]struct{}{},
	}
	cp, err := newControlPlane(cfg.ControlPlaneURL, cfg.CallbackRetryBudget, e.currentToken, log)
	if err != nil {
		return nil, fmt.Errorf("executor config: %w", err)
	}
	e.cp = cp
	if cfg.Reaper {
		if e.reaper, err = newReaper(log); err != nil {
			return nil, err
		}
	}
	e.execCtx, e.stopExec = context.WithCancel(context.Background())
	e.cbCtx, e.stopCb = context.WithCancel(context.Background())
	e.checkHiding()
	return e, nil
}

// checkHiding warns about setups in which user code would see the sockets
// or miss its workspace: the sandbox hides only /run.
func (e *Executor) checkHiding() {
	if fi, err := os.Stat(sandboxWorkspace); err != nil || !fi.IsDir() {
		e.log.Error("the root filesystem has no /workspace directory; bubblewrap cannot mount the workspace there and every execution will fail")
	}
	hidden := func(p string) bool { return strings.HasPrefix(filepath.Clean(p), sandboxRun+"/") }
	if e.cfg.Port == "" && !hidden(e.cfg.Socket) {
		e.log.Warn("executor socket is outside /run, so user code can see it", "socket", e.cfg.Socket)
	}
	if _, sock, _ := parseControlPlaneURL(e.cfg.ControlPlaneURL); sock != "" && !hidden(sock) {
		e.log.Warn("control plane socket is outside /run, so user code can see it", "socket", sock)
	}
}

// Run listens and serves until ctx ends, then kills running executions,
// gives them ShutdownGrace to report, and returns.
func (e *Executor) Run(ctx context.Context) error {
	ln, err := e.listen()
	if err != nil {
		return err
	}
	srv := &http.Server{
		Handler:           e.Handler(),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       time.Minute,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(e.log.Handler(), slog.LevelWarn),
	}
	var owned sync.WaitGroup
	reapCtx, stopReaper := context.WithCancel(context.Background())
	if e.reaper != nil {
		owned.Go(func() { e.reaper.run(reapCtx) })
	}
	served := make(chan error, 1)
	owned.Go(func() { served <- srv.Serve(ln) })
	e.log.Info("executor listening", "addr", ln.Addr().String(), "workspace", e.cfg.WorkspacePath,
		"pid", os.Getpid(), "token_preset", e.cfg.Token != "")

	var serveErr error
	select {
	case <-ctx.Done():
	case serveErr = <-served:
	}
	e.log.Info("executor shutting down")
	shutCtx, cancel := context.WithTimeout(context.Background(), e.cfg.ShutdownGrace)
	defer cancel()
	_ = srv.Shutdown(shutCtx)
	e.Close()
	stopReaper()
	owned.Wait()
	if e.cfg.Port == "" {
		_ = os.Remove(e.cfg.Socket)
	}
	if serveErr != nil && !errors.Is(serveErr, http.ErrServerClosed) {
		return fmt.Errorf("serve: %w", serveErr)
	}
	return nil
}

// Close refuses new executions, kills the running ones and waits up to
// ShutdownGrace for their results to be reported.
func (e *Executor) Close() {
	e.mu.Lock()
	e.closing = true
	e.mu.Unlock()
	e.stopExec()
	done := make(chan struct{})
	go func() { e.executions.Wait(); close(done) }()
	grace := e.cfg.ShutdownGrace
	if grace <= 0 {
		grace = 5 * time.Second
	}
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		e.log.Warn("giving up on callbacks of killed executions")
		e.stopCb()
		<-done
	}
	e.stopCb()
}

// listen opens the unix socket, or TCP when a port is configured.
func (e *Executor) listen() (net.Listener, error) {
	if e.cfg.Port != "" {
		addr := net.JoinHostPort(e.cfg.Host, e.cfg.Port)
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("listen on %s: %w", addr, err)
		}
		return ln, nil
	}
	// A socket left by a previous run of this container would make bind fail.
	if fi, err := os.Lstat(e.cfg.Socket); err == nil && fi.Mode()&os.ModeSocket != 0 {
		_ = os.Remove(e.cfg.Socket)
	}
	ln, err := net.Listen("unix", e.cfg.Socket)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", e.cfg.Socket, err)
	}
	// Only the agent, owner of the socket directory, talks to us.
	if err := os.Chmod(e.cfg.Socket, 0o660); err != nil {
		ln.Close()
		return nil, fmt.Errorf("chmod %s: %w", e.cfg.Socket, err)
	}
	return ln, nil
}

func (e *Executor) currentToken() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.token
}

func (e *Executor) health() executorapi.Health {
	e.mu.Lock()
	defer e.mu.Unlock()
	return executorapi.Health{Status: "ok", SessionID: e.sessionID, Initialized: e.initialized, Running: len(e.running)}
}

// execution is one accepted execution.
type execution struct {
	id       string
	language string
	code     string
	timeout  time.Duration
	env      map[string]string // merged base, session and execution env

	cancelOnce sync.Once
	canceled   chan struct{}

	mu     sync.Mutex
	exited bool // the process is gone: too late to cancel
}

// cancel asks the execution to stop; it reports whether that can still matter.
func (x *execution) cancel() bool {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.exited {
		return false
	}
	x.cancelOnce.Do(func() { close(x.canceled) })
	return true
}

func (x *execution) markExited() {
	x.mu.Lock()
	x.exited = true
	x.mu.Unlock()
}

// run carries one execution from start to its reported result.
func (e *Executor) run(x *execution) {
	defer e.executions.Done()
	defer func() {
		e.mu.Lock()
		delete(e.running, x.id)
		e.mu.Unlock()
	}()
	log := e.log.With("execution_id", x.id, "language", x.language)
	res := e.execute(x, log)
	if res.Artifacts == nil {
		res.Artifacts = []executorapi.Artifact{}
	}
	if err := e.cp.Result(e.cbCtx, x.id, res); err != nil {
		log.Error("result callback failed; the result is lost", "state", res.State, "err", err)
		return
	}
	log.Debug("execution finished", "state", res.State, "exit_code", res.ExitCode,
		"duration_ms", res.DurationMS, "artifacts", len(res.Artifacts),
		"stdout_truncated", res.StdoutTruncated, "stderr_truncated", res.StderrTruncated, "error", res.Error)
}

// execute runs x and returns its result, artifacts uploaded.
func (e *Executor) execute(x *execution, log *slog.Logger) executorapi.Result {
	failed := func(format string, args ...any) executorapi.Result {
		return executorapi.Result{State: executorapi.StateFailed, ExitCode: -1, Error: fmt.Sprintf(format, args...)}
	}
	select {
	case <-x.canceled:
		return executorapi.Result{State: executorapi.StateCanceled, ExitCode: -1, Error: "canceled before it started"}
	case <-e.execCtx.Done():
		return executorapi.Result{State: executorapi.StateCanceled, ExitCode: -1, Error: "executor shutting down"}
	default:
	}
	before, err := scanWorkspace(e.cfg.WorkspacePath)
	if err != nil {
		return failed("scan workspace: %v", err)
	}
	stdout := newCappedBuffer(executorapi.MaxOutputBytes)
	stderr := newCappedBuffer(executorapi.MaxOutputBytes)
	spec := processSpec{
		Bwrap:     e.cfg.BwrapPath,
		Workspace: e.cfg.WorkspacePath,
		Language:  x.language,
		Code:      x.code,
		Env:       x.env,
		Stdout:    stdout,
		Stderr:    stderr,
	}
	var start, wait func(*exec.Cmd) error
	if e.reaper != nil {
		start, wait = e.reaper.start, e.reaper.wait
	}
	p, err := startProcess(spec, start, wait)
	if err != nil {
		x.markExited()
		return failed("%v", err)
	}
	log.Debug("execution started", "pid", p.cmd.Process.Pid, "timeout", x.timeout.String())

	// The status goes out beside the run so a slow agent cannot delay the
	// timeout, and only once the run has lasted StatusDelay: a quicker one
	// goes straight to its result. The result waits for the status so the
	// agent sees them in order.
	var callbacks sync.WaitGroup
	hbCtx, stopHeartbeat := context.WithCancel(e.cbCtx)
	callbacks.Go(func() {
		if d := e.cfg.StatusDelay; d > 0 {
			t := time.NewTimer(d)
			defer t.Stop()
			select {
			case <-p.done:
				return
			case <-hbCtx.Done():
				return
			case <-t.C:
			}
		}
		if err := e.cp.Status(e.cbCtx, x.id, executorapi.StateRunning); err != nil {
			log.Warn("status callback failed", "err", err)
		}
	})
	callbacks.Go(func() { e.heartbeat(hbCtx, x.id, log) })

	res := executorapi.Result{State: executorapi.StateCompleted}
	timer := time.NewTimer(x.timeout)
	select {
	case <-p.done:
	case <-timer.C:
		res.State, res.Error = executorapi.StateTimedOut, fmt.Sprintf("execution timed out after %s", x.timeout)
	case <-x.canceled:
		res.State, res.Error = executorapi.StateCanceled, "canceled"
	case <-e.execCtx.Done():
		res.State, res.Error = executorapi.StateCanceled, "executor shutting down"
	}
	timer.Stop()
	p.Kill() // no-op when it already exited
	<-p.done
	x.markExited()
	res.DurationMS = time.Since(p.started).Milliseconds()
	log.Debug("execution exited", "duration_ms", res.DurationMS)
	res.Stdout, res.StdoutTruncated = stdout.Result()
	res.Stderr, res.StderrTruncated = stderr.Result()
	if res.State == executorapi.StateCompleted {
		classifyExit(&res, p.exit)
	} else {
		res.ExitCode = -1
	}

	// Heartbeats go on while artifacts upload: until its result, the
	// execution is running as far as the agent knows.
	var notes []string
	res.Artifacts, notes = e.collectArtifacts(x.id, before, log)
	if n := summarize("artifacts not collected: ", notes, 10); n != "" {
		res.Error = strings.TrimPrefix(res.Error+"; "+n, "; ")
	}
	stopHeartbeat()
	callbacks.Wait()
	log.Debug("execution collected", "artifacts", len(res.Artifacts))
	return res
}

// classifyExit fills a finished process's exit code and, when it did not
// simply exit, the error naming why.
func classifyExit(res *executorapi.Result, ex processExit) {
	res.ExitCode = ex.ExitCode
	switch {
	case ex.Err != nil:
		res.State, res.ExitCode = executorapi.StateFailed, -1
		res.Error = fmt.Sprintf("waiting for the sandbox: %v", ex.Err)
	case ex.Signal != 0:
		res.Error = fmt.Sprintf("sandbox killed by signal %s", signalName(ex.Signal))
	case ex.ExitCode == 1 && strings.HasPrefix(res.Stderr, "bwrap: "):
		// bwrap reports a sandbox it could not set up (a mount, a namespace)
		// on stderr with status 1, before user code ever ran.
		first, _, _ := strings.Cut(res.Stderr, "\n")
		res.State, res.ExitCode = executorapi.StateFailed, -1
		res.Error = "sandbox setup failed: " + strings.TrimPrefix(first, "bwrap: ")
	case ex.ExitCode > 128 && ex.ExitCode <= 128+64:
		// bwrap passes a program's death by signal N on as status 128+N, the
		// shell convention; a program that exits with such a status itself
		// reads the same.
		res.Error = fmt.Sprintf("killed by signal %s (exit status %d)", signalName(syscall.Signal(ex.ExitCode-128)), ex.ExitCode)
	}
}

// heartbeat reports, every HeartbeatInterval until ctx ends, that the execution runs.
func (e *Executor) heartbeat(ctx context.Context, id string, log *slog.Logger) {
	t := time.NewTicker(e.cfg.HeartbeatInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := e.cp.Heartbeat(ctx, id, min(e.cfg.HeartbeatInterval, 5*time.Second)); err != nil && ctx.Err() == nil {
				log.Debug("heartbeat failed", "err", err)
			}
		}
	}
}

// collectArtifacts uploads the files the execution created or changed and
// returns them, with a note for every file it left out.
func (e *Executor) collectArtifacts(id string, before snapshot, log *slog.Logger) ([]executorapi.Artifact, []string) {
	after, err := scanWorkspace(e.cfg.WorkspacePath)
	if err != nil {
		return nil, []string{fmt.Sprintf("scan workspace: %v", err)}
	}
	plan := planArtifacts(changedFiles(before, after), after)
	notes := plan.Skipped
	if after.Incomplete {
		notes = append(notes, fmt.Sprintf("workspace scan stopped after %d entries or %d levels", maxScanEntries, maxScanDepth))
	}
	var arts []executorapi.Artifact
	for i, rel := range plan.Collect {
		a, err := e.uploadArtifact(id, rel, after.Files[rel])
		if err != nil {
			log.Warn("artifact not collected", "path", rel, "err", err)
			notes = append(notes, fmt.Sprintf("%s (%v)", rel, err))
			var ue *uploadError
			if errors.As(err, &ue) && retryable(ue.err) {
				// The control plane failed for a whole retry budget: spend
				// what time is left on the result.
				for _, r := range plan.Collect[i+1:] {
					notes = append(notes, r+" (control plane unavailable)")
				}
				break
			}
			continue
		}
		arts = append(arts, a)
	}
	return arts, notes
}

// uploadError is a failed upload, as opposed to a file that could not be read.
type uploadError struct{ err error }

func (u *uploadError) Error() string { return "upload: " + u.err.Error() }
func (u *uploadError) Unwrap() error { return u.err }

// uploadArtifact opens, hashes and uploads one scanned file.
func (e *Executor) uploadArtifact(id, rel string, want fileState) (executorapi.Artifact, error) {
	f, st, err := openScanned(e.cfg.WorkspacePath, rel, want)
	if err != nil {
		return executorapi.Artifact{}, err
	}
	defer f.Close()
	size := st.Size
	if size > executorapi.MaxArtifactBytes {
		return executorapi.Artifact{}, fmt.Errorf("grew to %d bytes, over the %d-byte limit", size, executorapi.MaxArtifactBytes)
	}
	sum, err := hashFile(f, size)
	if err != nil {
		return executorapi.Artifact{}, err
	}
	if err := e.cp.UploadArtifact(e.cbCtx, id, rel, f, size, sum); err != nil {
		return executorapi.Artifact{}, &uploadError{err: err}
	}
	return executorapi.Artifact{Path: rel, SizeBytes: size, SHA256: sum}, nil
}

// sessionEnvCopy returns the session env to lay under an execution's.
func (e *Executor) sessionEnvCopy() map[string]string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return maps.Clone(e.sessionEnv)
}

package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/agent/runtime"
	"github.com/sandboxhq/sandbox/agent/state"
	"github.com/sandboxhq/sandbox/executor/executorapi"
)

// Start-up decisions, as counted in sandbox_agent_startup_decisions_total.
const (
	decisionAdopted   = "adopted"
	decisionDestroyed = "destroyed"
	decisionDropped   = "dropped"
)

// recoverSessions runs once at start-up, before the agent serves or
// registers, so that the servers' first ListContainers sees the outcome.
// For every container the runtime lists with this agent's label, a running
// one whose session agent.db records is re-adopted and any other is
// destroyed; a record without a container is dropped (the servers find the
// session missing from ListContainers). A session the servers believe runs
// and whose container is destroyed here is reported with ReportSessionExit,
// as its watcher would have. Socket directories and executor logs that no
// session uses are removed. Nothing a previous run started runs twice or is
// left behind.
//
// A container that cannot be destroyed fails the start-up before anything
// is adopted: the agent cannot promise it will not run twice.
func (a *Agent) recoverSessions(ctx context.Context) error {
	recs, err := a.db.Sessions()
	if err != nil {
		return fmt.Errorf("agent %s: start-up: %w", a.cfg.ID, err)
	}
	list, err := a.rt.List(ctx, map[string]string{runtime.LabelAgent: a.cfg.ID})
	if err != nil {
		return fmt.Errorf("agent %s: list containers at start-up: %w", a.cfg.ID, err)
	}
	sort.Slice(list, func(i, j int) bool { return list[i].ID < list[j].ID })
	byContainer := make(map[string]state.Session, len(recs))
	for _, r := range recs {
		byContainer[r.ContainerID] = r
	}

	var adopt []state.Session
	var errs []error
	// endpoints are the executors' TCP endpoints, where the runtime has them.
	endpoints := map[string]string{}
	for _, st := range list {
		endpoints[st.ID] = st.Endpoint
		rec, known := byContainer[st.ID]
		delete(byContainer, st.ID)
		var reason string
		switch {
		case !known:
			reason = "agent.db records no session for it"
		case !st.Running:
			reason = fmt.Sprintf("container exited while its agent was down: exit code %d", st.ExitCode)
		default:
			err := a.adoptable(rec, st)
			if err == nil {
				adopt = append(adopt, rec)
				continue
			}
			reason = "cannot re-adopt it: " + err.Error()
		}
		sessionID := st.Labels[runtime.LabelSession]
		if known {
			sessionID = rec.SessionID
		}
		dctx, cancel := context.WithTimeout(ctx, destroyTimeout)
		err := a.rt.Destroy(dctx, st.ID)
		cancel()
		if err != nil {
			errs = append(errs, fmt.Errorf("destroy container %s left by a previous run: %w", st.ID, err))
			continue
		}
		a.log.Info("start-up: destroyed container left by a previous run", "container", st.ID, "session", sessionID, "reason", reason)
		a.metrics.recovered.WithLabelValues(decisionDestroyed).Inc()
		if known {
			if err := a.db.DeleteSession(rec.SessionID); err != nil {
				errs = append(errs, err)
				continue
			}
			a.goReportExit(rec.SessionID, reason)
		}
	}
	dropped := make([]state.Session, 0, len(byContainer))
	for _, rec := range byContainer {
		dropped = append(dropped, rec)
	}
	sort.Slice(dropped, func(i, j int) bool { return dropped[i].SessionID < dropped[j].SessionID })
	for _, rec := range dropped {
		if err := a.db.DeleteSession(rec.SessionID); err != nil {
			errs = append(errs, err)
			continue
		}
		a.log.Info("start-up: dropped the record of a session whose container is gone", "session", rec.SessionID, "container", rec.ContainerID)
		a.metrics.recovered.WithLabelValues(decisionDropped).Inc()
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("agent %s: start-up: %w", a.cfg.ID, err)
	}

	// Health checks of dead executors take their full bound: run them side by side.
	var wg sync.WaitGroup
	for _, rec := range adopt {
		wg.Add(1)
		go func() {
			defer wg.Done()
			a.adopt(ctx, rec, endpoints[rec.ContainerID])
		}()
	}
	wg.Wait()
	a.removeUnused()
	return nil
}

// adoptable checks a record against its running container before the agent
// takes it back.
func (a *Agent) adoptable(rec state.Session, st runtime.Status) error {
	if err := validateID("session_id", rec.SessionID); err != nil {
		return err
	}
	if err := validateToken(rec.Token); err != nil {
		return err
	}
	if l := st.Labels[runtime.LabelSession]; l != "" && l != rec.SessionID {
		return fmt.Errorf("container is labelled with session %q, agent.db with %q", l, rec.SessionID)
	}
	dir := a.socketDirOf(rec)
	if !filepath.IsAbs(dir) {
		return fmt.Errorf("socket directory %q is not absolute", dir)
	}
	if n := len(filepath.Join(dir, executorapi.ExecutorSocket)); n > maxUnixPath {
		return fmt.Errorf("socket path in %s is %d bytes (max %d)", dir, n, maxUnixPath)
	}
	return nil
}

// socketDirOf is a record's socket directory; records from schema v1 do not
// hold one, and used the same place as today's default.
func (a *Agent) socketDirOf(rec state.Session) string {
	if rec.SocketDir != "" {
		return rec.SocketDir
	}
	return filepath.Join(a.socketsDir, rec.ContainerID)
}

// adopt takes back a recorded session whose container runs: the callback
// server on its socket directory, the exit watcher, and a bounded health
// check of its executor. A container that fails any of them is destroyed
// and its exit reported.
func (a *Agent) adopt(ctx context.Context, rec state.Session, endpoint string) {
	l := rec.Limits
	s := a.newSession(rec.SessionID, rec.ContainerID, rec.TemplateID, rec.Image, rec.Token, a.socketDirOf(rec), sandbox.Limits{
		CPUMillis:                  l.CPUMillis,
		MemoryMiB:                  l.MemoryMiB,
		Pids:                       l.Pids,
		DiskMiB:                    l.DiskMiB,
		MaxExecutionTimeoutSeconds: l.MaxExecutionTimeoutSeconds,
	})
	s.state = sessionStarting
	s.started = true
	if endpoint != "" {
		s.exec = newTCPExecutorClient(s.id, endpoint, s.token)
	}
	for _, id := range rec.PendingExecutionIDs {
		s.executions[id] = struct{}{}
		s.pending[id] = struct{}{}
	}
	a.mu.Lock()
	a.sessions[s.id] = s
	a.metrics.sessions.Set(float64(len(a.sessions)))
	a.sessionsChanged()
	a.mu.Unlock()

	log := a.log.With("session", s.id, "container", s.containerID)
	err := a.reattach(ctx, s)
	a.mu.Lock()
	if err == nil {
		select {
		case <-s.exited:
			err = fmt.Errorf("container exited during re-adoption: %s", exitReason(s.exit))
		default:
		}
	}
	if err == nil {
		s.state = sessionRunning
	} else {
		s.state = sessionStopping
	}
	a.mu.Unlock()

	if err != nil {
		log.Warn("start-up: destroying a container that could not be re-adopted", "err", err)
		a.metrics.recovered.WithLabelValues(decisionDestroyed).Inc()
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), destroyTimeout)
		defer cancel()
		if derr := a.destroy(dctx, s); derr != nil {
			log.Error("destroy container after failed re-adoption", "err", derr)
		}
		a.release(s)
		a.goReportExit(s.id, "agent restarted and could not re-adopt the container: "+err.Error())
		return
	}
	log.Info("start-up: re-adopted session", "template", s.templateID, "pending_executions", rec.PendingExecutionIDs)
	a.metrics.recovered.WithLabelValues(decisionAdopted).Inc()
}

// reattach reopens a session's callback socket, watches its container and
// checks its executor, which must hold this session.
func (a *Agent) reattach(ctx context.Context, s *session) error {
	// The previous run was killed without closing its listener: its socket
	// file stays and would make the new listen fail.
	sock := filepath.Join(s.dir, executorapi.AgentSocket)
	if err := os.Remove(sock); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale callback socket %s: %w", sock, err)
	}
	if err := a.serveCallbacks(s); err != nil {
		return err
	}
	exitCh, err := a.rt.Wait(s.ctx, s.containerID)
	if err != nil {
		return fmt.Errorf("wait on container %s: %w", s.containerID, err)
	}
	a.wg.Add(1)
	go a.watch(s, exitCh)

	h, err := a.waitHealthy(ctx, s, a.adoptHealthTimeout)
	if err != nil {
		return err
	}
	if !h.Initialized || (h.SessionID != "" && h.SessionID != s.id) {
		return fmt.Errorf("executor holds session %q (initialized: %v), not %s", h.SessionID, h.Initialized, s.id)
	}
	return nil
}

// goReportExit reports a session's exit without holding up the caller: the
// servers may be down, and the agent must still come up.
func (a *Agent) goReportExit(sessionID, reason string) {
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		a.reportExit(sessionID, reason)
	}()
}

// removeUnused removes the socket directories and executor logs of
// containers the agent does not hold. Failures are logged: they leave
// files, not containers.
func (a *Agent) removeUnused() {
	used := map[string]bool{}
	a.mu.Lock()
	for _, s := range a.sessions {
		used[s.dir] = true
		used[a.executorLog(s.containerID)] = true
	}
	a.mu.Unlock()
	for _, dir := range []string{a.socketsDir, filepath.Join(a.cfg.DataDir, "logs")} {
		entries, err := os.ReadDir(dir)
		if err != nil {
			a.log.Error("start-up: read directory", "dir", dir, "err", err)
			continue
		}
		for _, e := range entries {
			p := filepath.Join(dir, e.Name())
			if used[p] {
				continue
			}
			if err := os.RemoveAll(p); err != nil {
				a.log.Error("start-up: remove leftover", "path", p, "err", err)
			}
		}
	}
}

package scheduler

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"sync"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/api"
	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/scheduler/fsm"
)

const (
	maxLabels       = 64
	defaultPageSize = 100
	maxPageSize     = 1000
	stopTimeout     = 30 * time.Second
)

var labelKey = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$`)

// CreateSession places a session, starts its container and returns once the
// session is RUNNING; a session that cannot start is committed FAILED.
func (s *Scheduler) CreateSession(ctx context.Context, req *sandboxv1.CreateSessionRequest) (*sandboxv1.Session, error) {
	if req.GetTemplateId() == "" {
		return nil, fmt.Errorf("%w: template_id is required", sandbox.ErrInvalidArgument)
	}
	tmpl, ok := s.fsm.Template(req.GetTemplateId())
	if !ok {
		return nil, fmt.Errorf("%w: template %q does not exist", sandbox.ErrNotFound, req.GetTemplateId())
	}
	limits, err := sandbox.ResolveLimits(limitsFromProto(req.GetResourceLimits()), limitsFromProto(tmpl.GetDefaultLimits()), limitsFromProto(tmpl.GetMaxLimits()))
	if err != nil {
		return nil, err
	}
	idle, err := sandbox.ResolveIdleTimeout(req.GetIdleTimeoutSeconds())
	if err != nil {
		return nil, err
	}
	if err := sandbox.ValidateEnv("env", req.GetEnv()); err != nil {
		return nil, err
	}
	if err := validateLabels(req.GetLabels()); err != nil {
		return nil, err
	}
	maxLife, err := s.resolveMaxLifetime(req.GetMaxLifetimeSeconds())
	if err != nil {
		return nil, err
	}
	tenant := api.Principal(ctx)
	if key := req.GetIdempotencyKey(); key != "" {
		if id, ok := s.fsm.IdempotentID(fsm.KindSession, tenant, key); ok {
			return s.awaitSession(ctx, id)
		}
	}
	spec := SessionSpec{
		Env: req.GetEnv(), Labels: req.GetLabels(), IdleTimeout: idle, MaxLifetime: maxLife,
		Tenant: tenant, IdempotencyKey: req.GetIdempotencyKey(),
	}
	if sess, done, err := s.createWarm(ctx, tmpl, limits, spec); done {
		return sess, err
	}
	placed, err := s.PlaceSession(ctx, tmpl, limits, spec)
	if err != nil {
		return nil, err
	}
	if placed.Existing != "" {
		return s.awaitSession(ctx, placed.Existing)
	}
	sess, agent := placed.Session, placed.Agent

	// From here the session exists: finish what was started even if the
	// client goes away, so that no container is left without a record.
	if err := s.startOnAgent(context.WithoutCancel(ctx), agent, tmpl, sess); err != nil {
		return nil, err
	}
	return s.GetSession(ctx, sess.GetId())
}

// createWarm is CreateSession's fast path, taken when placement picks an
// agent for a warm container of the template: the agent claims it first and
// the session is committed once, RUNNING on that container, so a warm start
// costs one Raft commit and no container creation. done is false when the
// path does not apply or the agent could not start the session (the caller
// then takes the ordinary path: commit STARTING, start, commit RUNNING).
//
// Should the commit not happen, the container the agent started has no
// session: it is stopped here, or, if this leader dies first, by the next
// leader's reconciliation (a container no live session owns). While the
// start runs, reconciliation leaves it alone (isStarting).
func (s *Scheduler) createWarm(ctx context.Context, tmpl *sandboxv1.Template, limits sandbox.Limits, spec SessionSpec) (sess *sandboxv1.Session, done bool, err error) {
	agent, h, err := s.placeWarm(limits, tmpl.GetId())
	if err != nil || !h.pickedWarm {
		if h != nil {
			h.release()
		}
		return nil, false, nil
	}
	defer h.release()
	sess = newSession(tmpl, limits, spec, sandboxv1.SessionState_SESSION_STATE_RUNNING)
	sess.AgentId = agent.GetId()
	s.setStarting(sess.GetId(), true)
	defer s.setStarting(sess.GetId(), false)
	// Like the ordinary path, finish even if the client goes away.
	bg, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.StartTimeout)
	defer cancel()
	client := s.agents.get(agent.GetAddress())
	stop := func(why string) {
		if _, err := client.StopSession(bg, connect.NewRequest(&agentv1.StopSessionRequest{Fence: s.fence(), SessionId: sess.GetId()})); err != nil {
			s.log.Warn("stopping a warm start that was not committed", "session", sess.GetId(), "agent", agent.GetId(), "why", why, "err", err)
		}
	}
	// The commit and the claim run side by side: the call costs the longer
	// of the two, not their sum. The session is RUNNING in the replicated
	// state a moment before its container is claimed; nobody knows its id
	// until the call returns, and reconciliation leaves a start in progress
	// alone. A claim that fails turns it FAILED.
	type committed struct {
		resp any
		err  error
	}
	commit := make(chan committed, 1)
	go func() {
		resp, err := s.raft.Apply(bg, fsm.CreateSessionType, &statev1.CreateSession{Session: sess, IdempotencyKey: spec.IdempotencyKey})
		commit <- committed{resp, err}
	}()
	start, startErr := client.StartSession(bg, connect.NewRequest(s.startRequest(tmpl, sess)))
	if startErr == nil {
		h.answered(start.Msg.GetWarmVersion(), start.Msg.GetWarm())
	}
	c := <-commit
	switch ex, existing := c.resp.(fsm.Existing); {
	case c.err == nil && existing:
		stop("an earlier request with its idempotency key created a session")
		out, err := s.awaitSession(ctx, ex.ID)
		return out, true, err
	case errors.Is(c.err, sandbox.ErrResourceExhausted):
		stop("the agent's room was taken meanwhile")
		return nil, false, nil
	case c.err != nil:
		stop("its commit failed")
		return nil, true, c.err
	case startErr != nil:
		stop("its start failed")
		return nil, true, s.failStart(bg, agent, sess, startErr)
	}
	// The container's id is recorded later, off the call's path (see
	// flushContainerIDs); until then this leader answers with it.
	s.mu.Lock()
	s.containerIDs[sess.GetId()] = start.Msg.GetContainerId()
	s.mu.Unlock()
	out, err := s.GetSession(ctx, sess.GetId())
	return out, true, err
}

// flushContainerIDs records the containers of warm starts (one commit each,
// batched by Raft), leaving out sessions that ended meanwhile.
func (s *Scheduler) flushContainerIDs(ctx context.Context) {
	s.mu.Lock()
	pending := s.containerIDs
	s.containerIDs = make(map[string]string)
	s.mu.Unlock()
	var wg sync.WaitGroup
	for id, cid := range pending {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := s.apply(ctx, fsm.UpdateSessionType, &statev1.UpdateSession{
				SessionId: id, State: sandboxv1.SessionState_SESSION_STATE_RUNNING, ContainerId: cid, At: timestamppb.Now(),
			})
			if err := ignoreStale(err); err != nil && !errors.Is(err, sandbox.ErrNotFound) {
				s.log.Warn("recording a warm session's container", "session", id, "container", cid, "err", err)
				s.mu.Lock()
				s.containerIDs[id] = cid // again at the next sweep
				s.mu.Unlock()
			}
		}()
	}
	wg.Wait()
}

// startOnAgent has the agent start a STARTING session's container and
// commits the outcome: RUNNING, or FAILED with the reason (then the error is
// unavailable). A new leader uses it too, for starts its predecessor
// recorded but never handed to the agent.
func (s *Scheduler) startOnAgent(ctx context.Context, agent *statev1.Agent, tmpl *sandboxv1.Template, sess *sandboxv1.Session) error {
	s.setStarting(sess.GetId(), true)
	defer s.setStarting(sess.GetId(), false)
	bg, cancel := context.WithTimeout(ctx, s.cfg.StartTimeout)
	defer cancel()
	start, startErr := s.agents.get(agent.GetAddress()).StartSession(bg, connect.NewRequest(s.startRequest(tmpl, sess)))
	if startErr != nil {
		_, _ = s.agents.get(agent.GetAddress()).StopSession(bg, connect.NewRequest(&agentv1.StopSessionRequest{Fence: s.fence(), SessionId: sess.GetId()}))
		return s.failStart(bg, agent, sess, startErr)
	}
	s.noteWarm(agent.GetId(), "", start.Msg.GetWarmVersion(), start.Msg.GetWarm())
	return s.apply(bg, fsm.UpdateSessionType, &statev1.UpdateSession{
		SessionId: sess.GetId(), State: sandboxv1.SessionState_SESSION_STATE_RUNNING,
		ContainerId: start.Msg.GetContainerId(), At: timestamppb.Now(),
	})
}

// startRequest asks an agent to start (or claim a container for) a session
// with a callback token made for it.
func (s *Scheduler) startRequest(tmpl *sandboxv1.Template, sess *sandboxv1.Session) *agentv1.StartSessionRequest {
	return &agentv1.StartSessionRequest{
		Fence:         s.fence(),
		SessionId:     sess.GetId(),
		TemplateId:    tmpl.GetId(),
		Image:         tmpl.GetImage(),
		Limits:        sess.GetResourceLimits(),
		Env:           sess.GetEnv(),
		CallbackToken: newToken(),
	}
}

// failStart commits a session whose container did not start FAILED with the
// reason and returns the error the caller answers with (unavailable).
func (s *Scheduler) failStart(ctx context.Context, agent *statev1.Agent, sess *sandboxv1.Session, startErr error) error {
	reason := fmt.Sprintf("container failed to start on agent %s: %v", agent.GetId(), startErr)
	s.log.Warn("session failed to start", "session", sess.GetId(), "agent", agent.GetId(), "err", startErr)
	if err := s.apply(ctx, fsm.UpdateSessionType, &statev1.UpdateSession{
		SessionId: sess.GetId(), State: sandboxv1.SessionState_SESSION_STATE_FAILED, Reason: reason, At: timestamppb.Now(),
	}); err != nil {
		return err
	}
	return fmt.Errorf("%w: session %s: %s", sandbox.ErrUnavailable, sess.GetId(), reason)
}

// awaitSession returns a session created by an earlier request with the same
// idempotency key once its start is over; a start that failed is reported
// as the first request reported it.
func (s *Scheduler) awaitSession(ctx context.Context, id string) (*sandboxv1.Session, error) {
	wctx, cancel := context.WithTimeout(ctx, s.cfg.StartTimeout)
	defer cancel()
	sess, err := s.fsm.WaitSession(wctx, id, func(x *sandboxv1.Session) bool {
		st := sandbox.SessionState(x.GetState())
		return st != sandbox.SessionPending && st != sandbox.SessionStarting
	})
	if err != nil {
		return nil, err
	}
	if sess.GetState() == sandboxv1.SessionState_SESSION_STATE_FAILED {
		// Retrying this key cannot help; a new key starts a new session.
		return nil, fmt.Errorf("%w: session %s of this idempotency key failed to start (%s); retry with a new key", sandbox.ErrFailedPrecondition, id, sess.GetStateReason())
	}
	return sess, nil
}

// resolveMaxLifetime applies the server's default to 0.
func (s *Scheduler) resolveMaxLifetime(seconds int32) (time.Duration, error) {
	switch {
	case seconds < 0:
		return 0, fmt.Errorf("%w: max_lifetime_seconds must not be negative, got %d", sandbox.ErrInvalidArgument, seconds)
	case seconds == 0:
		return s.cfg.DefaultMaxLifetime, nil
	}
	return time.Duration(seconds) * time.Second, nil
}

// GetSession returns one session. Another tenant's session does not exist
// for the caller (api.CanSee): it gets the answer an unknown id gets, so ids
// cannot be probed across tenants. Every call on a session or its
// executions looks it up through here.
func (s *Scheduler) GetSession(ctx context.Context, id string) (*sandboxv1.Session, error) {
	if id == "" {
		return nil, fmt.Errorf("%w: session_id is required", sandbox.ErrInvalidArgument)
	}
	sess, ok := s.fsm.Session(id)
	if !ok || !api.CanSee(ctx, sess.GetTenant()) {
		return nil, fmt.Errorf("%w: session %q does not exist", sandbox.ErrNotFound, id)
	}
	if sess.GetContainerId() == "" {
		s.mu.Lock()
		cid := s.containerIDs[id]
		s.mu.Unlock()
		if cid != "" {
			sess.ContainerId = cid // a copy: the FSM hands out clones
		}
	}
	return sess, nil
}

// ListSessions returns the sessions matching the filter, oldest first, one page at a time.
// A tenant's key lists its own sessions only; an admin key lists all.
func (s *Scheduler) ListSessions(ctx context.Context, req *sandboxv1.ListSessionsRequest) ([]*sandboxv1.Session, string, error) {
	for _, st := range req.GetStates() {
		if _, ok := sandboxv1.SessionState_name[int32(st)]; !ok || st == sandboxv1.SessionState_SESSION_STATE_UNSPECIFIED {
			return nil, "", fmt.Errorf("%w: states: %v is not a session state", sandbox.ErrInvalidArgument, st)
		}
	}
	all := s.fsm.Sessions(func(sess *sandboxv1.Session) bool {
		if !api.CanSee(ctx, sess.GetTenant()) {
			return false
		}
		if len(req.GetStates()) > 0 && !slices.Contains(req.GetStates(), sess.GetState()) {
			return false
		}
		for k, v := range req.GetLabels() {
			if got, ok := sess.GetLabels()[k]; !ok || got != v {
				return false
			}
		}
		return true
	})
	return paginate(all, req.GetPageSize(), req.GetPageToken())
}

// TerminateSession stops a session's container and records it TERMINATED.
func (s *Scheduler) TerminateSession(ctx context.Context, id string) (*sandboxv1.Session, error) {
	sess, err := s.GetSession(ctx, id)
	if err != nil {
		return nil, err
	}
	if sandbox.SessionState(sess.GetState()).Terminal() {
		return sess, nil
	}
	if err := s.stopSession(ctx, sess, "terminated by client"); err != nil {
		return nil, err
	}
	return s.GetSession(ctx, id)
}

// stopSession takes a live session through TERMINATING to TERMINATED: its
// container is destroyed and its unfinished executions end CANCELED.
func (s *Scheduler) stopSession(ctx context.Context, sess *sandboxv1.Session, reason string) error {
	bg, cancel := context.WithTimeout(context.WithoutCancel(ctx), stopTimeout)
	defer cancel()
	id := sess.GetId()
	if err := s.apply(bg, fsm.UpdateSessionType, &statev1.UpdateSession{
		SessionId: id, State: sandboxv1.SessionState_SESSION_STATE_TERMINATING, Reason: reason, At: timestamppb.Now(),
	}); err != nil {
		// Another path (a retried request, housekeeping) ended it meanwhile.
		if cur, ok := s.fsm.Session(id); ok && sandbox.SessionState(cur.GetState()).Terminal() {
			return nil
		}
		return err
	}
	if agent, ok := s.fsm.Agent(sess.GetAgentId()); ok {
		if _, err := s.agents.get(agent.GetAddress()).StopSession(bg, connect.NewRequest(&agentv1.StopSessionRequest{Fence: s.fence(), SessionId: id})); err != nil {
			// The session stays TERMINATING; housekeeping tries again.
			return fmt.Errorf("%w: session %s: agent %s did not stop its container (will retry): %v", sandbox.ErrUnavailable, id, agent.GetId(), err)
		}
	}
	now := timestamppb.Now()
	for _, e := range s.fsm.ExecutionsBySession(id) {
		if sandbox.ExecutionState(e.GetState()).Terminal() {
			continue
		}
		err := s.apply(bg, fsm.UpdateExecutionType, &statev1.UpdateExecution{Execution: &sandboxv1.Execution{
			Id: e.GetId(), State: sandboxv1.ExecutionState_EXECUTION_STATE_CANCELED,
			StateReason: "session ended: " + reason, FinishedAt: now, ExitCode: -1,
		}})
		if err := ignoreStale(err); err != nil {
			return err
		}
	}
	return s.apply(bg, fsm.UpdateSessionType, &statev1.UpdateSession{
		SessionId: id, State: sandboxv1.SessionState_SESSION_STATE_TERMINATED, Reason: reason, At: now,
	})
}

func validateLabels(labels map[string]string) error {
	if len(labels) > maxLabels {
		return fmt.Errorf("%w: %d labels, at most %d are allowed", sandbox.ErrInvalidArgument, len(labels), maxLabels)
	}
	for k, v := range labels {
		if !labelKey.MatchString(k) {
			return fmt.Errorf("%w: label key %q must be 1-63 letters, digits, '.', '_', '/' or '-'", sandbox.ErrInvalidArgument, k)
		}
		if len(v) > 256 {
			return fmt.Errorf("%w: label %q: value longer than 256 bytes", sandbox.ErrInvalidArgument, k)
		}
	}
	return nil
}

// paginate cuts a sorted list into pages; the token is an opaque offset.
func paginate[T any](all []T, size int32, token string) ([]T, string, error) {
	switch {
	case size < 0:
		return nil, "", fmt.Errorf("%w: page_size must not be negative, got %d", sandbox.ErrInvalidArgument, size)
	case size == 0:
		size = defaultPageSize
	case size > maxPageSize:
		size = maxPageSize
	}
	off := 0
	if token != "" {
		raw, err := base64.RawURLEncoding.DecodeString(token)
		n, err2 := strconv.Atoi(string(raw))
		if err != nil || err2 != nil || n < 0 {
			return nil, "", fmt.Errorf("%w: page_token %q is not one this server issued", sandbox.ErrInvalidArgument, token)
		}
		off = n
	}
	if off >= len(all) {
		return nil, "", nil
	}
	end := min(off+int(size), len(all))
	next := ""
	if end < len(all) {
		next = base64.RawURLEncoding.EncodeToString([]byte(strconv.Itoa(end)))
	}
	return all[off:end], next, nil
}

// LiveSessions counts the tenant's sessions that are not over (for its
// session quota).
func (s *Scheduler) LiveSessions(tenant string) int {
	return len(s.fsm.Sessions(func(sess *sandboxv1.Session) bool {
		return sess.GetTenant() == tenant && !sandbox.SessionState(sess.GetState()).Terminal()
	}))
}

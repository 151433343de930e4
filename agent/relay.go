package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/agent/artifacts"
	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/executor/executorapi"
)

// Body limits of the callbacks.
const (
	maxStatusBodyBytes = 64 << 10
	// A result carries stdout and stderr of up to MaxOutputBytes each, which
	// JSON escaping can grow up to six times, plus the artifact list.
	maxResultBodyBytes = 12*executorapi.MaxOutputBytes + executorapi.MaxArtifacts*(artifacts.MaxPathBytes+256) + 64<<10
	// reportTimeout bounds one ReportExecution call.
	reportTimeout = 10 * time.Second
)

// Callback kinds, as counted in sandbox_agent_callbacks_total.
const (
	kindStatus    = "status"
	kindHeartbeat = "heartbeat"
	kindArtifact  = "artifact"
	kindResult    = "result"
	kindUnknown   = "unknown"
)

// callbackHandler serves every session's agent.sock: each request is
// served for the session whose socket it came in on (sessionContext puts it
// in the request's context), and it accepts only that session's token and
// only executions handed to that session. It is built once: building a mux
// per session cost a claim 70 µs of pattern parsing.
func (a *Agent) callbackHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("POST /internal/executions/{id}/status", a.callback(kindStatus, a.handleStatus))
	mux.Handle("POST /internal/executions/{id}/heartbeat", a.callback(kindHeartbeat, a.handleHeartbeat))
	mux.Handle("PUT /internal/executions/{id}/artifacts", a.callback(kindArtifact, a.handleArtifact))
	mux.Handle("POST /internal/executions/{id}/result", a.callback(kindResult, a.handleResult))
	mux.Handle("/", a.callback(kindUnknown, func(w http.ResponseWriter, r *http.Request, _ *session, _ string) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no such callback: %s %s", r.Method, r.URL.Path))
	}))
	return mux
}

type sessionKey struct{}

// sessionContext is the base context of a session's callback server.
func sessionContext(s *session) context.Context {
	return context.WithValue(s.ctx, sessionKey{}, s)
}

type callbackFunc func(w http.ResponseWriter, r *http.Request, s *session, executionID string)

// callback wraps a handler with the session's token check, the execution
// ownership check and the callback counter.
func (a *Agent) callback(kind string, h callbackFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec := &statusRecorder{ResponseWriter: w, status: http.StatusOK}
		defer func() {
			a.metrics.callbacks.WithLabelValues(kind, strconv.Itoa(rec.status)).Inc()
		}()
		s, ok := r.Context().Value(sessionKey{}).(*session)
		if !ok || !s.auth.match(r.Header.Get("Authorization")) {
			writeError(rec, http.StatusUnauthorized, "missing or wrong session token")
			return
		}
		if kind == kindUnknown {
			h(rec, r, s, "")
			return
		}
		id := r.PathValue("id")
		if err := artifacts.ValidateExecutionID(id); err != nil {
			writeError(rec, http.StatusBadRequest, err.Error())
			return
		}
		a.mu.Lock()
		_, known := s.executions[id]
		a.mu.Unlock()
		if !known {
			writeError(rec, http.StatusNotFound, fmt.Sprintf("execution %s was not started in session %s", id, s.id))
			return
		}
		h(rec, r, s, id)
	})
}

func (a *Agent) handleStatus(w http.ResponseWriter, r *http.Request, s *session, id string) {
	var rep executorapi.StatusReport
	if err := decodeBody(w, r, maxStatusBodyBytes, &rep, true); err != nil {
		writeError(w, statusOf(err), err.Error())
		return
	}
	if rep.State != "" && rep.State != executorapi.StateRunning {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("status report state must be %s, got %q", executorapi.StateRunning, rep.State))
		return
	}
	a.relay(w, r, s, &agentv1.ReportExecutionRequest{
		AgentId:     a.cfg.ID,
		SessionId:   s.id,
		ExecutionId: id,
		Kind:        agentv1.ReportKind_REPORT_KIND_STATUS,
		State:       sandboxv1.ExecutionState_EXECUTION_STATE_RUNNING,
	}, a.relayAttempts)
}

func (a *Agent) handleHeartbeat(w http.ResponseWriter, r *http.Request, s *session, id string) {
	_, _ = io.Copy(io.Discard, http.MaxBytesReader(w, r.Body, maxStatusBodyBytes))
	// Best effort: one attempt; the next heartbeat comes soon.
	a.relay(w, r, s, &agentv1.ReportExecutionRequest{
		AgentId:     a.cfg.ID,
		SessionId:   s.id,
		ExecutionId: id,
		Kind:        agentv1.ReportKind_REPORT_KIND_HEARTBEAT,
		State:       sandboxv1.ExecutionState_EXECUTION_STATE_RUNNING,
	}, 1)
}

func (a *Agent) handleArtifact(w http.ResponseWriter, r *http.Request, s *session, id string) {
	relPath := r.URL.Query().Get("path")
	if err := artifacts.ValidatePath(relPath); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	want := r.Header.Get("X-Content-Sha256")
	if err := artifacts.ValidateSHA256(want); err != nil {
		writeError(w, http.StatusBadRequest, "X-Content-Sha256: "+err.Error())
		return
	}
	if r.ContentLength > executorapi.MaxArtifactBytes {
		writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("artifact %q is %d bytes, at most %d are accepted", relPath, r.ContentLength, executorapi.MaxArtifactBytes))
		return
	}
	existing, err := a.store.List(id)
	if err != nil {
		writeError(w, http.StatusInternalServerError, err.Error())
		return
	}
	var total int64
	replacing := false
	for _, e := range existing {
		if e.Path == relPath {
			replacing = true
			continue
		}
		total += e.SizeBytes
	}
	if !replacing && len(existing) >= executorapi.MaxArtifacts {
		writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("execution %s already has %d artifacts, the maximum", id, len(existing)))
		return
	}
	limit := min(int64(executorapi.MaxArtifactBytes), executorapi.MaxTotalArtifactBytes-total)
	if limit < 0 {
		limit = 0
	}
	art, err := a.store.Put(id, relPath, r.Body, limit, want)
	switch {
	case errors.Is(err, artifacts.ErrTooLarge):
		writeError(w, http.StatusRequestEntityTooLarge, err.Error())
		return
	case errors.Is(err, sandbox.ErrInvalidArgument):
		writeError(w, http.StatusBadRequest, err.Error())
		return
	case err != nil:
		a.log.Error("store artifact", "session", s.id, "execution", id, "err", err)
		writeError(w, http.StatusInternalServerError, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, executorapi.Artifact{Path: art.Path, SizeBytes: art.SizeBytes, SHA256: art.SHA256})
}

func (a *Agent) handleResult(w http.ResponseWriter, r *http.Request, s *session, id string) {
	var res executorapi.Result
	if err := decodeBody(w, r, maxResultBodyBytes, &res, false); err != nil {
		if statusOf(err) < 500 {
			// The executor does not retry a 4xx: no result will come.
			a.settle(s, id)
		}
		writeError(w, statusOf(err), err.Error())
		return
	}
	st, ok := resultState(res.State)
	errMsg := res.Error
	if !ok {
		st = sandboxv1.ExecutionState_EXECUTION_STATE_FAILED
		errMsg = joinMsg(errMsg, fmt.Sprintf("executor reported state %q, which is not a terminal state", res.State))
	}
	arts, dropped := a.storedArtifacts(id, res.Artifacts)
	if len(dropped) > 0 {
		errMsg = joinMsg(errMsg, "artifacts not stored by the agent and dropped: "+strings.Join(dropped, ", "))
	}
	a.relay(w, r, s, &agentv1.ReportExecutionRequest{
		AgentId:         a.cfg.ID,
		SessionId:       s.id,
		ExecutionId:     id,
		Kind:            agentv1.ReportKind_REPORT_KIND_RESULT,
		State:           st,
		ExitCode:        int32(res.ExitCode),
		Stdout:          res.Stdout,
		Stderr:          res.Stderr,
		StdoutTruncated: res.StdoutTruncated,
		StderrTruncated: res.StderrTruncated,
		DurationMs:      res.DurationMS,
		Artifacts:       arts,
		Error:           errMsg,
	}, a.relayAttempts)
}

// storedArtifacts keeps the reported artifacts the store holds for the
// execution with the same checksum; the rest are returned by path.
func (a *Agent) storedArtifacts(executionID string, reported []executorapi.Artifact) ([]*sandboxv1.Artifact, []string) {
	var out []*sandboxv1.Artifact
	var dropped []string
	seen := map[string]bool{}
	for _, r := range reported {
		if seen[r.Path] {
			continue
		}
		seen[r.Path] = true
		got, err := a.store.Stat(executionID, r.Path)
		if err != nil || got.SHA256 != r.SHA256 {
			dropped = append(dropped, strconv.Quote(r.Path))
			continue
		}
		out = append(out, &sandboxv1.Artifact{Path: got.Path, SizeBytes: got.SizeBytes, Sha256: got.SHA256})
	}
	return out, dropped
}

// resultState maps the executor's terminal state names to sandbox.v1.
func resultState(s string) (sandboxv1.ExecutionState, bool) {
	switch s {
	case executorapi.StateCompleted:
		return sandboxv1.ExecutionState_EXECUTION_STATE_COMPLETED, true
	case executorapi.StateFailed:
		return sandboxv1.ExecutionState_EXECUTION_STATE_FAILED, true
	case executorapi.StateTimedOut:
		return sandboxv1.ExecutionState_EXECUTION_STATE_TIMED_OUT, true
	case executorapi.StateCanceled:
		return sandboxv1.ExecutionState_EXECUTION_STATE_CANCELED, true
	}
	return sandboxv1.ExecutionState_EXECUTION_STATE_UNSPECIFIED, false
}

// relay sends a report to the servers, retrying transient failures up to
// attempts times, and answers the executor: 200 when the report is
// committed, 503/502 when it should retry, 4xx when retrying cannot help.
func (a *Agent) relay(w http.ResponseWriter, r *http.Request, s *session, req *agentv1.ReportExecutionRequest, attempts int) {
	err := a.reportExecution(r.Context(), req, attempts)
	status := http.StatusOK
	if err != nil {
		status = relayStatus(err)
	}
	if req.Kind == agentv1.ReportKind_REPORT_KIND_RESULT && status < 500 {
		// Committed, or refused for good (the executor does not retry a
		// 4xx): either way this result will not come again. Settled before
		// the executor hears back, so ListContainers never lists it after.
		a.settle(s, req.ExecutionId)
	}
	if err == nil {
		a.log.Debug("executor report relayed", "session", s.id, "execution", req.ExecutionId, "kind", req.Kind.String())
		writeJSON(w, http.StatusOK, struct{}{})
		return
	}
	a.log.Warn("relay executor report", "session", s.id, "execution", req.ExecutionId, "kind", req.Kind.String(), "status", status, "err", err)
	writeError(w, status, fmt.Sprintf("relay to the servers failed: %v", err))
}

// reportExecution calls ReportExecution with retries and backoff.
func (a *Agent) reportExecution(ctx context.Context, req *agentv1.ReportExecutionRequest, attempts int) error {
	return a.retry(ctx, attempts, func(ctx context.Context) error {
		_, err := a.cp.ReportExecution(ctx, connect.NewRequest(req))
		return err
	})
}

// reportSessionExit tells the servers a session's container ended by itself.
func (a *Agent) reportSessionExit(ctx context.Context, sessionID, reason string) error {
	return a.retry(ctx, 5, func(ctx context.Context) error {
		_, err := a.cp.ReportSessionExit(ctx, connect.NewRequest(&agentv1.ReportSessionExitRequest{
			AgentId: a.cfg.ID, SessionId: sessionID, Reason: reason,
		}))
		return err
	})
}

// retry runs call until it succeeds, fails permanently, attempts are used up
// or ctx ends, doubling the pause between attempts.
func (a *Agent) retry(ctx context.Context, attempts int, call func(context.Context) error) error {
	backoff := a.relayBackoff
	for i := 1; ; i++ {
		actx, cancel := context.WithTimeout(ctx, reportTimeout)
		err := call(actx)
		cancel()
		if err == nil || !retryable(err) || i >= attempts || ctx.Err() != nil {
			return err
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
		backoff *= 2
	}
}

func retryable(err error) bool {
	switch connect.CodeOf(err) {
	case connect.CodeUnavailable, connect.CodeDeadlineExceeded, connect.CodeUnknown,
		connect.CodeAborted, connect.CodeResourceExhausted, connect.CodeInternal:
		return true
	}
	return false
}

// relayStatus is the HTTP status the executor gets for a failed relay.
func relayStatus(err error) int {
	switch connect.CodeOf(err) {
	case connect.CodeInvalidArgument, connect.CodeOutOfRange:
		return http.StatusBadRequest
	case connect.CodeNotFound:
		return http.StatusNotFound
	case connect.CodeFailedPrecondition, connect.CodeAlreadyExists:
		return http.StatusConflict
	case connect.CodeUnavailable, connect.CodeDeadlineExceeded, connect.CodeAborted,
		connect.CodeResourceExhausted, connect.CodeCanceled:
		return http.StatusServiceUnavailable
	default:
		return http.StatusBadGateway
	}
}

// decodeBody reads a JSON body of at most limit bytes; an empty body is
// accepted when emptyOK.
func decodeBody(w http.ResponseWriter, r *http.Request, limit int64, v any, emptyOK bool) error {
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return &httpError{status: http.StatusRequestEntityTooLarge, msg: fmt.Sprintf("body exceeds %d bytes", limit)}
		}
		return &httpError{status: http.StatusBadRequest, msg: fmt.Sprintf("read body: %v", err)}
	}
	if len(b) == 0 && emptyOK {
		return nil
	}
	if err := json.Unmarshal(b, v); err != nil {
		return &httpError{status: http.StatusBadRequest, msg: fmt.Sprintf("decode JSON body: %v", err)}
	}
	return nil
}

type httpError struct {
	status int
	msg    string
}

func (e *httpError) Error() string { return e.msg }

func statusOf(err error) int {
	var he *httpError
	if errors.As(err, &he) {
		return he.status
	}
	return http.StatusInternalServerError
}

func joinMsg(a, b string) string {
	if a == "" {
		return b
	}
	return a + "; " + b
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, executorapi.Error{Error: msg})
}

// statusRecorder remembers the status a handler wrote.
type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (r *statusRecorder) WriteHeader(code int) {
	r.status = code
	r.ResponseWriter.WriteHeader(code)
}

func (r *statusRecorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

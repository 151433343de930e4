package executor

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"regexp"
	"strings"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/executor/executorapi"
)

// Request body limits. Code is at most sandbox.MaxCodeBytes and an env at
// most sandbox.MaxEnvBytes; the room above that is for JSON escaping (Go's
// encoder turns each '<', '>' and '&' into six bytes).
const (
	maxExecuteBody = 4 << 20
	maxInitBody    = 256 << 10
	maxSessionID   = 256
)

// executionIDPattern keeps ids safe in callback paths and logs.
var executionIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// Handler is the executor's HTTP API.
func (e *Executor) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", e.handleHealth)
	mux.Handle("POST /init", e.authenticated(http.HandlerFunc(e.handleInit)))
	mux.Handle("POST /execute", e.authenticated(http.HandlerFunc(e.handleExecute)))
	mux.Handle("POST /executions/{id}/cancel", e.authenticated(http.HandlerFunc(e.handleCancel)))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, fmt.Sprintf("no such endpoint: %s %s", r.Method, r.URL.Path))
	})
	return mux
}

// authenticated requires the bearer token once the executor holds one. It
// compares digests in constant time, so neither the token's bytes nor its
// length leak through timing.
func (e *Executor) authenticated(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if want := e.currentToken(); want != "" && !tokenMatches(r.Header.Get("Authorization"), want) {
			w.Header().Set("WWW-Authenticate", `Bearer realm="sandbox-executor"`)
			writeError(w, http.StatusUnauthorized, "missing or invalid bearer token")
			return
		}
		next.ServeHTTP(w, r)
	})
}

// tokenMatches checks an Authorization header against the token.
func tokenMatches(header, want string) bool {
	got, ok := strings.CutPrefix(header, "Bearer ")
	if !ok {
		return false
	}
	g, w := sha256.Sum256([]byte(got)), sha256.Sum256([]byte(want))
	return subtle.ConstantTimeCompare(g[:], w[:]) == 1
}

func (e *Executor) handleHealth(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, e.health())
}

func (e *Executor) handleInit(w http.ResponseWriter, r *http.Request) {
	var req executorapi.InitRequest
	if !decode(w, r, maxInitBody, &req) {
		return
	}
	if err := validateInit(req); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	e.mu.Lock()
	switch {
	case e.initialized:
		sid := e.sessionID
		e.mu.Unlock()
		writeError(w, http.StatusConflict, fmt.Sprintf("executor is already initialized for session %q", sid))
		return
	case req.Token == "" && e.token == "":
		e.mu.Unlock()
		writeError(w, http.StatusBadRequest, "token is required: the executor has no INTERNAL_API_TOKEN")
		return
	}
	e.initialized = true
	e.sessionID = req.SessionID
	e.sessionEnv = req.Env
	if req.Token != "" {
		e.token = req.Token
	}
	e.mu.Unlock()
	e.log.Debug("executor initialized", "session_id", req.SessionID, "env_entries", len(req.Env))
	writeJSON(w, http.StatusOK, e.health())
}

// validateInit checks an init request's fields.
func validateInit(req executorapi.InitRequest) error {
	switch {
	case req.SessionID == "":
		return errors.New("session_id is required")
	case len(req.SessionID) > maxSessionID:
		return fmt.Errorf("session_id is longer than %d bytes", maxSessionID)
	case strings.ContainsAny(req.Token, " \t\r\n"):
		return errors.New("token must not contain whitespace")
	}
	return validateEnv("env", req.Env)
}

// validateEnv applies the domain's env rules and what bwrap's argv needs.
func validateEnv(field string, env map[string]string) error {
	if err := sandbox.ValidateEnv(field, env); err != nil {
		return err
	}
	for k, v := range env {
		if strings.IndexByte(v, 0) >= 0 {
			return fmt.Errorf("%w: %s value of %q contains a NUL byte", sandbox.ErrInvalidArgument, field, k)
		}
	}
	return nil
}

func (e *Executor) handleExecute(w http.ResponseWriter, r *http.Request) {
	e.mu.Lock()
	initialized := e.initialized
	e.mu.Unlock()
	if !initialized {
		writeError(w, http.StatusConflict, "executor is not initialized: POST /init with the session first")
		return
	}
	var req executorapi.ExecuteRequest
	if !decode(w, r, maxExecuteBody, &req) {
		return
	}
	x, err := e.newExecution(req)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	e.mu.Lock()
	switch _, dup := e.seen[x.id]; {
	case e.closing:
		e.mu.Unlock()
		writeError(w, http.StatusServiceUnavailable, "executor is shutting down")
		return
	case dup:
		// A hand-over retried because its answer was lost: the execution
		// runs (or ran) once, and its callbacks carry the outcome.
		e.mu.Unlock()
		e.log.Info("execution handed over again; already taken", "execution_id", x.id)
		writeJSON(w, http.StatusAccepted, executorapi.ExecuteAccepted{ExecutionID: x.id, Duplicate: true})
		return
	}
	e.seen[x.id] = struct{}{}
	e.running[x.id] = x
	e.executions.Add(1)
	e.mu.Unlock()
	e.log.Debug("execution accepted", "execution_id", x.id, "language", x.language, "timeout", x.timeout.String(), "code_bytes", len(x.code))
	go e.run(x)
	writeJSON(w, http.StatusAccepted, executorapi.ExecuteAccepted{ExecutionID: x.id})
}

// newExecution validates req and resolves its timeout and env.
func (e *Executor) newExecution(req executorapi.ExecuteRequest) (*execution, error) {
	if req.ExecutionID == "" {
		return nil, errors.New("execution_id is required")
	}
	if !executionIDPattern.MatchString(req.ExecutionID) {
		return nil, fmt.Errorf("execution_id %q must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit", req.ExecutionID)
	}
	if err := sandbox.ValidateLanguage(req.Language, nil); err != nil {
		return nil, err
	}
	if len(req.Code) > sandbox.MaxCodeBytes {
		return nil, fmt.Errorf("%w: code is %d bytes, at most %d are allowed", sandbox.ErrInvalidArgument, len(req.Code), sandbox.MaxCodeBytes)
	}
	if req.TimeoutSeconds > math.MaxInt32 {
		return nil, fmt.Errorf("%w: timeout_seconds %d is too large", sandbox.ErrInvalidArgument, req.TimeoutSeconds)
	}
	timeout, err := sandbox.ResolveExecutionTimeout(int32(req.TimeoutSeconds), sandbox.MaxLimits)
	if err != nil {
		return nil, err
	}
	if err := validateEnv("env", req.Env); err != nil {
		return nil, err
	}
	return &execution{
		id:       req.ExecutionID,
		language: req.Language,
		code:     req.Code,
		timeout:  timeout,
		env:      mergeEnv(baseEnv(), e.sessionEnvCopy(), req.Env),
		canceled: make(chan struct{}),
	}, nil
}

func (e *Executor) handleCancel(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	e.mu.Lock()
	x := e.running[id]
	e.mu.Unlock()
	if x == nil || !x.cancel() {
		writeError(w, http.StatusNotFound, fmt.Sprintf("execution %q is unknown or already finished", id))
		return
	}
	e.log.Info("execution cancel requested", "execution_id", id)
	writeJSON(w, http.StatusAccepted, executorapi.ExecuteAccepted{ExecutionID: id})
}

// decode reads a JSON body of at most limit bytes into v, answering the
// client itself when it cannot.
func decode(w http.ResponseWriter, r *http.Request, limit int64, v any) bool {
	r.Body = http.MaxBytesReader(w, r.Body, limit)
	if err := json.NewDecoder(r.Body).Decode(v); err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body is larger than %d bytes", limit))
			return false
		}
		writeError(w, http.StatusBadRequest, fmt.Sprintf("request body is not valid JSON: %v", err))
		return false
	}
	return true
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, executorapi.Error{Error: msg})
}

// Package executorapi is the HTTP contract between an agent and the executor
// that runs as PID 1 in each sandbox container, in both directions:
//
// Agent -> executor, on the executor's socket (unix socket in the container's
// socket directory, or TCP when EXECUTOR_PORT is set):
//
//	GET  /health                      -> 200 Health
//	POST /init         InitRequest    -> 200 Health; 409 if already initialized
//	POST /execute      ExecuteRequest -> 202 ExecuteAccepted (result comes by callback);
//	                                     an id already taken answers 202 again, duplicate set, and runs nothing
//	POST /executions/{id}/cancel      -> 202; 404 if unknown or finished
//
// Every call but /health carries "Authorization: Bearer <token>" once the
// executor holds a token (from INTERNAL_API_TOKEN or /init).
//
// Executor -> agent, on CONTROL_PLANE_URL (unix:///run/sandbox/agent.sock in a
// containerd sandbox), always with the session's bearer token:
//
//	POST /internal/executions/{id}/status     StatusReport, once the execution has run StatusDelay
//	                                          (one that ends sooner goes straight to its result)
//	POST /internal/executions/{id}/heartbeat  (empty body), every HeartbeatInterval while running
//	PUT  /internal/executions/{id}/artifacts?path=REL  raw bytes, header X-Content-Sha256;
//	     sent for every artifact before the result
//	POST /internal/executions/{id}/result     Result
//
// Errors are JSON Error bodies with a 4xx or 5xx status.
package executorapi

import "time"

// Paths and limits shared by both sides.
const (
	// SocketDir is where the per-container socket directory is bound inside the container.
	SocketDir = "/run/sandbox"
	// ExecutorSocket is the executor's socket name inside SocketDir.
	ExecutorSocket = "executor.sock"
	// AgentSocket is the agent's callback socket name inside SocketDir.
	AgentSocket = "agent.sock"

	HeartbeatInterval = 5 * time.Second
	// StatusDelay is how long an execution runs before its RUNNING status
	// is reported. Most executions end sooner: their result says all, and
	// skipping the status spares three hops and a commit per execution
	// on the way (and the CPU they would take from the user's code).
	StatusDelay = 100 * time.Millisecond

	// MaxOutputBytes caps stdout and stderr each; the rest is dropped and flagged.
	MaxOutputBytes = 1 << 20
	// Artifact caps: files beyond them are not collected (and Result.Error says so).
	MaxArtifacts          = 100
	MaxArtifactBytes      = 64 << 20
	MaxTotalArtifactBytes = 256 << 20
)

// Execution states as reported by the executor (names of sandbox.v1.ExecutionState without prefix).
const (
	StateRunning   = "RUNNING"
	StateCompleted = "COMPLETED"
	StateFailed    = "FAILED"
	StateTimedOut  = "TIMED_OUT"
	StateCanceled  = "CANCELED"
)

// Health is the executor's answer to /health and /init.
type Health struct {
	Status      string `json:"status"` // "ok"
	SessionID   string `json:"session_id,omitempty"`
	Initialized bool   `json:"initialized"`
	Running     int    `json:"running"` // executions in flight
}

// InitRequest hands a (possibly pre-started) executor its session.
type InitRequest struct {
	SessionID string            `json:"session_id"`
	Token     string            `json:"token"`
	Env       map[string]string `json:"env,omitempty"`
}

// ExecuteRequest asks for one execution.
type ExecuteRequest struct {
	ExecutionID    string            `json:"execution_id"`
	Language       string            `json:"language"` // python | node | bash
	Code           string            `json:"code"`
	TimeoutSeconds int               `json:"timeout_seconds"`
	Env            map[string]string `json:"env,omitempty"` // merged over the session env
}

// ExecuteAccepted answers /execute.
type ExecuteAccepted struct {
	ExecutionID string `json:"execution_id"`
	// Duplicate says the executor had already taken this execution id:
	// nothing new runs, and the first hand-over's run reports the result.
	// Handing over is thereby safe to retry.
	Duplicate bool `json:"duplicate,omitempty"`
}

// StatusReport is sent when an execution starts running.
type StatusReport struct {
	State string `json:"state"`
}

// Artifact describes one collected file.
type Artifact struct {
	Path      string `json:"path"` // relative to the workspace
	SizeBytes int64  `json:"size_bytes"`
	SHA256    string `json:"sha256"`
}

// Result is an execution's terminal report.
type Result struct {
	State           string     `json:"state"`
	ExitCode        int        `json:"exit_code"`
	Stdout          string     `json:"stdout"`
	Stderr          string     `json:"stderr"`
	StdoutTruncated bool       `json:"stdout_truncated"`
	StderrTruncated bool       `json:"stderr_truncated"`
	DurationMS      int64      `json:"duration_ms"`
	Artifacts       []Artifact `json:"artifacts"`
	Error           string     `json:"error,omitempty"`
}

// Error is the body of every non-2xx answer.
type Error struct {
	Error string `json:"error"`
}

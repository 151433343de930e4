package sandbox

// SessionState is a session's lifecycle state; values match sandbox.v1.SessionState.
type SessionState int32

// Session states.
const (
	SessionUnspecified SessionState = iota
	SessionPending
	SessionStarting
	SessionRunning
	SessionTerminating
	SessionTerminated
	SessionFailed
	SessionLost
)

var sessionStateNames = [...]string{"UNSPECIFIED", "PENDING", "STARTING", "RUNNING", "TERMINATING", "TERMINATED", "FAILED", "LOST"}

func (s SessionState) String() string {
	if s < 0 || int(s) >= len(sessionStateNames) {
		return "UNKNOWN"
	}
	return sessionStateNames[s]
}

// Terminal reports whether no transition leaves s.
func (s SessionState) Terminal() bool {
	return s == SessionTerminated || s == SessionFailed || s == SessionLost
}

// Live reports whether the session holds (or is about to hold) a container.
func (s SessionState) Live() bool {
	return s == SessionPending || s == SessionStarting || s == SessionRunning || s == SessionTerminating
}

var sessionTransitions = map[SessionState][]SessionState{
	SessionPending:     {SessionStarting, SessionRunning, SessionTerminating, SessionFailed, SessionLost},
	SessionStarting:    {SessionRunning, SessionTerminating, SessionFailed, SessionLost},
	SessionRunning:     {SessionTerminating, SessionFailed, SessionLost},
	SessionTerminating: {SessionTerminated, SessionFailed, SessionLost},
}

// CanTransition reports whether a session may move from s to next.
func (s SessionState) CanTransition(next SessionState) bool {
	for _, n := range sessionTransitions[s] {
		if n == next {
			return true
		}
	}
	return false
}

// ExecutionState is an execution's lifecycle state; values match sandbox.v1.ExecutionState.
type ExecutionState int32

// Execution states.
const (
	ExecutionUnspecified ExecutionState = iota
	ExecutionQueued
	ExecutionRunning
	ExecutionCompleted
	ExecutionFailed
	ExecutionTimedOut
	ExecutionCanceled
	ExecutionLost
)

var executionStateNames = [...]string{"UNSPECIFIED", "QUEUED", "RUNNING", "COMPLETED", "FAILED", "TIMED_OUT", "CANCELED", "LOST"}

func (s ExecutionState) String() string {
	if s < 0 || int(s) >= len(executionStateNames) {
		return "UNKNOWN"
	}
	return executionStateNames[s]
}

// Terminal reports whether no transition leaves s.
func (s ExecutionState) Terminal() bool {
	return s >= ExecutionCompleted && s <= ExecutionLost
}

// CanTransition reports whether an execution may move from s to next. Terminal
// states are final, which is what makes duplicate or late reports harmless.
func (s ExecutionState) CanTransition(next ExecutionState) bool {
	switch s {
	case ExecutionQueued:
		return next == ExecutionRunning || next.Terminal()
	case ExecutionRunning:
		return next.Terminal()
	}
	return false
}

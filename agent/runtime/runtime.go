// Package runtime is the agent's port to a container runtime. Adapters sit
// beside it (runtime/containerd now; docker and kubernetes later) and all
// pass the same conformance suite. The shape follows Nomad's driver plugin:
// start, wait on a channel, stop with a timeout, destroy, inspect, list (for
// recovery after an agent restart).
package runtime

import (
	"context"
	"errors"
	"time"

	"github.com/sandboxhq/sandbox"
)

// ErrNotFound is returned for a container the runtime does not know.
var ErrNotFound = errors.New("container not found")

// Labels every adapter puts on its containers, so an agent finds its own.
const (
	LabelAgent    = "sandbox.agent"
	LabelSession  = "sandbox.session"
	LabelTemplate = "sandbox.template"
	// LabelWarm marks a container started for a warm pool, before any
	// session claimed it (a claim adds LabelSession).
	LabelWarm = "sandbox.warm"
)

// Spec is everything a runtime needs to start one sandbox container.
type Spec struct {
	// ID names the container; unique on the host.
	ID string
	// Image is the image reference as the runtime knows it.
	Image  string
	Limits sandbox.Limits
	// SocketDir is a host directory, owned by the sandbox user, bound read-write
	// at executorapi.SocketDir inside the container. Nothing else from the host is.
	SocketDir string
	// Env is the executor's environment (KEY=VALUE).
	Env    []string
	Labels map[string]string
	// Args, when set, replaces the image's entrypoint and command (tests run
	// probes this way). Optional: empty runs the image's executor.
	Args []string
	// LogPath, when set, is a host file (absolute path) that receives the
	// container's stdout and stderr. Optional: empty discards them.
	LogPath string
	// Group, when set, lets the runtime supervise this container with the
	// other running containers of the same group in one process (on
	// containerd, one runc shim), which saves that process's memory per
	// container. The price is a shared fate: if that process dies, every
	// container of the group exits. Group names are per host and runtime
	// namespace, so a name should carry its agent's id. Optional: empty
	// gives the container a supervisor of its own.
	Group string
}

// Status is what Inspect and List report.
type Status struct {
	ID       string
	Labels   map[string]string
	Running  bool
	Pid      uint32
	ExitCode int
	// CreatedAt is when the container was created.
	CreatedAt time.Time
	// Endpoint is host:port of the executor over TCP; empty: the unix
	// socket in SocketDir.
	Endpoint string
}

// ExitResult is delivered once on the channel Wait returns.
type ExitResult struct {
	ExitCode int
	Err      error
}

// Update changes a running container: what is nil or empty stays.
type Update struct {
	// Limits, when set, replaces the container's cpu, memory and pids
	// limits. The disk limit (the size of its workspace) is fixed at
	// creation and must equal the one it was created with.
	Limits *sandbox.Limits
	// Labels are added to the container's labels, replacing equal keys.
	Labels map[string]string
}

// Runtime starts and stops sandbox containers.
type Runtime interface {
	// Start creates and starts a container; on error nothing is left behind.
	Start(ctx context.Context, spec Spec) (Status, error)
	// Wait returns a channel that receives the container's exit once.
	Wait(ctx context.Context, id string) (<-chan ExitResult, error)
	// Stop signals the container to end and kills it after timeout.
	Stop(ctx context.Context, id string, timeout time.Duration) error
	// Destroy removes the container and everything the runtime kept for it.
	// Destroying an unknown container is not an error.
	Destroy(ctx context.Context, id string) error
	Inspect(ctx context.Context, id string) (Status, error)
	// Update applies new limits and labels to a running container (a warm
	// container claimed by a session gets the session's limits this way).
	Update(ctx context.Context, id string, u Update) error
	// List returns the containers carrying every label in match.
	List(ctx context.Context, match map[string]string) ([]Status, error)
}

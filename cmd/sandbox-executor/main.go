// Command sandbox-executor is the PID 1 of a sandbox container: it serves the
// agent's execute calls and runs user code under bubblewrap. See package
// executor for what it does and ConfigFromEnv for its environment.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"syscall"

	"github.com/sandboxhq/sandbox/executor"
)

func main() {
	tuneRuntime(os.Getenv)
	cfg, err := executor.ConfigFromEnv(os.Getenv)
	if err != nil {
		fmt.Fprintln(os.Stderr, "sandbox-executor:", err)
		os.Exit(2)
	}
	e, err := executor.New(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "sandbox-executor:", err)
		os.Exit(1)
	}
	// As PID 1 the kernel drops signals that have no handler; these have one.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := e.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "sandbox-executor:", err)
		os.Exit(1)
	}
}

// tuneRuntime sizes the Go runtime for a process that spends most of its
// life idle in a warm pool, one per container and hundreds per host; the
// executor's idle memory is nearly all the runtime's own.
//
// One P is enough: the executor's own work is I/O (HTTP on a unix socket,
// relaying the output of user code, which runs in child processes that
// GOMAXPROCS does not limit). One P saves OS threads and per-P caches,
// about 0.2 MiB of an idle executor's 1.6 MiB of anonymous memory, but only
// when the runtime starts that way: runtime.GOMAXPROCS(1) called from main
// leaves the heap spans the second P already used, and saves nothing. So the
// executor re-executes itself once with GOMAXPROCS=1 (about a millisecond).
// An explicit GOMAXPROCS in the environment is kept. (The container has no
// /sys/fs/cgroup, so the runtime cannot size GOMAXPROCS from the cpu limit.)
//
// The memory profiler is off: nothing reads it, and its first samples touch
// a 1.4 MiB hash table. The GC keeps its defaults: a lower GOGC or a memory
// limit made the idle executor larger (more GC metadata), not smaller.
func tuneRuntime(getenv func(string) string) {
	if getenv("GOMAXPROCS") == "" {
		if exe, err := os.Executable(); err == nil {
			err = syscall.Exec(exe, os.Args, append(os.Environ(), "GOMAXPROCS=1"))
			// Exec returns only on failure; the executor then runs as it is.
			fmt.Fprintln(os.Stderr, "sandbox-executor: re-executing with GOMAXPROCS=1:", err)
		}
	}
	runtime.MemProfileRate = 0
}

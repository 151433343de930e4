// Command sandbox-executor is the PID 1 of a sandbox container: it serves the
// agent's execute calls and runs user code under bubblewrap. See package
// executor for what it does and ConfigFromEnv for its environment.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/sandboxhq/sandbox/executor"
)

func main() {
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

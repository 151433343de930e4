// Command sandboxctl is the command-line client of the sandbox platform's
// public Connect API: it runs code (sandboxctl exec), and manages sessions,
// executions, templates and artifacts.
//
// Configuration comes from flags, then the environment (SANDBOX_ADDR,
// SANDBOX_API_KEY), then defaults; see docs/cli.md.
package main

import (
	"context"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	// The first SIGINT or SIGTERM cancels ctx, so that commands can clean up
	// (exec cancels its execution and removes its session); stopping the
	// notification right then lets a second Ctrl-C kill the process at once.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	context.AfterFunc(ctx, stop)

	a := &app{
		stdin:           os.Stdin,
		stdinIsTerminal: func() bool { return isTerminal(os.Stdin) },
		stdout:          os.Stdout,
		stderr:          os.Stderr,
		getenv:          os.Getenv,
		getwd:           os.Getwd,
		now:             time.Now,
	}
	code := a.run(ctx, os.Args[1:])
	stop()
	os.Exit(code)
}

// app is one invocation of sandboxctl: its standard streams, its environment
// and its resolved configuration. Tests build one with fakes for all of them.
type app struct {
	stdin           io.Reader
	stdinIsTerminal func() bool
	stdout          io.Writer
	stderr          io.Writer
	getenv          func(string) string
	getwd           func() (string, error)
	now             func() time.Time

	// global holds what the global flags said; config resolves it.
	global globalFlags
	// retry bounds the retries of idempotent writes; zero: defaultRetry.
	retry retryPolicy
	// pollInitial is the first wait between polls of an unfinished
	// execution; zero: the package's pollInitial.
	pollInitial time.Duration
}

// isTerminal reports whether f is a character device (a terminal), as
// opposed to a pipe or a file that code can be read from.
func isTerminal(f *os.File) bool {
	fi, err := f.Stat()
	if err != nil {
		return false
	}
	return fi.Mode()&os.ModeCharDevice != 0
}

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
)

// Exit codes shared by every command; exec has its own (see exec.go).
const (
	exitOK    = 0
	exitError = 1
	exitUsage = 2
)

// command is one node of the command tree: a group (with subcommands) or a
// leaf (with run).
type command struct {
	name    string
	summary string
	// sub lists a group's subcommands; nil for a leaf.
	sub []*command
	// run executes a leaf with the arguments after its name.
	run func(a *app, ctx context.Context, args []string) error
	// failCode is the exit code for errors; 0 means exitError.
	failCode int
}

// commands returns the command tree.
func commands() []*command {
	return []*command{
		{name: "exec", summary: "run code in a new or existing session", run: (*app).cmdExec, failCode: exitPlatform},
		{name: "sessions", summary: "create, inspect, list and remove sessions", sub: []*command{
			{name: "create", summary: "create a session from a template", run: (*app).cmdSessionsCreate},
			{name: "get", summary: "show one session", run: (*app).cmdSessionsGet},
			{name: "list", summary: "list sessions", run: (*app).cmdSessionsList},
			{name: "rm", summary: "terminate sessions", run: (*app).cmdSessionsRm},
		}},
		{name: "executions", summary: "inspect, list and cancel executions", sub: []*command{
			{name: "get", summary: "show one execution", run: (*app).cmdExecutionsGet},
			{name: "list", summary: "list a session's executions", run: (*app).cmdExecutionsList},
			{name: "cancel", summary: "cancel a running execution", run: (*app).cmdExecutionsCancel},
		}},
		{name: "templates", summary: "list, inspect, create and delete templates", sub: []*command{
			{name: "list", summary: "list templates", run: (*app).cmdTemplatesList},
			{name: "get", summary: "show one template", run: (*app).cmdTemplatesGet},
			{name: "create", summary: "create a template", run: (*app).cmdTemplatesCreate},
			{name: "update", summary: "change a template's warm pool size", run: (*app).cmdTemplatesUpdate},
			{name: "rm", summary: "delete templates", run: (*app).cmdTemplatesRm},
		}},
		{name: "artifacts", summary: "list and download an execution's files", sub: []*command{
			{name: "list", summary: "list an execution's artifacts", run: (*app).cmdArtifactsList},
			{name: "get", summary: "download one artifact", run: (*app).cmdArtifactsGet},
		}},
		{name: "cluster", summary: "servers, nodes and snapshots of the cluster", sub: []*command{
			{name: "status", summary: "show the servers, the leader and the Raft indexes", run: (*app).cmdClusterStatus},
			{name: "nodes", summary: "list the nodes (agents) with their capacity and warm pools", run: (*app).cmdClusterNodes},
			{name: "drain", summary: "stop placing new sessions on a node", run: (*app).cmdClusterDrain},
			{name: "join", summary: "add a server to the Raft cluster", run: (*app).cmdClusterJoin},
			{name: "remove", summary: "remove a server from the Raft cluster", run: (*app).cmdClusterRemove},
			{name: "snapshot", summary: "save or restore the replicated state", sub: []*command{
				{name: "save", summary: "save a snapshot of the replicated state to a file", run: (*app).cmdSnapshotSave},
				{name: "restore", summary: "replace the replicated state with a saved snapshot", run: (*app).cmdSnapshotRestore},
			}},
		}},
		{name: "version", summary: "print the client's version", run: (*app).cmdVersion},
	}
}

// errHelp reports that usage was asked for and printed: exit 0.
var errHelp = errors.New("help requested")

// usageError is a mistake in the command line.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

// usagef returns a usageError.
func usagef(format string, args ...any) error {
	return &usageError{msg: fmt.Sprintf(format, args...)}
}

// exitCodeError ends the program with code after its message, if any, was
// already printed.
type exitCodeError struct{ code int }

func (e *exitCodeError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

// run parses the global flags, dispatches to a command and returns the
// process's exit code.
func (a *app) run(ctx context.Context, args []string) int {
	fs := flag.NewFlagSet("sandboxctl", flag.ContinueOnError)
	a.global.register(fs)
	tree := commands()
	usage := func(w io.Writer) {
		fmt.Fprintf(w, "Usage: sandboxctl [global flags] COMMAND [flags] [args]\n\n")
		fmt.Fprintf(w, "sandboxctl talks to the sandbox platform's API.\n\nCommands:\n")
		printCommands(w, tree)
		fmt.Fprintf(w, "\nGlobal flags (also accepted after any command):\n")
		printFlags(w, fs)
		fmt.Fprintf(w, "\nEnvironment: SANDBOX_ADDR, SANDBOX_API_KEY.\nRun 'sandboxctl COMMAND -h' for a command's flags.\n")
	}
	if err := a.parse(fs, args, usage, false); err != nil {
		return a.exitCode(err, exitError)
	}
	rest := fs.Args()
	if len(rest) == 0 {
		usage(a.stderr)
		return exitUsage
	}
	if rest[0] == "help" {
		usage(a.stdout)
		return exitOK
	}
	return a.dispatch(ctx, tree, []string{"sandboxctl"}, rest)
}

// dispatch finds the command named by args[0] among tree and runs it.
func (a *app) dispatch(ctx context.Context, tree []*command, path []string, args []string) int {
	name := args[0]
	prefix := strings.Join(path, " ")
	if isHelpArg(name) && len(path) > 1 {
		a.groupUsage(a.stdout, path, tree)
		return exitOK
	}
	var cmd *command
	for _, c := range tree {
		if c.name == name {
			cmd = c
			break
		}
	}
	if cmd == nil {
		fmt.Fprintf(a.stderr, "sandboxctl: unknown command %q\nRun '%s -h' for usage.\n", name, prefix)
		return exitUsage
	}
	path = append(path, name)
	if cmd.sub != nil {
		if len(args) < 2 {
			a.groupUsage(a.stderr, path, cmd.sub)
			return exitUsage
		}
		return a.dispatch(ctx, cmd.sub, path, args[1:])
	}
	failCode := cmd.failCode
	if failCode == 0 {
		failCode = exitError
	}
	return a.exitCode(cmd.run(a, ctx, args[1:]), failCode)
}

// exitCode prints err, if it has a message to print, and maps it to the
// process's exit code.
func (a *app) exitCode(err error, failCode int) int {
	var usage *usageError
	var exit *exitCodeError
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, errHelp):
		return exitOK
	case errors.As(err, &exit):
		return exit.code
	case errors.As(err, &usage):
		fmt.Fprintf(a.stderr, "sandboxctl: %s\n", usage.msg)
		if failCode == exitError {
			return exitUsage
		}
		return failCode
	default:
		a.printError(err)
		return failCode
	}
}

// isHelpArg reports whether s asks for help.
func isHelpArg(s string) bool {
	switch s {
	case "-h", "-help", "--help", "help":
		return true
	}
	return false
}

// groupUsage prints the subcommands of a group.
func (a *app) groupUsage(w io.Writer, path []string, sub []*command) {
	fmt.Fprintf(w, "Usage: %s COMMAND [flags] [args]\n\nCommands:\n", strings.Join(path, " "))
	printCommands(w, sub)
	fmt.Fprintf(w, "\nRun '%s COMMAND -h' for a command's flags.\n", strings.Join(path, " "))
}

func printCommands(w io.Writer, tree []*command) {
	for _, c := range tree {
		fmt.Fprintf(w, "  %-12s %s\n", c.name, c.summary)
	}
}

// printFlags prints fs's flags the way flag.PrintDefaults does, to w.
func printFlags(w io.Writer, fs *flag.FlagSet) {
	out := fs.Output()
	fs.SetOutput(w)
	fs.PrintDefaults()
	fs.SetOutput(out)
}

// newFlagSet returns a leaf command's flag set with the global flags
// registered on it, so that they may follow the command name.
func (a *app) newFlagSet(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	a.global.register(fs)
	return fs
}

// parseLeaf parses a leaf command's arguments, flags and positional
// arguments in any order (a "--" ends the flags), and checks the number of
// positional arguments is within [minArgs, maxArgs] (maxArgs < 0: no limit).
// synopsis is the usage line after "sandboxctl"; help is printed under it.
func (a *app) parseLeaf(fs *flag.FlagSet, args []string, synopsis, help string, minArgs, maxArgs int) ([]string, error) {
	usage := func(w io.Writer) {
		fmt.Fprintf(w, "Usage: sandboxctl %s\n\n%s\n", synopsis, strings.TrimSpace(help))
		fmt.Fprintf(w, "\nFlags:\n")
		printFlags(w, fs)
	}
	if err := a.parse(fs, args, usage, true); err != nil {
		return nil, err
	}
	pos := fs.Args()
	switch {
	case len(pos) < minArgs:
		return nil, usagef("%s: missing arguments\nUsage: sandboxctl %s", fs.Name(), synopsis)
	case maxArgs >= 0 && len(pos) > maxArgs:
		return nil, usagef("%s: too many arguments %q\nUsage: sandboxctl %s", fs.Name(), pos[maxArgs:], synopsis)
	}
	return pos, nil
}

// parse parses args into fs. With interspersed, flags may follow
// positional arguments, which are left in fs.Args(). -h prints usage to
// stdout and returns errHelp; a bad flag returns a usageError.
func (a *app) parse(fs *flag.FlagSet, args []string, usage func(io.Writer), interspersed bool) error {
	// Errors are reported once, by the caller, with a pointer to -h rather
	// than the whole usage.
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	var pos []string
	for {
		err := fs.Parse(args)
		if errors.Is(err, flag.ErrHelp) {
			usage(a.stdout)
			return errHelp
		}
		if err != nil {
			if fs.Name() == "sandboxctl" {
				return usagef("%v (run with -h for usage)", err)
			}
			return usagef("%s: %v (run with -h for usage)", fs.Name(), err)
		}
		rest := fs.Args()
		if !interspersed || len(rest) == 0 {
			break
		}
		if consumed := len(args) - len(rest); consumed > 0 && args[consumed-1] == "--" {
			pos = append(pos, rest...)
			break
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
	if interspersed {
		// Leave the positional arguments where callers look for them.
		_ = fs.Parse(append([]string{"--"}, pos...))
	}
	return nil
}

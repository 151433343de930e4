package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/sandboxhq/sandbox"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
)

// Exit codes of exec besides the code's own, following timeout(1) and the
// shells: 124 timed out, 125 the platform (or sandboxctl) failed, 130 canceled.
const (
	exitTimedOut = 124
	exitPlatform = 125
	exitCanceled = 130
)

// execLabel marks the sessions exec creates with a per-run token, so that a
// session whose creation was interrupted can still be found and removed.
const execLabel = "sandboxctl-exec"

// cleanupTimeout bounds the calls that undo an interrupted or finished exec.
const cleanupTimeout = 30 * time.Second

const execHelp = `
Runs code and prints its stdout and stderr, exactly, to sandboxctl's own; the
exit code is the code's. With --template (or neither --template nor --session),
a session is created for the run and removed afterwards, also when
interrupted; with --session, the existing session is used and left running.

The code comes from -c, from FILE, or from stdin ("-", or no argument when
stdin is not a terminal). The language defaults to FILE's extension (.py,
.js/.mjs, .sh), else python if the session's template runs it, else the
template's first language. Without --template and --session, the first
built-in template that runs the language is used (python-basic, nodejs-basic).

Exit codes: the code's exit code when it completed; 124 timed out; 130
canceled or interrupted; 125 sandboxctl or the platform failed (an API error,
a failed or lost execution, an artifact that could not be downloaded).`

func (a *app) cmdExec(ctx context.Context, args []string) error {
	err := a.exec(ctx, args)
	var exit *exitCodeError
	if err != nil && ctx.Err() != nil && !errors.As(err, &exit) {
		// Whatever call the signal cut short, the answer is "interrupted".
		return a.interrupted()
	}
	return err
}

func (a *app) exec(ctx context.Context, args []string) error {
	fs := a.newFlagSet("exec")
	template := fs.String("template", "", "create a session from template `T` for this run")
	session := fs.String("session", "", "run in the existing session `ID` and leave it running")
	language := fs.String("language", "", "python, node or bash (default: see above)")
	timeout := fs.Int("timeout", 0, "execution timeout in `SECONDS` (0: the session's maximum)")
	env := kvFlag{}
	fs.Var(env, "env", "environment variable `K=V` of the execution (repeatable)")
	var code *string
	fs.Func("c", "the `CODE` to run", func(s string) error {
		code = &s
		return nil
	})
	artifactsDir := fs.String("artifacts", "", "download the execution's artifacts into `DIR`")
	key := idempotencyKeyFlag(fs, "idempotency `KEY` of the execution (default: a fresh random one); the same key never runs the code twice")
	format := outputFlag(fs)
	pos, err := a.parseLeaf(fs, args, "exec [--template T | --session ID] [flags] [-c CODE | FILE | -]", execHelp, 0, 1)
	if err != nil {
		return err
	}
	if *template != "" && *session != "" {
		return usagef("exec: give --template or --session, not both")
	}
	if *timeout < 0 {
		return usagef("exec: --timeout must not be negative")
	}
	src, fileName, err := a.readCode(code, pos)
	if err != nil {
		return err
	}
	lang := *language
	if lang == "" {
		lang = languageFromExt(fileName)
	}
	c, err := a.clients()
	if err != nil {
		return err
	}
	if lang == "" {
		if lang, err = defaultLanguage(ctx, c, *template, *session); err != nil {
			return err
		}
	}
	if err := sandbox.ValidateLanguage(lang, nil); err != nil {
		return usagef("exec: --language %q: want python, node or bash", lang)
	}
	tmpl := *template
	if tmpl == "" && *session == "" {
		tmpl = builtinTemplateFor(lang)
	}

	execKey, sessionKey := execIdempotencyKeys(*key)
	sessionID, owned := *session, false
	if sessionID == "" {
		token := rand.Text()
		resp, err := createSession(ctx, a, c, &sandboxv1.CreateSessionRequest{
			TemplateId:     tmpl,
			Labels:         map[string]string{execLabel: token},
			IdempotencyKey: sessionKey,
		})
		if err != nil {
			if ctx.Err() != nil {
				a.removeLabeledSessions(ctx, c, token)
				return a.interrupted()
			}
			return err
		}
		sessionID, owned = resp.GetSession().GetId(), true
		defer a.removeSession(ctx, c, sessionID)
	}

	req := &sandboxv1.ExecuteRequest{
		SessionId:      sessionID,
		Language:       lang,
		Code:           src,
		TimeoutSeconds: int32(*timeout),
		Env:            env,
		IdempotencyKey: execKey,
	}
	e, err := withRetry(ctx, a, "execute", func(ctx context.Context) (*sandboxv1.Execution, error) {
		resp, err := c.executions.Execute(ctx, connect.NewRequest(req))
		if err != nil {
			return nil, err
		}
		return resp.Msg.GetExecution(), nil
	})
	if err == nil && !executionFinished(e) {
		// A retried Execute may find its first attempt's execution still
		// running and hand it back as it stands.
		e, err = a.awaitExecution(ctx, c, e)
	}
	if err != nil {
		if ctx.Err() != nil {
			a.cancelExecutions(ctx, c, sessionID, owned, lang, src)
			return a.interrupted()
		}
		return err
	}

	if *format == formatJSON {
		if err := a.printJSON(e); err != nil {
			return err
		}
	} else {
		if err := a.writeStreams(e); err != nil {
			return err
		}
	}
	exit, msg := execExitCode(e)
	if msg != "" {
		fmt.Fprintf(a.stderr, "sandboxctl: %s\n", oneLine(msg))
	}
	if *artifactsDir != "" && len(e.GetArtifacts()) > 0 {
		dir, err := a.abs(*artifactsDir)
		if err != nil {
			return err
		}
		if errs := downloadArtifacts(ctx, c, e, dir); len(errs) > 0 {
			for _, err := range errs {
				a.printError(err)
			}
			exit = exitPlatform
		}
	}
	if exit != 0 {
		return &exitCodeError{code: exit}
	}
	return nil
}

// execIdempotencyKeys returns the idempotency keys of exec's Execute and
// CreateSession calls: fresh random ones, or derived from the one given with
// --idempotency-key. The server scopes keys by kind (session, execution)
// already; distinct keys keep that true of any server, and tell the two
// calls apart in logs.
func execIdempotencyKeys(given string) (execKey, sessionKey string) {
	if given == "" {
		return newIdempotencyKey(), newIdempotencyKey()
	}
	return given, given + "-session"
}

// executionFinished reports whether e is past QUEUED and RUNNING. Anything
// else, even a state this client does not know, ends the wait: exec then
// reports it.
func executionFinished(e *sandboxv1.Execution) bool {
	switch e.GetState() {
	case sandboxv1.ExecutionState_EXECUTION_STATE_QUEUED, sandboxv1.ExecutionState_EXECUTION_STATE_RUNNING:
		return false
	}
	return true
}

// Polling of an execution that Execute returned unfinished: every
// pollInitial at first, backing off to pollMax.
const (
	pollInitial = 200 * time.Millisecond
	pollMax     = 2 * time.Second
)

// awaitExecution polls e until it is finished, which the platform
// guarantees for every execution it accepted (the execution's own timeout
// bounds the wait); ctx's cancellation (Ctrl-C) stops it sooner.
func (a *app) awaitExecution(ctx context.Context, c *clients, e *sandboxv1.Execution) (*sandboxv1.Execution, error) {
	wait := pollInitial
	if a.pollInitial > 0 {
		wait = a.pollInitial
	}
	for !executionFinished(e) {
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("execution %s: %w", e.GetId(), connect.NewError(connect.CodeCanceled, ctx.Err()))
		case <-t.C:
		}
		wait = min(2*wait, pollMax)
		id := e.GetId()
		var err error
		e, err = withRetry(ctx, a, "get execution "+id, func(ctx context.Context) (*sandboxv1.Execution, error) {
			resp, err := c.executions.GetExecution(ctx, connect.NewRequest(&sandboxv1.GetExecutionRequest{ExecutionId: id}))
			if err != nil {
				return nil, err
			}
			return resp.Msg.GetExecution(), nil
		})
		if err != nil {
			return nil, err
		}
	}
	return e, nil
}

// writeStreams copies the execution's stdout and stderr to ours, exactly,
// and notes on stderr when the platform truncated either.
func (a *app) writeStreams(e *sandboxv1.Execution) error {
	if _, err := io.WriteString(a.stdout, e.GetStdout()); err != nil {
		return fmt.Errorf("write stdout: %w", err)
	}
	if _, err := io.WriteString(a.stderr, e.GetStderr()); err != nil {
		return fmt.Errorf("write stderr: %w", err)
	}
	var truncated []string
	if e.GetStdoutTruncated() {
		truncated = append(truncated, "stdout")
	}
	if e.GetStderrTruncated() {
		truncated = append(truncated, "stderr")
	}
	if len(truncated) > 0 {
		if e.GetStderr() != "" && !strings.HasSuffix(e.GetStderr(), "\n") {
			fmt.Fprintln(a.stderr)
		}
		fmt.Fprintf(a.stderr, "sandboxctl: note: %s of execution %s truncated at the platform's output limit\n",
			strings.Join(truncated, " and "), e.GetId())
	}
	return nil
}

// execExitCode maps a finished execution to exec's exit code and, unless it
// completed, a message "<connect code>: <what happened>".
func execExitCode(e *sandboxv1.Execution) (int, string) {
	reason := ""
	if r := e.GetStateReason(); r != "" {
		reason = ": " + r
	}
	id := e.GetId()
	switch e.GetState() {
	case sandboxv1.ExecutionState_EXECUTION_STATE_COMPLETED:
		code := e.GetExitCode()
		if code < 0 || code > 255 {
			return exitPlatform, fmt.Sprintf("%s: execution %s exited with %d, which no process exit code can carry", connect.CodeUnknown, id, code)
		}
		return int(code), ""
	case sandboxv1.ExecutionState_EXECUTION_STATE_TIMED_OUT:
		return exitTimedOut, fmt.Sprintf("%s: execution %s timed out after %ds%s", connect.CodeDeadlineExceeded, id, e.GetTimeoutSeconds(), reason)
	case sandboxv1.ExecutionState_EXECUTION_STATE_CANCELED:
		return exitCanceled, fmt.Sprintf("%s: execution %s was canceled%s", connect.CodeCanceled, id, reason)
	case sandboxv1.ExecutionState_EXECUTION_STATE_FAILED:
		return exitPlatform, fmt.Sprintf("%s: execution %s failed%s", connect.CodeInternal, id, reason)
	case sandboxv1.ExecutionState_EXECUTION_STATE_LOST:
		return exitPlatform, fmt.Sprintf("%s: execution %s was lost%s", connect.CodeUnavailable, id, reason)
	default:
		return exitPlatform, fmt.Sprintf("%s: execution %s returned in state %s%s", connect.CodeUnknown, id, executionStateName(e.GetState()), reason)
	}
}

// readCode returns the code to run and the name of the file it came from.
func (a *app) readCode(code *string, pos []string) (string, string, error) {
	switch {
	case code != nil && len(pos) > 0:
		return "", "", usagef("exec: give the code with -c or as FILE, not both")
	case code != nil:
		return *code, "", nil
	case len(pos) == 1 && pos[0] != "-":
		name, err := a.abs(pos[0])
		if err != nil {
			return "", "", err
		}
		f, err := os.Open(name)
		if err != nil {
			return "", "", fmt.Errorf("read code: %w", err)
		}
		defer f.Close()
		src, err := readLimited(f, pos[0])
		return src, pos[0], err
	case len(pos) == 0 && a.stdinIsTerminal():
		return "", "", usagef("exec: no code: give -c CODE, a FILE, or pipe it on stdin")
	default:
		src, err := readLimited(a.stdin, "stdin")
		return src, "", err
	}
}

// readLimited reads code, refusing more than the platform accepts.
func readLimited(r io.Reader, name string) (string, error) {
	b, err := io.ReadAll(io.LimitReader(r, sandbox.MaxCodeBytes+1))
	if err != nil {
		return "", fmt.Errorf("read code from %s: %w", name, err)
	}
	if len(b) > sandbox.MaxCodeBytes {
		return "", fmt.Errorf("read code from %s: more than %d bytes", name, sandbox.MaxCodeBytes)
	}
	return string(b), nil
}

// languageFromExt maps a file name's extension to a language, or "".
func languageFromExt(name string) string {
	switch strings.ToLower(filepath.Ext(name)) {
	case ".py":
		return sandbox.LanguagePython
	case ".js", ".mjs", ".cjs":
		return sandbox.LanguageNode
	case ".sh", ".bash":
		return sandbox.LanguageBash
	}
	return ""
}

// defaultLanguage is python if the template (given, or the session's) runs
// it, else the template's first language; python without either.
func defaultLanguage(ctx context.Context, c *clients, templateID, sessionID string) (string, error) {
	if templateID == "" && sessionID != "" {
		resp, err := c.sessions.GetSession(ctx, connect.NewRequest(&sandboxv1.GetSessionRequest{SessionId: sessionID}))
		if err != nil {
			return "", fmt.Errorf("session %s: %w", sessionID, err)
		}
		templateID = resp.Msg.GetSession().GetTemplateId()
	}
	if templateID == "" {
		return sandbox.LanguagePython, nil
	}
	resp, err := c.templates.GetTemplate(ctx, connect.NewRequest(&sandboxv1.GetTemplateRequest{TemplateId: templateID}))
	if err != nil {
		return "", fmt.Errorf("template %s: %w", templateID, err)
	}
	langs := resp.Msg.GetTemplate().GetLanguages()
	if len(langs) == 0 || slices.Contains(langs, sandbox.LanguagePython) {
		return sandbox.LanguagePython, nil
	}
	return langs[0], nil
}

// builtinTemplateFor is the first built-in template that runs lang.
func builtinTemplateFor(lang string) string {
	for _, t := range sandbox.BuiltinTemplates {
		if slices.Contains(t.Languages, lang) {
			return t.ID
		}
	}
	return sandbox.BuiltinTemplates[0].ID
}

// cleanupContext outlives ctx's cancellation, so that an interrupted run
// can still undo what it did, but not forever.
func cleanupContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
}

// interrupted reports that a signal stopped exec.
func (a *app) interrupted() error {
	fmt.Fprintf(a.stderr, "sandboxctl: %s: interrupted\n", connect.CodeCanceled)
	return &exitCodeError{code: exitCanceled}
}

// removeSession terminates a session exec created. Failing to is reported
// but does not change the exit code: the code's result stands, and the
// session's idle timeout removes it eventually.
func (a *app) removeSession(ctx context.Context, c *clients, id string) {
	ctx, cancel := cleanupContext(ctx)
	defer cancel()
	if _, err := c.sessions.TerminateSession(ctx, connect.NewRequest(&sandboxv1.TerminateSessionRequest{SessionId: id})); err != nil {
		a.printError(fmt.Errorf("remove session %s: %w", id, err))
	}
}

// removeLabeledSessions terminates the sessions carrying this run's token:
// the one whose creation was interrupted, if the server went on to create it.
func (a *app) removeLabeledSessions(ctx context.Context, c *clients, token string) {
	ctx, cancel := cleanupContext(ctx)
	defer cancel()
	resp, err := c.sessions.ListSessions(ctx, connect.NewRequest(&sandboxv1.ListSessionsRequest{Labels: map[string]string{execLabel: token}}))
	if err != nil {
		a.printError(fmt.Errorf("find the interrupted session: %w", err))
		return
	}
	for _, s := range resp.Msg.GetSessions() {
		a.removeSession(ctx, c, s.GetId())
	}
}

// cancelExecutions cancels the execution an interrupted Execute call
// started. Its id never reached us, so it is found among the session's
// unfinished executions: all of them when exec owns the session, else those
// with the same language and code.
func (a *app) cancelExecutions(ctx context.Context, c *clients, sessionID string, owned bool, lang, code string) {
	ctx, cancel := cleanupContext(ctx)
	defer cancel()
	list, err := listExecutions(ctx, c, &sandboxv1.ListExecutionsRequest{SessionId: sessionID}, true)
	if err != nil {
		a.printError(fmt.Errorf("find the interrupted execution: %w", err))
		return
	}
	for _, e := range list.GetExecutions() {
		switch e.GetState() {
		case sandboxv1.ExecutionState_EXECUTION_STATE_QUEUED, sandboxv1.ExecutionState_EXECUTION_STATE_RUNNING:
		default:
			continue
		}
		if !owned && (e.GetLanguage() != lang || e.GetCode() != code) {
			continue
		}
		_, err := c.executions.CancelExecution(ctx, connect.NewRequest(&sandboxv1.CancelExecutionRequest{ExecutionId: e.GetId()}))
		if err != nil {
			a.printError(fmt.Errorf("cancel execution %s: %w", e.GetId(), err))
		}
	}
}

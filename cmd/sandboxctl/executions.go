package main

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"connectrpc.com/connect"

	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
)

func (a *app) cmdExecutionsGet(ctx context.Context, args []string) error {
	fs := a.newFlagSet("executions get")
	format := outputFlag(fs)
	pos, err := a.parseLeaf(fs, args, "executions get ID", "Shows one execution, with its output.", 1, 1)
	if err != nil {
		return err
	}
	c, err := a.clients()
	if err != nil {
		return err
	}
	resp, err := c.executions.GetExecution(ctx, connect.NewRequest(&sandboxv1.GetExecutionRequest{ExecutionId: pos[0]}))
	if err != nil {
		return err
	}
	e := resp.Msg.GetExecution()
	if *format == formatJSON {
		return a.printJSON(e)
	}
	return a.printExecution(e)
}

// printExecution prints one execution's fields, then its output.
func (a *app) printExecution(e *sandboxv1.Execution) error {
	d := newDetails(a.stdout)
	d.field("ID", e.GetId())
	d.field("Session", e.GetSessionId())
	d.field("Language", e.GetLanguage())
	d.field("State", executionStateName(e.GetState()))
	d.field("Reason", e.GetStateReason())
	d.field("Exit code", exitCodeColumn(e))
	d.field("Duration", formatDuration(e.GetDurationMs()))
	if e.GetTimeoutSeconds() > 0 {
		d.field("Timeout", fmt.Sprintf("%ds", e.GetTimeoutSeconds()))
	} else {
		d.field("Timeout", "")
	}
	d.field("Created", timestamp(a.now(), e.GetCreatedAt()))
	d.field("Finished", timestamp(a.now(), e.GetFinishedAt()))
	var arts []string
	for _, art := range e.GetArtifacts() {
		arts = append(arts, fmt.Sprintf("%s (%s)", art.GetPath(), formatBytes(art.GetSizeBytes())))
	}
	d.field("Artifacts", strings.Join(arts, ", "))
	if err := d.flush(); err != nil {
		return err
	}
	for _, s := range []struct {
		name      string
		text      string
		truncated bool
	}{{"stdout", e.GetStdout(), e.GetStdoutTruncated()}, {"stderr", e.GetStderr(), e.GetStderrTruncated()}} {
		if s.text == "" && !s.truncated {
			continue
		}
		header := "--- " + s.name
		if s.truncated {
			header += " (truncated)"
		}
		fmt.Fprintln(a.stdout, header)
		fmt.Fprint(a.stdout, s.text)
		if !strings.HasSuffix(s.text, "\n") {
			fmt.Fprintln(a.stdout)
		}
	}
	return nil
}

// exitCodeColumn is the exit code of a completed execution, blank otherwise.
func exitCodeColumn(e *sandboxv1.Execution) string {
	if e.GetState() != sandboxv1.ExecutionState_EXECUTION_STATE_COMPLETED {
		return ""
	}
	return strconv.Itoa(int(e.GetExitCode()))
}

func (a *app) cmdExecutionsList(ctx context.Context, args []string) error {
	fs := a.newFlagSet("executions list")
	session := fs.String("session", "", "session id (required)")
	limit := fs.Int("limit", 0, "at most this many executions per page (0: the server's default)")
	all := fs.Bool("all", false, "follow next_page_token and list every page")
	pageToken := fs.String("page-token", "", "start at this page token")
	format := outputFlag(fs)
	if _, err := a.parseLeaf(fs, args, "executions list --session ID [flags]", "Lists a session's executions, oldest first.", 0, 0); err != nil {
		return err
	}
	if *session == "" {
		return usagef("executions list: --session is required")
	}
	c, err := a.clients()
	if err != nil {
		return err
	}
	out, err := listExecutions(ctx, c, &sandboxv1.ListExecutionsRequest{SessionId: *session, PageSize: int32(*limit), PageToken: *pageToken}, *all)
	if err != nil {
		return err
	}
	if *format == formatJSON {
		return a.printJSON(out)
	}
	t := newTable(a.stdout, "ID", "SESSION", "LANGUAGE", "STATE", "EXIT", "DURATION", "AGE")
	for _, e := range out.Executions {
		t.row(e.GetId(), e.GetSessionId(), e.GetLanguage(), executionStateName(e.GetState()), exitCodeColumn(e),
			formatDuration(e.GetDurationMs()), age(a.now(), e.GetCreatedAt()))
	}
	if err := t.flush(); err != nil {
		return err
	}
	a.notePage(out.NextPageToken)
	return nil
}

// listExecutions lists one page, or with all every page from req's on.
func listExecutions(ctx context.Context, c *clients, req *sandboxv1.ListExecutionsRequest, all bool) (*sandboxv1.ListExecutionsResponse, error) {
	out := &sandboxv1.ListExecutionsResponse{}
	for {
		resp, err := c.executions.ListExecutions(ctx, connect.NewRequest(req))
		if err != nil {
			return nil, err
		}
		out.Executions = append(out.Executions, resp.Msg.GetExecutions()...)
		out.NextPageToken = resp.Msg.GetNextPageToken()
		if !all || out.NextPageToken == "" {
			return out, nil
		}
		if out.NextPageToken == req.PageToken {
			return nil, errors.New("list executions: the server returned the same page token twice")
		}
		req.PageToken = out.NextPageToken
	}
}

func (a *app) cmdExecutionsCancel(ctx context.Context, args []string) error {
	fs := a.newFlagSet("executions cancel")
	format := outputFlag(fs)
	pos, err := a.parseLeaf(fs, args, "executions cancel ID", "Cancels a running execution and prints its id and final state.", 1, 1)
	if err != nil {
		return err
	}
	c, err := a.clients()
	if err != nil {
		return err
	}
	resp, err := c.executions.CancelExecution(ctx, connect.NewRequest(&sandboxv1.CancelExecutionRequest{ExecutionId: pos[0]}))
	if err != nil {
		return err
	}
	e := resp.Msg.GetExecution()
	if *format == formatJSON {
		return a.printJSON(e)
	}
	_, err = fmt.Fprintf(a.stdout, "%s %s\n", e.GetId(), executionStateName(e.GetState()))
	return err
}

package main

import (
	"context"
	"errors"
	"fmt"

	"connectrpc.com/connect"

	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
)

func (a *app) cmdSessionsCreate(ctx context.Context, args []string) error {
	fs := a.newFlagSet("sessions create")
	template := fs.String("template", "", "template id (required)")
	memory := fs.Int64("memory-mib", 0, "memory in MiB (0: the template's default)")
	cpu := fs.Int("cpu-millis", 0, "CPU in thousandths of a core (0: the template's default)")
	pids := fs.Int("pids", 0, "maximum processes and threads (0: the template's default)")
	disk := fs.Int64("disk-mib", 0, "size of /workspace in MiB (0: the template's default)")
	idle := fs.Int("idle-timeout", 0, "seconds without an execution before the session ends (0: the server's default)")
	maxLifetime := fs.Int("max-lifetime", 0, "`SECONDS` after creation at which the session ends, busy or not (0: the server's default)")
	key := idempotencyKeyFlag(fs, "idempotency `KEY` of the request (default: a fresh random one); the same key never creates a second session")
	env, labels := kvFlag{}, kvFlag{}
	fs.Var(env, "env", "environment variable `K=V` of the session (repeatable)")
	fs.Var(labels, "label", "label `K=V` (repeatable)")
	format := outputFlag(fs)
	if _, err := a.parseLeaf(fs, args, "sessions create --template T [flags]",
		"Creates a session and prints its id (the session with -o json) once it is running.", 0, 0); err != nil {
		return err
	}
	switch {
	case *template == "":
		return usagef("sessions create: --template is required")
	case *idle < 0:
		return usagef("sessions create: --idle-timeout must not be negative")
	case *maxLifetime < 0:
		return usagef("sessions create: --max-lifetime must not be negative")
	}
	if *key == "" {
		*key = newIdempotencyKey()
	}
	c, err := a.clients()
	if err != nil {
		return err
	}
	resp, err := createSession(ctx, a, c, &sandboxv1.CreateSessionRequest{
		TemplateId: *template,
		ResourceLimits: &sandboxv1.ResourceLimits{
			CpuMillis: int32(*cpu), MemoryMib: *memory, Pids: int32(*pids), DiskMib: *disk,
		},
		Env:                env,
		Labels:             labels,
		IdleTimeoutSeconds: int32(*idle),
		MaxLifetimeSeconds: int32(*maxLifetime),
		IdempotencyKey:     *key,
	})
	if err != nil {
		return err
	}
	s := resp.GetSession()
	if *format == formatJSON {
		return a.printJSON(s)
	}
	_, err = fmt.Fprintln(a.stdout, s.GetId())
	return err
}

// createSession calls CreateSession, retrying with the same idempotency key
// (req must carry one) while the cluster is unreachable or between leaders.
func createSession(ctx context.Context, a *app, c *clients, req *sandboxv1.CreateSessionRequest) (*sandboxv1.CreateSessionResponse, error) {
	return withRetry(ctx, a, "create session", func(ctx context.Context) (*sandboxv1.CreateSessionResponse, error) {
		resp, err := c.sessions.CreateSession(ctx, connect.NewRequest(req))
		if err != nil {
			return nil, err
		}
		return resp.Msg, nil
	})
}

func (a *app) cmdSessionsGet(ctx context.Context, args []string) error {
	fs := a.newFlagSet("sessions get")
	format := outputFlag(fs)
	pos, err := a.parseLeaf(fs, args, "sessions get ID", "Shows one session.", 1, 1)
	if err != nil {
		return err
	}
	c, err := a.clients()
	if err != nil {
		return err
	}
	resp, err := c.sessions.GetSession(ctx, connect.NewRequest(&sandboxv1.GetSessionRequest{SessionId: pos[0]}))
	if err != nil {
		return err
	}
	s := resp.Msg.GetSession()
	if *format == formatJSON {
		return a.printJSON(s)
	}
	d := newDetails(a.stdout)
	d.field("ID", s.GetId())
	d.field("Template", s.GetTemplateId())
	d.field("State", sessionStateName(s.GetState()))
	d.field("Reason", s.GetStateReason())
	d.field("Agent", s.GetAgentId())
	d.field("Container", s.GetContainerId())
	d.field("Tenant", s.GetTenant())
	d.field("Created", timestamp(a.now(), s.GetCreatedAt()))
	d.field("Last active", timestamp(a.now(), s.GetLastActiveAt()))
	d.field("Ended", timestamp(a.now(), s.GetEndedAt()))
	d.field("Limits", formatLimits(s.GetResourceLimits()))
	d.field("Idle timeout", seconds(s.GetIdleTimeoutSeconds()))
	d.field("Max lifetime", seconds(s.GetMaxLifetimeSeconds()))
	d.field("Labels", formatMap(s.GetLabels()))
	d.field("Env", formatMap(s.GetEnv()))
	return d.flush()
}

func (a *app) cmdSessionsList(ctx context.Context, args []string) error {
	fs := a.newFlagSet("sessions list")
	var states listFlag
	fs.Var(&states, "state", "only sessions in this `state` (running, terminated, ...; repeatable)")
	labels := kvFlag{}
	fs.Var(labels, "label", "only sessions carrying label `K=V` (repeatable)")
	limit := fs.Int("limit", 0, "at most this many sessions per page (0: the server's default)")
	all := fs.Bool("all", false, "follow next_page_token and list every page")
	pageToken := fs.String("page-token", "", "start at this page token")
	format := outputFlag(fs)
	if _, err := a.parseLeaf(fs, args, "sessions list [flags]", "Lists sessions; with --all, every page.", 0, 0); err != nil {
		return err
	}
	req := &sandboxv1.ListSessionsRequest{Labels: labels, PageSize: int32(*limit), PageToken: *pageToken}
	for _, s := range states {
		st, err := parseSessionState(s)
		if err != nil {
			return usagef("sessions list: %v", err)
		}
		req.States = append(req.States, st)
	}
	c, err := a.clients()
	if err != nil {
		return err
	}
	out := &sandboxv1.ListSessionsResponse{}
	for {
		resp, err := c.sessions.ListSessions(ctx, connect.NewRequest(req))
		if err != nil {
			return err
		}
		out.Sessions = append(out.Sessions, resp.Msg.GetSessions()...)
		out.NextPageToken = resp.Msg.GetNextPageToken()
		if !*all || out.NextPageToken == "" {
			break
		}
		if out.NextPageToken == req.PageToken {
			return errors.New("list sessions: the server returned the same page token twice")
		}
		req.PageToken = out.NextPageToken
	}
	if *format == formatJSON {
		return a.printJSON(out)
	}
	t := newTable(a.stdout, "ID", "TEMPLATE", "STATE", "AGENT", "AGE", "LABELS")
	for _, s := range out.Sessions {
		t.row(s.GetId(), s.GetTemplateId(), sessionStateName(s.GetState()), s.GetAgentId(), age(a.now(), s.GetCreatedAt()), formatMap(s.GetLabels()))
	}
	if err := t.flush(); err != nil {
		return err
	}
	a.notePage(out.NextPageToken)
	return nil
}

// notePage tells people, on stderr, that a listing has more pages.
func (a *app) notePage(token string) {
	if token != "" {
		fmt.Fprintf(a.stderr, "sandboxctl: more results: use --all, or --page-token %s\n", token)
	}
}

func (a *app) cmdSessionsRm(ctx context.Context, args []string) error {
	fs := a.newFlagSet("sessions rm")
	pos, err := a.parseLeaf(fs, args, "sessions rm ID...", "Terminates sessions (TerminateSession) and prints each id.", 1, -1)
	if err != nil {
		return err
	}
	c, err := a.clients()
	if err != nil {
		return err
	}
	return a.forEach(pos, "session", func(id string) error {
		_, err := c.sessions.TerminateSession(ctx, connect.NewRequest(&sandboxv1.TerminateSessionRequest{SessionId: id}))
		return err
	})
}

// forEach runs do for every id, printing the ids it succeeded for and an
// error line for the others; it fails when any failed.
func (a *app) forEach(ids []string, kind string, do func(id string) error) error {
	failed := 0
	for _, id := range ids {
		if err := do(id); err != nil {
			a.printError(fmt.Errorf("%s %s: %w", kind, id, err))
			failed++
			continue
		}
		fmt.Fprintln(a.stdout, id)
	}
	if failed > 0 {
		return &exitCodeError{code: exitError}
	}
	return nil
}

// seconds formats a positive number of seconds as "60s", others as blank.
func seconds(n int32) string {
	if n <= 0 {
		return ""
	}
	return fmt.Sprintf("%ds", n)
}

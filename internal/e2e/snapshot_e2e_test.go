package e2e

import (
	"context"
	"slices"
	"testing"

	"connectrpc.com/connect"

	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
)

// ids of everything a cluster holds: templates, sessions, executions (with
// their stdout, so a restored result is the same result).
func stateOf(t *testing.T, c *cluster) (templates, sessions []string, executions map[string]string) {
	t.Helper()
	ctx := context.Background()
	ts, err := c.templates.ListTemplates(ctx, connect.NewRequest(&sandboxv1.ListTemplatesRequest{}))
	must(t, err)
	for _, tm := range ts.Msg.GetTemplates() {
		templates = append(templates, tm.GetId())
	}
	executions = map[string]string{}
	ss, err := c.sessions.ListSessions(ctx, connect.NewRequest(&sandboxv1.ListSessionsRequest{PageSize: 1000}))
	must(t, err)
	for _, s := range ss.Msg.GetSessions() {
		sessions = append(sessions, s.GetId())
		es, err := c.executions.ListExecutions(ctx, connect.NewRequest(&sandboxv1.ListExecutionsRequest{SessionId: s.GetId(), PageSize: 1000}))
		must(t, err)
		for _, e := range es.Msg.GetExecutions() {
			executions[e.GetId()] = e.GetStdout()
		}
	}
	slices.Sort(templates)
	slices.Sort(sessions)
	return templates, sessions, executions
}

// TestSnapshotRestore saves a snapshot of one cluster with sandboxctl and
// restores it into a fresh one: every template, session and execution is
// there.
func TestSnapshotRestore(t *testing.T) {
	a := startCluster(t)
	if _, err := a.templates.CreateTemplate(context.Background(), connect.NewRequest(&sandboxv1.CreateTemplateRequest{Template: &sandboxv1.Template{
		Id: "snap-custom", Image: "localhost/sandbox/python-basic:latest", Languages: []string{"python"},
	}})); err != nil {
		t.Fatal(err)
	}
	s := a.createSession(&sandboxv1.CreateSessionRequest{TemplateId: "python-basic"})
	a.execute(&sandboxv1.ExecuteRequest{SessionId: s.GetId(), Language: "python", Code: "print('before the snapshot')"})
	ended := a.createSession(&sandboxv1.CreateSessionRequest{TemplateId: "python-basic"})
	a.execute(&sandboxv1.ExecuteRequest{SessionId: ended.GetId(), Language: "bash", Code: "echo ended"})
	a.terminate(ended.GetId())
	wantT, wantS, wantE := stateOf(t, a)

	file := t.TempDir() + "/state.snap"
	if _, errs, code := a.ctl("", "cluster", "snapshot", "save", file); code != 0 {
		t.Fatalf("snapshot save: %s", errs)
	}
	a.terminate(s.GetId())

	b := startCluster(t)
	if _, errs, code := b.ctl("", "cluster", "snapshot", "restore", "--yes", file); code != 0 {
		t.Fatalf("snapshot restore: %s", errs)
	}
	gotT, gotS, gotE := stateOf(t, b)
	if !slices.Equal(gotT, wantT) {
		t.Errorf("templates after restore %v, want %v", gotT, wantT)
	}
	if !slices.Equal(gotS, wantS) {
		t.Errorf("sessions after restore %v, want %v", gotS, wantS)
	}
	if len(gotE) != len(wantE) {
		t.Errorf("%d executions after restore, want %d", len(gotE), len(wantE))
	}
	for id, out := range wantE {
		if gotE[id] != out {
			t.Errorf("execution %s after restore: stdout %q, want %q", id, gotE[id], out)
		}
	}
	t.Logf("restored %d templates, %d sessions, %d executions", len(gotT), len(gotS), len(gotE))
}

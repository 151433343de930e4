package api

import (
	"context"
	"fmt"
	"log/slog"
	"sync"

	"connectrpc.com/connect"

	"github.com/sandboxhq/sandbox"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
)

// Backend is what the public API needs from the scheduler. Its errors wrap
// the domain errors of package sandbox.
type Backend interface {
	CreateSession(ctx context.Context, req *sandboxv1.CreateSessionRequest) (*sandboxv1.Session, error)
	GetSession(ctx context.Context, id string) (*sandboxv1.Session, error)
	ListSessions(ctx context.Context, req *sandboxv1.ListSessionsRequest) (sessions []*sandboxv1.Session, nextPageToken string, err error)
	TerminateSession(ctx context.Context, id string) (*sandboxv1.Session, error)

	Execute(ctx context.Context, req *sandboxv1.ExecuteRequest) (*sandboxv1.Execution, error)
	GetExecution(ctx context.Context, id string) (*sandboxv1.Execution, error)
	ListExecutions(ctx context.Context, req *sandboxv1.ListExecutionsRequest) (executions []*sandboxv1.Execution, nextPageToken string, err error)
	CancelExecution(ctx context.Context, id string) (*sandboxv1.Execution, error)
	// DownloadArtifact calls send with the artifact's metadata and its bytes
	// in chunks; meta is nil after the first call.
	DownloadArtifact(ctx context.Context, executionID, path string, send func(meta *sandboxv1.Artifact, chunk []byte) error) error

	CreateTemplate(ctx context.Context, t *sandboxv1.Template) (*sandboxv1.Template, error)
	GetTemplate(ctx context.Context, id string) (*sandboxv1.Template, error)
	ListTemplates(ctx context.Context) ([]*sandboxv1.Template, error)
	DeleteTemplate(ctx context.Context, id string) error
	UpdateTemplate(ctx context.Context, req *sandboxv1.UpdateTemplateRequest) (*sandboxv1.Template, error)

	// LiveSessions counts a tenant's sessions that are not over, for its quota.
	LiveSessions(tenant string) int
}

// handlers implements the generated service interfaces on a Backend.
type handlers struct {
	b      Backend
	logger *slog.Logger
	keys   *Keys // tenants' quotas

	mu sync.Mutex
	// creating counts, per tenant with a session quota, the creates under
	// way, so that concurrent creates cannot pass the quota together.
	creating map[string]int
}

// admitSession checks the caller's tenant against its session quota and,
// when admitted, holds a place until done is called.
func (h *handlers) admitSession(ctx context.Context) (done func(), err error) {
	tenant := Principal(ctx)
	q := h.keys.Tenant(tenant)
	if q == nil || q.MaxSessions <= 0 {
		return func() {}, nil
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if live := h.b.LiveSessions(tenant) + h.creating[tenant]; live >= q.MaxSessions {
		return nil, fmt.Errorf("%w: tenant %s holds %d live sessions, its quota; terminate one first", sandbox.ErrResourceExhausted, tenant, live)
	}
	h.creating[tenant]++
	return func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		if h.creating[tenant]--; h.creating[tenant] <= 0 {
			delete(h.creating, tenant)
		}
	}, nil
}

// fail turns a backend error into the Connect error the client sees, logging
// the ones that are not domain errors before their details are hidden.
func (h *handlers) fail(ctx context.Context, err error) error {
	if Code(err) == connect.CodeUnknown {
		h.logger.ErrorContext(ctx, "internal error", "err", err)
	}
	return Error(err)
}

func (h *handlers) CreateSession(ctx context.Context, req *connect.Request[sandboxv1.CreateSessionRequest]) (*connect.Response[sandboxv1.CreateSessionResponse], error) {
	done, err := h.admitSession(ctx)
	if err != nil {
		return nil, h.fail(ctx, err)
	}
	defer done()
	s, err := h.b.CreateSession(ctx, req.Msg)
	if err != nil {
		return nil, h.fail(ctx, err)
	}
	return connect.NewResponse(&sandboxv1.CreateSessionResponse{Session: s}), nil
}

func (h *handlers) GetSession(ctx context.Context, req *connect.Request[sandboxv1.GetSessionRequest]) (*connect.Response[sandboxv1.GetSessionResponse], error) {
	s, err := h.b.GetSession(ctx, req.Msg.GetSessionId())
	if err != nil {
		return nil, h.fail(ctx, err)
	}
	return connect.NewResponse(&sandboxv1.GetSessionResponse{Session: s}), nil
}

func (h *handlers) ListSessions(ctx context.Context, req *connect.Request[sandboxv1.ListSessionsRequest]) (*connect.Response[sandboxv1.ListSessionsResponse], error) {
	ss, next, err := h.b.ListSessions(ctx, req.Msg)
	if err != nil {
		return nil, h.fail(ctx, err)
	}
	return connect.NewResponse(&sandboxv1.ListSessionsResponse{Sessions: ss, NextPageToken: next}), nil
}

func (h *handlers) TerminateSession(ctx context.Context, req *connect.Request[sandboxv1.TerminateSessionRequest]) (*connect.Response[sandboxv1.TerminateSessionResponse], error) {
	s, err := h.b.TerminateSession(ctx, req.Msg.GetSessionId())
	if err != nil {
		return nil, h.fail(ctx, err)
	}
	return connect.NewResponse(&sandboxv1.TerminateSessionResponse{Session: s}), nil
}

func (h *handlers) Execute(ctx context.Context, req *connect.Request[sandboxv1.ExecuteRequest]) (*connect.Response[sandboxv1.ExecuteResponse], error) {
	if q := h.keys.Tenant(Principal(ctx)); !q.AllowExecution() {
		return nil, h.fail(ctx, fmt.Errorf("%w: tenant %s is over its rate of %g executions a second; retry shortly", sandbox.ErrResourceExhausted, q.Name, q.ExecutionsPerSecond))
	}
	e, err := h.b.Execute(ctx, req.Msg)
	if err != nil {
		return nil, h.fail(ctx, err)
	}
	return connect.NewResponse(&sandboxv1.ExecuteResponse{Execution: e}), nil
}

func (h *handlers) GetExecution(ctx context.Context, req *connect.Request[sandboxv1.GetExecutionRequest]) (*connect.Response[sandboxv1.GetExecutionResponse], error) {
	e, err := h.b.GetExecution(ctx, req.Msg.GetExecutionId())
	if err != nil {
		return nil, h.fail(ctx, err)
	}
	return connect.NewResponse(&sandboxv1.GetExecutionResponse{Execution: e}), nil
}

func (h *handlers) ListExecutions(ctx context.Context, req *connect.Request[sandboxv1.ListExecutionsRequest]) (*connect.Response[sandboxv1.ListExecutionsResponse], error) {
	es, next, err := h.b.ListExecutions(ctx, req.Msg)
	if err != nil {
		return nil, h.fail(ctx, err)
	}
	return connect.NewResponse(&sandboxv1.ListExecutionsResponse{Executions: es, NextPageToken: next}), nil
}

func (h *handlers) CancelExecution(ctx context.Context, req *connect.Request[sandboxv1.CancelExecutionRequest]) (*connect.Response[sandboxv1.CancelExecutionResponse], error) {
	e, err := h.b.CancelExecution(ctx, req.Msg.GetExecutionId())
	if err != nil {
		return nil, h.fail(ctx, err)
	}
	return connect.NewResponse(&sandboxv1.CancelExecutionResponse{Execution: e}), nil
}

func (h *handlers) DownloadArtifact(ctx context.Context, req *connect.Request[sandboxv1.DownloadArtifactRequest], stream *connect.ServerStream[sandboxv1.DownloadArtifactResponse]) error {
	err := h.b.DownloadArtifact(ctx, req.Msg.GetExecutionId(), req.Msg.GetPath(), func(meta *sandboxv1.Artifact, chunk []byte) error {
		return stream.Send(&sandboxv1.DownloadArtifactResponse{Artifact: meta, Chunk: chunk})
	})
	if err != nil {
		return h.fail(ctx, err)
	}
	return nil
}

func (h *handlers) CreateTemplate(ctx context.Context, req *connect.Request[sandboxv1.CreateTemplateRequest]) (*connect.Response[sandboxv1.CreateTemplateResponse], error) {
	t, err := h.b.CreateTemplate(ctx, req.Msg.GetTemplate())
	if err != nil {
		return nil, h.fail(ctx, err)
	}
	return connect.NewResponse(&sandboxv1.CreateTemplateResponse{Template: t}), nil
}

func (h *handlers) GetTemplate(ctx context.Context, req *connect.Request[sandboxv1.GetTemplateRequest]) (*connect.Response[sandboxv1.GetTemplateResponse], error) {
	t, err := h.b.GetTemplate(ctx, req.Msg.GetTemplateId())
	if err != nil {
		return nil, h.fail(ctx, err)
	}
	return connect.NewResponse(&sandboxv1.GetTemplateResponse{Template: t}), nil
}

func (h *handlers) ListTemplates(ctx context.Context, _ *connect.Request[sandboxv1.ListTemplatesRequest]) (*connect.Response[sandboxv1.ListTemplatesResponse], error) {
	ts, err := h.b.ListTemplates(ctx)
	if err != nil {
		return nil, h.fail(ctx, err)
	}
	return connect.NewResponse(&sandboxv1.ListTemplatesResponse{Templates: ts}), nil
}

func (h *handlers) DeleteTemplate(ctx context.Context, req *connect.Request[sandboxv1.DeleteTemplateRequest]) (*connect.Response[sandboxv1.DeleteTemplateResponse], error) {
	if err := h.b.DeleteTemplate(ctx, req.Msg.GetTemplateId()); err != nil {
		return nil, h.fail(ctx, err)
	}
	return connect.NewResponse(&sandboxv1.DeleteTemplateResponse{}), nil
}

func (h *handlers) UpdateTemplate(ctx context.Context, req *connect.Request[sandboxv1.UpdateTemplateRequest]) (*connect.Response[sandboxv1.UpdateTemplateResponse], error) {
	t, err := h.b.UpdateTemplate(ctx, req.Msg)
	if err != nil {
		return nil, h.fail(ctx, err)
	}
	return connect.NewResponse(&sandboxv1.UpdateTemplateResponse{Template: t}), nil
}

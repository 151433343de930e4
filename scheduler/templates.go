package scheduler

import (
	"context"
	"fmt"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/sandboxhq/sandbox"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/scheduler/fsm"
)

// CreateTemplate adds a template; its id must be new.
func (s *Scheduler) CreateTemplate(ctx context.Context, t *sandboxv1.Template) (*sandboxv1.Template, error) {
	if t == nil {
		return nil, fmt.Errorf("%w: template is required", sandbox.ErrInvalidArgument)
	}
	t = proto.Clone(t).(*sandboxv1.Template)
	if t.GetMaxLimits() == nil {
		t.MaxLimits = limitsToProto(sandbox.MaxLimits)
	}
	def, err := sandbox.ResolveLimits(limitsFromProto(t.GetDefaultLimits()), sandbox.DefaultLimits, limitsFromProto(t.GetMaxLimits()))
	if err != nil {
		return nil, fmt.Errorf("template %q default_limits: %w", t.GetId(), err)
	}
	t.DefaultLimits = limitsToProto(def)
	if err := sandbox.ValidateTemplate(sandbox.Template{ID: t.GetId(), Image: t.GetImage(), Languages: t.GetLanguages()}); err != nil {
		return nil, err
	}
	if err := validWarmPoolSize(t.GetWarmPoolSize()); err != nil {
		return nil, fmt.Errorf("template %q: %w", t.GetId(), err)
	}
	if _, ok := s.fsm.Template(t.GetId()); ok {
		return nil, fmt.Errorf("%w: template %q already exists", sandbox.ErrAlreadyExists, t.GetId())
	}
	t.Builtin = false
	t.CreatedAt = timestamppb.Now()
	// The check above is a fast path; the FSM decides, so that of two
	// concurrent creates of one id exactly one succeeds.
	if err := s.apply(ctx, fsm.CreateTemplateType, &statev1.CreateTemplate{Template: t}); err != nil {
		return nil, err
	}
	return s.GetTemplate(ctx, t.GetId())
}

// GetTemplate returns one template.
func (s *Scheduler) GetTemplate(_ context.Context, id string) (*sandboxv1.Template, error) {
	if id == "" {
		return nil, fmt.Errorf("%w: template_id is required", sandbox.ErrInvalidArgument)
	}
	t, ok := s.fsm.Template(id)
	if !ok {
		return nil, fmt.Errorf("%w: template %q does not exist", sandbox.ErrNotFound, id)
	}
	return t, nil
}

// ListTemplates returns every template, by id.
func (s *Scheduler) ListTemplates(context.Context) ([]*sandboxv1.Template, error) {
	return s.fsm.Templates(), nil
}

// DeleteTemplate removes a template no live session uses.
func (s *Scheduler) DeleteTemplate(ctx context.Context, id string) error {
	if _, err := s.GetTemplate(ctx, id); err != nil {
		return err
	}
	return s.apply(ctx, fsm.DeleteTemplateType, &statev1.DeleteTemplate{TemplateId: id})
}

// MaxWarmPoolSize bounds a template's warm pool across the cluster.
const MaxWarmPoolSize = 10000

func validWarmPoolSize(n int32) error {
	if n < 0 || n > MaxWarmPoolSize {
		return fmt.Errorf("%w: warm_pool_size must be between 0 and %d, got %d", sandbox.ErrInvalidArgument, MaxWarmPoolSize, n)
	}
	return nil
}

// UpdateTemplate changes a template's warm pool size; unset fields keep
// their value. Built-in templates may be changed too.
func (s *Scheduler) UpdateTemplate(ctx context.Context, req *sandboxv1.UpdateTemplateRequest) (*sandboxv1.Template, error) {
	if _, err := s.GetTemplate(ctx, req.GetTemplateId()); err != nil {
		return nil, err
	}
	if req.WarmPoolSize != nil {
		if err := validWarmPoolSize(req.GetWarmPoolSize()); err != nil {
			return nil, fmt.Errorf("template %q: %w", req.GetTemplateId(), err)
		}
	}
	if err := s.apply(ctx, fsm.UpdateTemplateType, &statev1.UpdateTemplate{TemplateId: req.GetTemplateId(), WarmPoolSize: req.WarmPoolSize}); err != nil {
		return nil, err
	}
	return s.GetTemplate(ctx, req.GetTemplateId())
}

package agent

import (
	"context"
	"fmt"

	"connectrpc.com/connect"

	"github.com/sandboxhq/sandbox"
	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1/agentv1connect"
)

// Fencing: every command a server sends carries the Raft term (and index)
// its leader issued it at. The agent keeps the highest term it has seen in
// agent.db and refuses commands from lower terms, so a deposed leader's late
// commands change nothing, across agent restarts too. A missing fence is
// term 0: once any leader fenced, unfenced commands are refused.

// serverHeader names the internal URL of the server that sent a command
// (scheduler.ServerHeader; the agent does not import the scheduler).
const serverHeader = "Sandbox-Server"

// observeOnly are the fenced calls that change nothing: their fence raises
// the agent's term but never gets them refused. (DownloadArtifact carries
// no fence.)
var observeOnly = map[string]bool{
	agentv1connect.AgentServiceListContainersProcedure: true,
}

// fencedRequest is every AgentService request that carries a fence.
type fencedRequest interface {
	GetFence() *agentv1.Fence
}

// fencedError is a command refused because a newer leader exists.
type fencedError struct {
	term, seen uint64
}

func (e *fencedError) Error() string {
	return fmt.Sprintf("fenced: command from term %d, this agent has seen term %d (a newer leader exists)", e.term, e.seen)
}

// Is makes a fenced command a failed precondition.
func (e *fencedError) Is(target error) bool { return target == sandbox.ErrFailedPrecondition }

// fenceInterceptor applies checkFence to every fenced unary call, after
// authentication (it is installed after the auth interceptor), so that only
// a server can raise the term.
func (a *Agent) fenceInterceptor() connect.UnaryInterceptorFunc {
	return func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			if req.Spec().IsClient {
				return next(ctx, req)
			}
			m, ok := req.Any().(fencedRequest)
			if !ok {
				return next(ctx, req)
			}
			procedure := req.Spec().Procedure
			if err := a.checkFence(m.GetFence(), !observeOnly[procedure]); err != nil {
				a.log.Warn("command refused", "procedure", procedure, "term", m.GetFence().GetTerm(), "index", m.GetFence().GetIndex(), "err", err)
				return nil, connectError(err)
			}
			if server := req.Header().Get(serverHeader); server != "" && m.GetFence().GetTerm() > 0 {
				if f, ok := a.cp.(interface{ prefer(string) }); ok {
					f.prefer(server)
				}
			}
			return next(ctx, req)
		}
	}
}

// checkFence admits a command with fence f: a lower term than the highest
// seen is refused when refuse is set; a higher one is recorded (durably,
// before the command runs) and becomes the highest.
func (a *Agent) checkFence(f *agentv1.Fence, refuse bool) error {
	term := f.GetTerm()
	a.fenceMu.Lock()
	defer a.fenceMu.Unlock()
	if term < a.fenceTerm {
		if !refuse {
			return nil
		}
		a.metrics.fenced.Inc()
		return &fencedError{term: term, seen: a.fenceTerm}
	}
	if term == a.fenceTerm {
		return nil
	}
	highest, err := a.db.RaiseFenceTerm(term)
	if err != nil {
		if !refuse {
			// It changes nothing; the next command raises the term again.
			a.log.Error("record fence term", "term", term, "err", err)
			return nil
		}
		// Run it without a durable term and a restart could let the deposed
		// leader back in.
		return fmt.Errorf("%w: agent %s: %v", sandbox.ErrUnavailable, a.cfg.ID, err)
	}
	a.log.Info("fence term raised", "from", a.fenceTerm, "to", highest, "index", f.GetIndex())
	a.fenceTerm = highest
	a.metrics.fenceTerm.Set(float64(highest))
	return nil
}

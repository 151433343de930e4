package scheduler

import (
	"context"
	"net/http"
	"sync"

	"connectrpc.com/connect"

	"github.com/sandboxhq/sandbox/api"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1/agentv1connect"
)

// ServerHeader carries, on every call a server makes to an agent, the URL of
// that server's internal port. A call that passes the agent's fence comes
// from the current leader, so the agent sends its reports there first
// instead of through a follower that would forward them.
const ServerHeader = "Sandbox-Server"

// agentPool keeps one internal-API client per agent address.
type agentPool struct {
	token  string
	self   string // this server's internal URL, for ServerHeader
	client *http.Client

	mu      sync.Mutex
	clients map[string]agentv1connect.AgentServiceClient
}

func newAgentPool(token, self string) *agentPool {
	return &agentPool{token: token, self: self, client: api.NewH2CClient(), clients: make(map[string]agentv1connect.AgentServiceClient)}
}

func (p *agentPool) get(address string) agentv1connect.AgentServiceClient {
	p.mu.Lock()
	defer p.mu.Unlock()
	c, ok := p.clients[address]
	if !ok {
		c = agentv1connect.NewAgentServiceClient(p.client, "http://"+address, api.WithBearer(p.token),
			connect.WithInterceptors(serverHeader(p.self)))
		p.clients[address] = c
	}
	return c
}

// serverHeader sets ServerHeader on unary calls (when self is known).
func serverHeader(self string) connect.UnaryInterceptorFunc {
	return func(next connect.UnaryFunc) connect.UnaryFunc {
		return func(ctx context.Context, req connect.AnyRequest) (connect.AnyResponse, error) {
			if self != "" {
				req.Header().Set(ServerHeader, self)
			}
			return next(ctx, req)
		}
	}
}

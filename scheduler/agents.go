package scheduler

import (
	"net/http"
	"sync"

	"github.com/sandboxhq/sandbox/api"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1/agentv1connect"
)

// agentPool keeps one internal-API client per agent address.
type agentPool struct {
	token  string
	client *http.Client

	mu      sync.Mutex
	clients map[string]agentv1connect.AgentServiceClient
}

func newAgentPool(token string) *agentPool {
	return &agentPool{token: token, client: api.NewH2CClient(), clients: make(map[string]agentv1connect.AgentServiceClient)}
}

func (p *agentPool) get(address string) agentv1connect.AgentServiceClient {
	p.mu.Lock()
	defer p.mu.Unlock()
	c, ok := p.clients[address]
	if !ok {
		c = agentv1connect.NewAgentServiceClient(p.client, "http://"+address, api.WithBearer(p.token))
		p.clients[address] = c
	}
	return c
}

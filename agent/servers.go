package agent

import (
	"context"
	"strings"
	"sync/atomic"

	"connectrpc.com/connect"

	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	"github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1/agentv1connect"
)

// failoverCP is a ControlPlaneService client over several servers. Any
// server forwards to the leader, so the agent sticks with the one that last
// answered and moves to the next only when a server cannot be reached
// (connect's unavailable code), which is what a dead server looks like.
type failoverCP struct {
	clients []agentv1connect.ControlPlaneServiceClient
	urls    []string
	current atomic.Int32
}

func newFailoverCP(urls string, newClient func(url string) agentv1connect.ControlPlaneServiceClient) *failoverCP {
	f := &failoverCP{}
	for _, u := range strings.Split(urls, ",") {
		if u = strings.TrimRight(strings.TrimSpace(u), "/"); u != "" {
			f.urls = append(f.urls, u)
			f.clients = append(f.clients, newClient(u))
		}
	}
	return f
}

// prefer makes url (one of the configured servers) the current one: the
// server whose command just passed the fence is the leader, and reports
// sent there need no forwarding. Other URLs are ignored.
func (f *failoverCP) prefer(url string) {
	url = strings.TrimRight(url, "/")
	for i, u := range f.urls {
		if u == url {
			f.current.Store(int32(i))
			return
		}
	}
}

// call runs fn against each server in turn, starting with the current one.
func call[Req, Resp any](f *failoverCP, ctx context.Context, req *connect.Request[Req],
	fn func(agentv1connect.ControlPlaneServiceClient, context.Context, *connect.Request[Req]) (*connect.Response[Resp], error)) (*connect.Response[Resp], error) {
	start := int(f.current.Load())
	var err error
	for i := range f.clients {
		idx := (start + i) % len(f.clients)
		var resp *connect.Response[Resp]
		resp, err = fn(f.clients[idx], ctx, req)
		if err == nil || connect.CodeOf(err) != connect.CodeUnavailable || ctx.Err() != nil {
			if err == nil {
				f.current.Store(int32(idx))
			}
			return resp, err
		}
	}
	return nil, err
}

func (f *failoverCP) RegisterAgent(ctx context.Context, r *connect.Request[agentv1.RegisterAgentRequest]) (*connect.Response[agentv1.RegisterAgentResponse], error) {
	return call(f, ctx, r, agentv1connect.ControlPlaneServiceClient.RegisterAgent)
}

func (f *failoverCP) ReportExecution(ctx context.Context, r *connect.Request[agentv1.ReportExecutionRequest]) (*connect.Response[agentv1.ReportExecutionResponse], error) {
	return call(f, ctx, r, agentv1connect.ControlPlaneServiceClient.ReportExecution)
}

func (f *failoverCP) ReportSessionExit(ctx context.Context, r *connect.Request[agentv1.ReportSessionExitRequest]) (*connect.Response[agentv1.ReportSessionExitResponse], error) {
	return call(f, ctx, r, agentv1connect.ControlPlaneServiceClient.ReportSessionExit)
}

func (f *failoverCP) GetServerInfo(ctx context.Context, r *connect.Request[agentv1.GetServerInfoRequest]) (*connect.Response[agentv1.GetServerInfoResponse], error) {
	return call(f, ctx, r, agentv1connect.ControlPlaneServiceClient.GetServerInfo)
}

func (f *failoverCP) AddServer(ctx context.Context, r *connect.Request[agentv1.AddServerRequest]) (*connect.Response[agentv1.AddServerResponse], error) {
	return call(f, ctx, r, agentv1connect.ControlPlaneServiceClient.AddServer)
}

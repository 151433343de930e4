package agent

import (
	"context"
	"time"

	"connectrpc.com/connect"

	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
)

// Registration backoff while the servers do not answer.
const (
	registerBackoffMin = 100 * time.Millisecond
	registerBackoffMax = 5 * time.Second
	registerTimeout    = 5 * time.Second
)

// registerLoop registers the agent until it succeeds (with backoff), then
// again every registerInterval, which doubles as a liveness signal, until
// ctx ends.
func (a *Agent) registerLoop(ctx context.Context, addr, bootID string) {
	req := &agentv1.RegisterAgentRequest{
		AgentId:   a.cfg.ID,
		Address:   addr,
		CpuMillis: a.cfg.CPUMillis,
		MemoryMib: a.cfg.MemoryMiB,
		BootId:    bootID,
	}
	backoff := registerBackoffMin
	registered, failures := false, 0
	for {
		rctx, cancel := context.WithTimeout(ctx, registerTimeout)
		_, err := a.cp.RegisterAgent(rctx, connect.NewRequest(req))
		cancel()
		if ctx.Err() != nil {
			return
		}
		wait := a.registerInterval
		switch {
		case err != nil:
			failures++
			// Say it loudly the first time and now and then, not every 100ms.
			if failures == 1 || failures%10 == 0 {
				a.log.Warn("register with servers", "server", a.cfg.ServerURL, "attempt", failures, "err", err)
			}
			registered = false
			wait = backoff
			backoff = min(2*backoff, registerBackoffMax)
		case !registered:
			a.log.Info("registered with servers", "server", a.cfg.ServerURL, "address", addr, "boot_id", bootID)
			registered, failures, backoff = true, 0, registerBackoffMin
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

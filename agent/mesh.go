package agent

import (
	"context"
	"time"

	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	"github.com/sandboxhq/sandbox/internal/membership"
)

// joinMesh joins the gossip mesh, advertising this agent's address,
// capacity, what of it is free and its boot id, and re-advertises whenever
// its sessions change.
func (a *Agent) joinMesh(ctx context.Context, addr, bootID string) (*membership.Mesh, error) {
	cfg := *a.cfg.Gossip
	cfg.Name = a.cfg.ID
	cfg.Logger = a.log.With("component", "gossip")
	cfg.Meta = func() *agentv1.NodeMeta {
		freeCPU, freeMem := a.free()
		warm, version := a.pools.counts()
		return &agentv1.NodeMeta{
			Role:          agentv1.NodeMeta_ROLE_AGENT,
			Id:            a.cfg.ID,
			Address:       addr,
			CpuMillis:     a.cfg.CPUMillis,
			MemoryMib:     a.cfg.MemoryMiB,
			FreeCpuMillis: freeCPU,
			FreeMemoryMib: freeMem,
			BootId:        bootID,
			Warm:          warm,
			WarmVersion:   version,
		}
	}
	mesh, err := membership.New(ctx, cfg)
	if err != nil {
		return nil, err
	}
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		for {
			select {
			case <-ctx.Done():
				return
			case <-a.meshUpdate:
			}
			if err := mesh.UpdateMeta(2 * time.Second); err != nil {
				a.log.Debug("re-advertising gossip metadata", "err", err)
			}
		}
	}()
	return mesh, nil
}

// free is the capacity the agent's sessions leave.
func (a *Agent) free() (cpu int32, memory int64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	cpu, memory = a.cfg.CPUMillis, a.cfg.MemoryMiB
	for _, s := range a.sessions {
		cpu -= s.limits.CPUMillis
		memory -= s.limits.MemoryMiB
	}
	return cpu, memory
}

// sessionsChanged asks for the gossip metadata to be re-advertised; it never
// blocks, and changes coalesce.
func (a *Agent) sessionsChanged() {
	select {
	case a.meshUpdate <- struct{}{}:
	default:
	}
}

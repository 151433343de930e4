package scheduler

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"connectrpc.com/connect"

	agentv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/agent/v1"
	statev1 "github.com/sandboxhq/sandbox/api/gen/sandbox/state/v1"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
)

// Warm pools: a template's warm_pool_size is a cluster-wide target. The
// leader spreads it over the READY agents the mesh sees alive, in
// proportion to their memory, and tells each agent its share with
// SetWarmPools whenever the share changes (and again every
// warmResendInterval, so that an agent which restarted gets it back).

// warmResendInterval is how often an agent's unchanged targets are sent again.
const warmResendInterval = 30 * time.Second

// warmSyncTimeout bounds one SetWarmPools call.
const warmSyncTimeout = 5 * time.Second

// warmSent is what the leader last told one agent.
type warmSent struct {
	key string
	at  time.Time
}

// warmShares spreads each template's pool size over agents in proportion to
// their memory capacity, by largest remainder (ties to the earlier agent in
// the order given), so that the shares add up to the size exactly.
func warmShares(templates []*sandboxv1.Template, agents []*statev1.Agent) map[string]map[string]int32 {
	out := make(map[string]map[string]int32, len(agents))
	for _, a := range agents {
		out[a.GetId()] = map[string]int32{}
	}
	var total int64
	for _, a := range agents {
		total += max(a.GetMemoryMib(), 1)
	}
	if total == 0 {
		return out
	}
	for _, t := range templates {
		size := int64(t.GetWarmPoolSize())
		if size <= 0 {
			continue
		}
		type rem struct {
			i   int
			rem int64
		}
		var given int64
		rems := make([]rem, len(agents))
		for i, a := range agents {
			w := max(a.GetMemoryMib(), 1)
			share := size * w / total
			out[a.GetId()][t.GetId()] = int32(share)
			given += share
			rems[i] = rem{i, size * w % total}
		}
		slices.SortStableFunc(rems, func(x, y rem) int {
			switch {
			case x.rem > y.rem:
				return -1
			case x.rem < y.rem:
				return 1
			}
			return 0
		})
		for k := 0; given < size; k++ {
			out[agents[rems[k%len(rems)].i].GetId()][t.GetId()]++
			given++
		}
	}
	return out
}

// syncWarmPools sends every live agent its share of the warm pools when it
// changed or was last sent long ago. Agents that may not take sessions
// (draining, silent) get empty targets, so they stop keeping containers.
func (s *Scheduler) syncWarmPools(ctx context.Context, now time.Time) {
	templates := s.fsm.Templates()
	view := s.liveView(now)
	var eligible, others []*statev1.Agent
	for _, a := range s.fsm.Agents() {
		switch {
		case a.GetState() == sandboxv1.NodeState_NODE_STATE_READY && view.ok(a.GetId()):
			eligible = append(eligible, a)
		case a.GetState() != sandboxv1.NodeState_NODE_STATE_DEAD && a.GetState() != sandboxv1.NodeState_NODE_STATE_LEFT && view.ok(a.GetId()):
			others = append(others, a)
		}
	}
	slices.SortFunc(eligible, func(x, y *statev1.Agent) int { return strings.Compare(x.GetId(), y.GetId()) })
	shares := warmShares(templates, eligible)
	byID := make(map[string]*sandboxv1.Template, len(templates))
	for _, t := range templates {
		byID[t.GetId()] = t
	}
	var wg sync.WaitGroup
	for _, a := range append(eligible, others...) {
		pools := poolTargets(shares[a.GetId()], byID)
		key := warmKey(pools)
		s.mu.Lock()
		last, sent := s.warmSent[a.GetId()]
		s.mu.Unlock()
		if sent && last.key == key && now.Sub(last.at) < warmResendInterval {
			continue
		}
		if !sent && key == "" {
			continue // nothing to ask of an agent never told anything
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			cctx, cancel := context.WithTimeout(ctx, warmSyncTimeout)
			defer cancel()
			_, err := s.agents.get(a.GetAddress()).SetWarmPools(cctx, connect.NewRequest(&agentv1.SetWarmPoolsRequest{Fence: s.fence(), Pools: pools}))
			if err != nil {
				s.log.Warn("sending warm pool targets", "agent", a.GetId(), "err", err)
				return
			}
			if !sent || last.key != key {
				s.log.Info("warm pool targets sent", "agent", a.GetId(), "pools", key)
			}
			s.mu.Lock()
			s.warmSent[a.GetId()] = warmSent{key: key, at: now}
			s.mu.Unlock()
		}()
	}
	wg.Wait()
}

// forgetWarmSent makes the next sync send an agent its targets again (it
// restarted and lost them).
func (s *Scheduler) forgetWarmSent(agentID string) {
	s.mu.Lock()
	delete(s.warmSent, agentID)
	s.mu.Unlock()
}

// poolTargets turns an agent's shares into SetWarmPools targets, by template id.
func poolTargets(share map[string]int32, templates map[string]*sandboxv1.Template) []*agentv1.WarmPoolTarget {
	var out []*agentv1.WarmPoolTarget
	for id, n := range share {
		t, ok := templates[id]
		if !ok || n <= 0 {
			continue
		}
		out = append(out, &agentv1.WarmPoolTarget{TemplateId: id, Image: t.GetImage(), Limits: t.GetDefaultLimits(), Size: n})
	}
	slices.SortFunc(out, func(x, y *agentv1.WarmPoolTarget) int { return strings.Compare(x.GetTemplateId(), y.GetTemplateId()) })
	return out
}

// warmKey is a canonical string of targets, to tell a change.
func warmKey(pools []*agentv1.WarmPoolTarget) string {
	var b strings.Builder
	for _, p := range pools {
		l := p.GetLimits()
		fmt.Fprintf(&b, "%s=%d(%s %d/%d/%d/%d) ", p.GetTemplateId(), p.GetSize(), p.GetImage(), l.GetCpuMillis(), l.GetMemoryMib(), l.GetPids(), l.GetDiskMib())
	}
	return strings.TrimSpace(b.String())
}

package scheduler

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sandboxhq/sandbox"
	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
	"github.com/sandboxhq/sandbox/scheduler/fsm"
)

// collector reports the replicated state as gauges at scrape time, so every
// server reports the same numbers and nothing has to be kept in step.
type collector struct {
	fsm        *fsm.FSM
	sessions   *prometheus.Desc
	executions *prometheus.Desc
	agents     *prometheus.Desc
}

func newCollector(f *fsm.FSM) *collector {
	return &collector{
		fsm:        f,
		sessions:   prometheus.NewDesc("sandbox_sessions", "Sessions in the replicated state, by state.", []string{"state"}, nil),
		executions: prometheus.NewDesc("sandbox_executions", "Executions in the replicated state, by state and language.", []string{"state", "language"}, nil),
		agents:     prometheus.NewDesc("sandbox_agents", "Agents known to the replicated state.", nil, nil),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.sessions
	ch <- c.executions
	ch <- c.agents
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	sessions := map[sandbox.SessionState]int{}
	type key struct {
		state sandbox.ExecutionState
		lang  string
	}
	executions := map[key]int{}
	for _, s := range c.fsm.Sessions(nil) {
		sessions[sandbox.SessionState(s.GetState())]++
		for _, e := range c.fsm.ExecutionsBySession(s.GetId()) {
			executions[key{sandbox.ExecutionState(e.GetState()), e.GetLanguage()}]++
		}
	}
	for st := sandbox.SessionPending; st <= sandbox.SessionLost; st++ {
		ch <- prometheus.MustNewConstMetric(c.sessions, prometheus.GaugeValue, float64(sessions[st]), st.String())
	}
	for k, n := range executions {
		ch <- prometheus.MustNewConstMetric(c.executions, prometheus.GaugeValue, float64(n), k.state.String(), k.lang)
	}
	ch <- prometheus.MustNewConstMetric(c.agents, prometheus.GaugeValue, float64(len(c.fsm.Agents())))
}

var _ = sandboxv1.SessionState_SESSION_STATE_RUNNING

package agent

import (
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	startSeconds prometheus.Histogram
	sessions     prometheus.Gauge
	callbacks    *prometheus.CounterVec
	fenced       prometheus.Counter
	fenceTerm    prometheus.Gauge
	recovered    *prometheus.CounterVec

	warmStarts        *prometheus.CounterVec
	warmClaims        *prometheus.CounterVec
	warmRefillSeconds *prometheus.HistogramVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		startSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "sandbox_agent_container_start_seconds",
			Help:    "Time from asking the runtime to start a session's container until its executor answers /health.",
			Buckets: []float64{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30},
		}),
		sessions: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "sandbox_agent_sessions",
			Help: "Sessions this agent holds a container for (starting, running or stopping).",
		}),
		callbacks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sandbox_agent_callbacks_total",
			Help: "Executor callbacks received, by kind (status, heartbeat, artifact, result, unknown) and HTTP status code.",
		}, []string{"kind", "code"}),
		fenced: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sandbox_agent_fenced_commands_total",
			Help: "Commands refused because they came from a lower Raft term than the agent has seen (a deposed leader).",
		}),
		fenceTerm: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "sandbox_agent_fence_term",
			Help: "Highest Raft term the agent has seen on a server's command.",
		}),
		recovered: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sandbox_agent_startup_decisions_total",
			Help: "What the agent did at start-up with what a previous run left, by decision (adopted, destroyed, dropped).",
		}, []string{"decision"}),
		warmStarts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sandbox_agent_warm_starts_total",
			Help: "Warm containers started for the pools, by template and result (ok, error).",
		}, []string{"template", "result"}),
		warmClaims: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sandbox_agent_warm_claims_total",
			Help: "Session starts by template and result: hit (a warm container was claimed) or miss (a container was created).",
		}, []string{"template", "result"}),
		warmRefillSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "sandbox_agent_warm_refill_seconds",
			Help:    "Time to start one warm container until its executor answers /health, by template.",
			Buckets: []float64{0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30},
		}, []string{"template"}),
	}
	for _, c := range []prometheus.Collector{m.startSeconds, m.sessions, m.callbacks, m.fenced, m.fenceTerm, m.recovered, m.warmStarts, m.warmClaims, m.warmRefillSeconds} {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if errors.As(err, &are) {
				return nil, fmt.Errorf("agent metrics: %w (use a fresh registry per agent)", err)
			}
			return nil, fmt.Errorf("agent metrics: %w", err)
		}
	}
	return m, nil
}

// warmReadyDesc is sandbox_agent_warm_ready: ready containers per template.
var warmReadyDesc = prometheus.NewDesc("sandbox_agent_warm_ready",
	"Ready warm containers in this agent's pool, by template.", []string{"template"}, nil)

// warmReadyCollector reads the pools at scrape time.
type warmReadyCollector struct{ p *pools }

func (c warmReadyCollector) Describe(ch chan<- *prometheus.Desc) { ch <- warmReadyDesc }

func (c warmReadyCollector) Collect(ch chan<- prometheus.Metric) {
	c.p.mu.Lock()
	counts := make(map[string]int, len(c.p.targets)+len(c.p.ready))
	for t := range c.p.targets {
		counts[t] = 0
	}
	for t, ws := range c.p.ready {
		counts[t] = len(ws)
	}
	c.p.mu.Unlock()
	for t, n := range counts {
		ch <- prometheus.MustNewConstMetric(warmReadyDesc, prometheus.GaugeValue, float64(n), t)
	}
}

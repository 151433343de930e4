package main

import (
	"fmt"
	"math"
	"slices"
	"time"
)

// Result is one measured row: a latency summary in milliseconds and, for
// throughput scenarios, the rate achieved.
type Result struct {
	Scenario string  `json:"scenario"`
	Count    int     `json:"count"`
	P50      float64 `json:"p50_ms"`
	P90      float64 `json:"p90_ms"`
	P99      float64 `json:"p99_ms"`
	Max      float64 `json:"max_ms"`
	// PerSecond is set by throughput scenarios (sustained, the floor loop).
	PerSecond float64 `json:"per_second,omitempty"`
	// Note says how the row was measured where the name does not.
	Note string `json:"note,omitempty"`
}

// summarize sorts d and returns its count, nearest-rank percentiles and max.
func summarize(name string, d []time.Duration) Result {
	slices.Sort(d)
	q := func(p float64) float64 {
		if len(d) == 0 {
			return 0
		}
		i := int(p*float64(len(d))+0.5) - 1
		i = max(0, min(i, len(d)-1))
		return float64(d[i].Microseconds()) / 1000
	}
	return Result{Scenario: name, Count: len(d), P50: q(.50), P90: q(.90), P99: q(.99), Max: q(1)}
}

// median is the median of v (the mean of the middle two for an even
// count), 0 for none. v is not modified.
func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(v))
	m := len(s) / 2
	if len(s)%2 == 1 {
		return s[m]
	}
	return (s[m-1] + s[m]) / 2
}

// stat names one number of a Result.
type stat string

const (
	statP50  stat = "p50"
	statP99  stat = "p99"
	statRate stat = "rate"
)

// value reads the stat s of r; ok is false when r does not carry it.
func (s stat) value(r Result) (float64, bool) {
	switch s {
	case statP50:
		return r.P50, r.Count > 0
	case statP99:
		return r.P99, r.Count > 0
	case statRate:
		return r.PerSecond, r.PerSecond > 0
	}
	return 0, false
}

// unit is how the stat is printed.
func (s stat) unit() string {
	if s == statRate {
		return "/s"
	}
	return "ms"
}

// comparison puts one measured number beside another of the same kind.
type comparison struct {
	a, b string // scenarios (rows)
	s    stat
}

// comparisons are the side-by-side numbers every report carries when both
// rows were measured: the platform against the floors under it, and against
// the tools a user would otherwise pick.
var comparisons = []comparison{
	{"execute-python", "floor-bwrap-python", statP50},
	{"execute-python", "floor-python", statP50},
	{"execute-bash", "floor-bwrap-bash", statP50},
	{"execute-node", "floor-bwrap-node", statP50},
	{"sustained", "floor-bwrap-python-loop", statRate},
	{"create-warm", "create-cold", statP50},
	{"create-cold", "baseline-runc", statP50},
	{"cycle", "baseline-runc", statP50},
	{"cycle", "baseline-ctr", statP50},
	{"cycle", "baseline-docker", statP50},
	{"floor-bwrap-python", "floor-python", statP50},
	{"baseline-runc", "floor-python", statP50},
	{"baseline-ctr", "baseline-runc", statP50},
	{"baseline-docker", "baseline-runc", statP50},
}

// Ratio is one comparison as reported: A and B in Unit, A/B and A-B.
type Ratio struct {
	Name  string  `json:"name"`
	A     float64 `json:"a"`
	B     float64 `json:"b"`
	Unit  string  `json:"unit"`
	Ratio float64 `json:"ratio"`
	Diff  float64 `json:"diff"`
}

// ratios evaluates the comparisons whose two rows are both in results.
func ratios(results []Result) []Ratio {
	var out []Ratio
	for _, c := range comparisons {
		a, okA := lookupStat(results, c.a, c.s)
		b, okB := lookupStat(results, c.b, c.s)
		if !okA || !okB || b == 0 {
			continue
		}
		out = append(out, Ratio{
			Name: fmt.Sprintf("%s %s / %s %s", c.a, c.s, c.b, c.s),
			A:    a, B: b, Unit: c.s.unit(), Ratio: a / b, Diff: a - b,
		})
	}
	return out
}

// lookupStat finds the row named scenario and reads s from it.
func lookupStat(results []Result, scenario string, s stat) (float64, bool) {
	for _, r := range results {
		if r.Scenario == scenario {
			return s.value(r)
		}
	}
	return 0, false
}

// Target is one of issue 4's "Done when" bounds, checked against a report.
type Target struct {
	Name     string  `json:"name"`
	Measured float64 `json:"measured"`
	Bound    float64 `json:"bound"`
	Unit     string  `json:"unit"`
	// Status is "met", "missed" or "not measured".
	Status string `json:"status"`
}

// target is a bound on one number: measured <= bound (or >= for a floor
// share). bound may depend on another row, such as a floor of the same run.
type target struct {
	name    string
	measure func(*Report) (float64, bool)
	bound   func(*Report) (float64, bool)
	unit    string
	atLeast bool
}

func fixed(v float64) func(*Report) (float64, bool) {
	return func(*Report) (float64, bool) { return v, true }
}

func row(scenario string, s stat) func(*Report) (float64, bool) {
	return func(r *Report) (float64, bool) { return lookupStat(r.Results, scenario, s) }
}

// targets are issue 4's acceptance bounds, in its words.
var targets = []target{
	{name: "warm CreateSession p50", measure: row("create-warm", statP50), bound: fixed(5), unit: "ms"},
	{name: "warm CreateSession p99", measure: row("create-warm", statP99), bound: fixed(25), unit: "ms"},
	{name: "cold CreateSession p50", measure: row("create-cold", statP50), bound: fixed(100), unit: "ms"},
	{name: "cold CreateSession p99", measure: row("create-cold", statP99), bound: fixed(250), unit: "ms"},
	{name: "Execute python print(1) p50", measure: row("execute-python", statP50), bound: fixed(20), unit: "ms"},
	{name: "Execute python print(1) p99", measure: row("execute-python", statP99), bound: fixed(40), unit: "ms"},
	{
		name: "Execute bash p50 <= bare bwrap+bash p50 + 3 ms", measure: row("execute-bash", statP50), unit: "ms",
		bound: func(r *Report) (float64, bool) {
			f, ok := lookupStat(r.Results, "floor-bwrap-bash", statP50)
			return f + 3, ok
		},
	},
	{
		name: "sustained python executions/s >= 70% of the bare bwrap+python loop", measure: row("sustained", statRate), unit: "/s", atLeast: true,
		bound: func(r *Report) (float64, bool) {
			f, ok := lookupStat(r.Results, "floor-bwrap-python-loop", statRate)
			return 0.7 * f, ok
		},
	},
	{name: "burst of 200 against a pool of 200 p99", measure: row("burst", statP99), bound: fixed(100), unit: "ms"},
	{
		name: "idle warm container, host memory (MemAvailable drop)", bound: fixed(12), unit: "MiB",
		measure: func(r *Report) (float64, bool) {
			if r.Memory == nil || r.Memory.Containers == 0 {
				return 0, false
			}
			return r.Memory.MemAvailableMiB, true
		},
	},
}

// checkTargets evaluates every target against r.
func checkTargets(r *Report) []Target {
	out := make([]Target, 0, len(targets))
	for _, t := range targets {
		got := Target{Name: t.name, Unit: t.unit, Status: "not measured"}
		m, okM := t.measure(r)
		b, okB := t.bound(r)
		if okM && okB {
			got.Measured, got.Bound = round2(m), round2(b)
			met := m <= b
			if t.atLeast {
				met = m >= b
			}
			got.Status = map[bool]string{true: "met", false: "missed"}[met]
		}
		out = append(out, got)
	}
	return out
}

func round2(v float64) float64 { return math.Round(v*100) / 100 }

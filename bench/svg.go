package main

import (
	"fmt"
	"html"
	"math"
	"strings"
)

// Chart geometry, in SVG user units.
const (
	svgWidth     = 960
	svgLeft      = 200 // room for the scenario names
	svgRight     = 70  // room for the last bar's value
	svgTop       = 56  // title and legend
	svgBottom    = 44  // axis labels
	svgBar       = 7   // one bar's height
	svgGroupGap  = 10  // between two scenarios
	svgTickLabel = 11  // font size
)

// svgSeries are the bars drawn per scenario, in order, with their colours.
var svgSeries = []struct {
	name  string
	color string
	value func(Result) float64
}{
	{"p50", "#2b6cb0", func(r Result) float64 { return r.P50 }},
	{"p90", "#d69e2e", func(r Result) float64 { return r.P90 }},
	{"p99", "#c53030", func(r Result) float64 { return r.P99 }},
}

// logAxis maps milliseconds onto [x0, x1] on a base-10 log scale spanning
// whole decades from lo to hi.
type logAxis struct {
	lo, hi float64 // decade exponents
	x0, x1 float64
}

// newLogAxis spans the decades that hold every value in vals (positive ones).
func newLogAxis(vals []float64, x0, x1 float64) logAxis {
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, v := range vals {
		if v > 0 {
			lo, hi = math.Min(lo, v), math.Max(hi, v)
		}
	}
	if math.IsInf(lo, 1) {
		lo, hi = 1, 10
	}
	a := logAxis{lo: math.Floor(math.Log10(lo)), hi: math.Ceil(math.Log10(hi)), x0: x0, x1: x1}
	if a.hi <= a.lo {
		a.hi = a.lo + 1
	}
	return a
}

// x is the position of v; values at or below the axis start sit on it.
func (a logAxis) x(v float64) float64 {
	if v <= 0 {
		return a.x0
	}
	f := (math.Log10(v) - a.lo) / (a.hi - a.lo)
	return a.x0 + math.Max(0, f)*(a.x1-a.x0)
}

// ticks are the gridline values: 1, 2 and 5 of every decade, and the last decade.
func (a logAxis) ticks() []float64 {
	var t []float64
	for e := a.lo; e < a.hi; e++ {
		for _, m := range []float64{1, 2, 5} {
			t = append(t, m*math.Pow(10, e))
		}
	}
	return append(t, math.Pow(10, a.hi))
}

// formatMS prints a tick value without needless decimals.
func formatMS(v float64) string {
	switch {
	case v >= 1:
		return fmt.Sprintf("%g", math.Round(v))
	default:
		return fmt.Sprintf("%g", v)
	}
}

// latencySVG draws p50, p90 and p99 of each latency row as horizontal bars
// on a log scale. Rows without samples are left out.
func latencySVG(title string, results []Result) string {
	var rows []Result
	var vals []float64
	for _, r := range results {
		if r.Count == 0 {
			continue
		}
		rows = append(rows, r)
		for _, s := range svgSeries {
			vals = append(vals, s.value(r))
		}
	}
	groupH := float64(len(svgSeries)*svgBar + svgGroupGap)
	plotH := math.Max(groupH, float64(len(rows))*groupH)
	height := svgTop + plotH + svgBottom
	ax := newLogAxis(vals, svgLeft, svgWidth-svgRight)

	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%.0f" viewBox="0 0 %d %.0f" font-family="sans-serif" font-size="%d">`+"\n",
		svgWidth, height, svgWidth, height, svgTickLabel)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="#ffffff"/>`+"\n")
	fmt.Fprintf(&b, `<text x="%d" y="20" font-size="15" font-weight="bold">%s</text>`+"\n", 10, html.EscapeString(title))
	// Legend.
	lx := float64(svgLeft)
	for _, s := range svgSeries {
		fmt.Fprintf(&b, `<rect x="%.0f" y="30" width="12" height="12" fill="%s"/><text x="%.0f" y="40">%s</text>`+"\n", lx, s.color, lx+16, s.name)
		lx += 60
	}
	fmt.Fprintf(&b, `<text x="%.0f" y="40" fill="#555">milliseconds, log scale</text>`+"\n", lx+10)
	// Grid and axis labels.
	for _, t := range ax.ticks() {
		x := ax.x(t)
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%.0f" stroke="#ddd"/>`+"\n", x, svgTop, x, svgTop+plotH)
		fmt.Fprintf(&b, `<text x="%.1f" y="%.0f" text-anchor="middle" fill="#555">%s</text>`+"\n", x, svgTop+plotH+16, formatMS(t))
	}
	fmt.Fprintf(&b, `<text x="%.0f" y="%.0f" text-anchor="middle" fill="#555">ms</text>`+"\n", (ax.x0+ax.x1)/2, svgTop+plotH+34)
	// Bars.
	for i, r := range rows {
		y0 := svgTop + float64(i)*groupH + svgGroupGap/2
		label := r.Scenario
		if r.PerSecond > 0 {
			label += fmt.Sprintf(" (%.0f/s)", r.PerSecond)
		}
		fmt.Fprintf(&b, `<text x="%d" y="%.1f" text-anchor="end">%s</text>`+"\n", svgLeft-8, y0+float64(len(svgSeries)*svgBar)/2+4, html.EscapeString(label))
		for j, s := range svgSeries {
			v := s.value(r)
			y := y0 + float64(j*svgBar)
			w := math.Max(1, ax.x(v)-ax.x0)
			fmt.Fprintf(&b, `<rect x="%d" y="%.1f" width="%.1f" height="%d" fill="%s"><title>%s %s %.2f ms</title></rect>`+"\n",
				svgLeft, y, w, svgBar-1, s.color, html.EscapeString(r.Scenario), s.name, v)
			if j == len(svgSeries)-1 {
				fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" fill="#333" font-size="9">%.1f</text>`+"\n", svgLeft+w+4, y+svgBar-1, v)
			}
		}
	}
	fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%.0f" stroke="#333"/>`+"\n", svgLeft, svgTop, svgLeft, svgTop+plotH)
	b.WriteString("</svg>\n")
	return b.String()
}

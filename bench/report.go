package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"time"
)

// Report is everything one run measured, as written with -json.
type Report struct {
	// Commit is the git commit of the tree measured; Dirty says whether
	// that tree had uncommitted changes.
	Commit  string    `json:"commit"`
	Dirty   bool      `json:"dirty"`
	Date    string    `json:"date"`
	Machine Machine   `json:"machine"`
	Config  RunConfig `json:"config"`
	Results []Result  `json:"results"`
	Ratios  []Ratio   `json:"ratios,omitempty"`
	// Memory is the warm-memory scenario's result.
	Memory  *MemoryResult `json:"memory,omitempty"`
	Targets []Target      `json:"targets,omitempty"`
	// Notes are skipped scenarios (Docker absent) and failures.
	Notes []string `json:"notes,omitempty"`
}

// Machine describes the host the run measured.
type Machine struct {
	CPUs        int    `json:"cpus"`
	CPUModel    string `json:"cpu_model,omitempty"`
	Kernel      string `json:"kernel"`
	MemTotalMiB int64  `json:"mem_total_mib,omitempty"`
	OS          string `json:"os,omitempty"`
	Hostname    string `json:"hostname,omitempty"`
}

// RunConfig is the part of the command line that shapes the numbers.
type RunConfig struct {
	// Requested is the -scenario flag; Scenarios what it expanded to.
	Requested string   `json:"requested"`
	Scenarios []string `json:"scenarios"`
	Addr      string   `json:"addr,omitempty"`
	// Leader is set when the calls went to the leader found through Addr.
	Leader   string `json:"leader,omitempty"`
	N        int    `json:"n"`
	Warmup   int    `json:"warmup"`
	Clients  int    `json:"clients"`
	Duration string `json:"duration"`
	Template string `json:"template"`
	WarmPool int    `json:"warm_pool"`
	Burst    int    `json:"burst"`
	MemGrow  int    `json:"memory_containers"`
}

// machineInfo reads the host's description from /proc and /etc.
func machineInfo() Machine {
	m := Machine{CPUs: runtime.NumCPU()}
	m.Kernel = readTrim("/proc/sys/kernel/osrelease")
	m.Hostname, _ = os.Hostname()
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.Lines(string(b)) {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		if mi, err := parseMeminfo(string(b)); err == nil {
			m.MemTotalMiB = mi["MemTotal"] >> 20
		}
	}
	if b, err := os.ReadFile("/etc/os-release"); err == nil {
		for line := range strings.Lines(string(b)) {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), "PRETTY_NAME="); ok {
				m.OS = strings.Trim(v, `"`)
			}
		}
	}
	return m
}

func readTrim(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// gitCommit is the commit of the working tree, or "unknown".
func gitCommit() string {
	b, err := exec.Command("git", "rev-parse", "HEAD").Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(b))
}

// gitDirty reports whether tracked files differ from the commit.
func gitDirty() bool {
	b, err := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output()
	return err == nil && len(strings.TrimSpace(string(b))) > 0
}

// newReport starts a report of the tree and machine at hand.
func newReport(cfg RunConfig) *Report {
	return &Report{
		Commit: gitCommit(), Dirty: gitDirty(),
		Date:    time.Now().UTC().Format(time.RFC3339),
		Machine: machineInfo(), Config: cfg,
	}
}

// finish derives the ratios and the target checks from the results.
func (r *Report) finish() {
	r.Ratios = ratios(r.Results)
	r.Targets = checkTargets(r)
}

// writeText prints the report for a terminal.
func (r *Report) writeText(w io.Writer) {
	fmt.Fprintf(w, "%-26s %6s %9s %9s %9s %9s %9s\n", "scenario", "count", "p50 ms", "p90 ms", "p99 ms", "max ms", "rate/s")
	for _, x := range r.Results {
		rate := ""
		if x.PerSecond > 0 {
			rate = fmt.Sprintf("%.1f", x.PerSecond)
		}
		note := ""
		if x.Note != "" {
			note = "  (" + x.Note + ")"
		}
		fmt.Fprintf(w, "%-26s %6d %9.2f %9.2f %9.2f %9.2f %9s%s\n", x.Scenario, x.Count, x.P50, x.P90, x.P99, x.Max, rate, note)
	}
	if m := r.Memory; m != nil {
		fmt.Fprintf(w, "\nwarm-memory: %d containers added; per container: %.2f MiB MemAvailable drop, %.2f MiB PSS (%.2f MiB of it shims), %.2f MiB cgroup usage (%.2f MiB anon)\n",
			m.Containers, m.MemAvailableMiB, m.PSSMiB, m.ShimPSSMiB, m.CgroupMiB, m.CgroupAnonMiB)
	}
	if len(r.Ratios) > 0 {
		fmt.Fprintln(w)
		for _, x := range r.Ratios {
			fmt.Fprintf(w, "%-56s %8.2f / %8.2f %-2s = %6.2fx (%+.2f)\n", x.Name, x.A, x.B, x.Unit, x.Ratio, x.Diff)
		}
	}
	if len(r.Targets) > 0 {
		fmt.Fprintln(w)
		for _, t := range r.Targets {
			if t.Status == "not measured" {
				continue
			}
			cmp := "<="
			if strings.Contains(t.Name, ">=") {
				cmp = ">="
			}
			fmt.Fprintf(w, "%-6s %-66s %8.2f %s %.2f %s\n", t.Status, t.Name, t.Measured, cmp, t.Bound, t.Unit)
		}
	}
	for _, n := range r.Notes {
		fmt.Fprintln(w, "note:", n)
	}
}

// markdown renders the report as a Markdown document.
func (r *Report) markdown() string {
	var b strings.Builder
	day, _, _ := strings.Cut(r.Date, "T")
	fmt.Fprintf(&b, "# Benchmark, %s\n\n", day)
	commit := r.Commit
	if len(commit) > 12 {
		commit = commit[:12]
	}
	if r.Dirty {
		commit += " (with uncommitted changes)"
	}
	m := r.Machine
	fmt.Fprintf(&b, "Commit %s; %d CPUs (%s), %d MiB, kernel %s, %s. `go run ./bench -scenario %s -n %d` (%d clients, %s).\n\n",
		commit, m.CPUs, orDash(m.CPUModel), m.MemTotalMiB, m.Kernel, orDash(m.OS),
		orDash(r.Config.Requested), r.Config.N, r.Config.Clients, r.Config.Duration)
	if r.Config.Leader != "" {
		fmt.Fprintf(&b, "Calls went to the leader at %s, found through %s (`-direct` sends them to the address given, and a follower forwards them).\n\n", r.Config.Leader, r.Config.Addr)
	}

	b.WriteString("| scenario | count | p50 ms | p90 ms | p99 ms | max ms | rate /s | note |\n|---|---|---|---|---|---|---|---|\n")
	for _, x := range r.Results {
		rate := ""
		if x.PerSecond > 0 {
			rate = fmt.Sprintf("%.1f", x.PerSecond)
		}
		fmt.Fprintf(&b, "| %s | %d | %.2f | %.2f | %.2f | %.2f | %s | %s |\n", x.Scenario, x.Count, x.P50, x.P90, x.P99, x.Max, rate, mdEscape(x.Note))
	}
	if mem := r.Memory; mem != nil {
		b.WriteString("\n## Host memory per idle warm container\n\n")
		fmt.Fprintf(&b, "%d warm containers added (pool %d -> %d).\n\n", mem.Containers, mem.PoolBefore, mem.PoolAfter)
		b.WriteString("| measure | MiB per container |\n|---|---|\n")
		fmt.Fprintf(&b, "| MemAvailable drop (median of %d samples before and after) | %.2f |\n", mem.Samples, mem.MemAvailableMiB)
		fmt.Fprintf(&b, "| summed PSS: container processes + containerd shims | %.2f |\n", mem.PSSMiB)
		fmt.Fprintf(&b, "| of which shims | %.2f |\n", mem.ShimPSSMiB)
		fmt.Fprintf(&b, "| cgroup memory usage | %.2f |\n", mem.CgroupMiB)
		fmt.Fprintf(&b, "| of which anonymous | %.2f |\n", mem.CgroupAnonMiB)
	}
	if len(r.Ratios) > 0 {
		b.WriteString("\n## Side by side\n\n| comparison | A | B | A/B | A-B |\n|---|---|---|---|---|\n")
		for _, x := range r.Ratios {
			fmt.Fprintf(&b, "| %s | %.2f %s | %.2f %s | %.2f | %+.2f %s |\n", x.Name, x.A, x.Unit, x.B, x.Unit, x.Ratio, x.Diff, x.Unit)
		}
	}
	var measured []Target
	for _, t := range r.Targets {
		if t.Status != "not measured" {
			measured = append(measured, t)
		}
	}
	if len(measured) > 0 {
		b.WriteString("\n## Targets (issue 4)\n\n| target | measured | bound | status |\n|---|---|---|---|\n")
		for _, t := range measured {
			fmt.Fprintf(&b, "| %s | %.2f %s | %.2f %s | %s |\n", mdEscape(t.Name), t.Measured, t.Unit, t.Bound, t.Unit, t.Status)
		}
	}
	if len(r.Notes) > 0 {
		b.WriteString("\n## Notes\n\n")
		for _, n := range r.Notes {
			fmt.Fprintf(&b, "- %s\n", n)
		}
	}
	return b.String()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// mdEscape keeps a cell's text from breaking the table.
func mdEscape(s string) string {
	return strings.NewReplacer("|", `\|`, "\n", " ").Replace(s)
}

// writeJSON writes the report as indented JSON.
func (r *Report) writeJSON(path string) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return fmt.Errorf("encode report: %w", err)
	}
	return writeFile(path, append(b, '\n'))
}

// writeFile writes b to path, making its directory.
func writeFile(path string, b []byte) error {
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

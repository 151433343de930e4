package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
)

// Output formats of -o.
const (
	formatTable = "table"
	formatJSON  = "json"
)

// outputFlag registers -o for the output format on fs.
func outputFlag(fs *flag.FlagSet) *string {
	format := formatTable
	fs.Func("o", "output `FORMAT`: table (default) or json", func(s string) error {
		switch s {
		case formatTable, "text", "":
			format = formatTable
		case formatJSON:
			format = formatJSON
		default:
			return fmt.Errorf("unknown output format %q (want table or json)", s)
		}
		return nil
	})
	return &format
}

// printError prints err as one line: "sandboxctl: <connect code>: <message>"
// for API errors (with any context the CLI added before the message), and
// "sandboxctl: <message>" for local ones.
func (a *app) printError(err error) {
	fmt.Fprintf(a.stderr, "sandboxctl: %s\n", errorLine(err))
}

func errorLine(err error) string {
	var ce *connect.Error
	if !errors.As(err, &ce) {
		return oneLine(err.Error())
	}
	// Keep the context wrapped around the connect error ("session s-1: ")
	// but move the code to the front.
	context := strings.TrimSuffix(err.Error(), ce.Error())
	return oneLine(fmt.Sprintf("%s: %s%s", ce.Code(), context, ce.Message()))
}

// oneLine folds a multi-line message onto one line.
func oneLine(s string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", " ")), " ")
}

// jsonOptions emit unpopulated fields, so that scripts see "exitCode": 0
// rather than no exitCode at all.
var jsonOptions = protojson.MarshalOptions{EmitUnpopulated: true}

// printJSON prints m as one protojson document. protojson varies its
// whitespace on purpose; encoding/json re-indents it so that the output is
// stable.
func (a *app) printJSON(m proto.Message) error {
	b, err := jsonOptions.Marshal(m)
	if err != nil {
		return fmt.Errorf("encode %s as JSON: %w", m.ProtoReflect().Descriptor().Name(), err)
	}
	return a.writeJSON(b)
}

// writeJSON prints a JSON document indented, on its own lines.
func (a *app) writeJSON(b []byte) error {
	var buf bytes.Buffer
	if err := json.Indent(&buf, b, "", "  "); err != nil {
		return fmt.Errorf("indent JSON: %w", err)
	}
	buf.WriteByte('\n')
	_, err := a.stdout.Write(buf.Bytes())
	return err
}

// table writes aligned columns to w; call flush when done.
type table struct{ tw *tabwriter.Writer }

func newTable(w io.Writer, headers ...string) *table {
	t := &table{tw: tabwriter.NewWriter(w, 0, 0, 3, ' ', 0)}
	t.row(headers...)
	return t
}

func (t *table) row(cols ...string) {
	for i, c := range cols {
		if c == "" {
			cols[i] = "-"
		}
	}
	fmt.Fprintln(t.tw, strings.Join(cols, "\t"))
}

func (t *table) flush() error { return t.tw.Flush() }

// details prints "Key: value" lines aligned, for one object.
type details struct{ tw *tabwriter.Writer }

func newDetails(w io.Writer) *details {
	return &details{tw: tabwriter.NewWriter(w, 0, 0, 1, ' ', 0)}
}

func (d *details) field(name, value string) {
	if value == "" {
		value = "-"
	}
	fmt.Fprintf(d.tw, "%s:\t%s\n", name, value)
}

func (d *details) flush() error { return d.tw.Flush() }

// sessionStateName is a session state without its enum prefix, lower-case.
func sessionStateName(s sandboxv1.SessionState) string {
	return strings.ToLower(strings.TrimPrefix(s.String(), "SESSION_STATE_"))
}

// executionStateName is an execution state without its enum prefix, lower-case.
func executionStateName(s sandboxv1.ExecutionState) string {
	return strings.ToLower(strings.TrimPrefix(s.String(), "EXECUTION_STATE_"))
}

// parseSessionState accepts "running", "RUNNING" or "SESSION_STATE_RUNNING".
func parseSessionState(s string) (sandboxv1.SessionState, error) {
	name := strings.ToUpper(strings.TrimSpace(s))
	if !strings.HasPrefix(name, "SESSION_STATE_") {
		name = "SESSION_STATE_" + name
	}
	v, ok := sandboxv1.SessionState_value[name]
	if !ok || v == 0 {
		return 0, fmt.Errorf("unknown session state %q", s)
	}
	return sandboxv1.SessionState(v), nil
}

// age is how long ago ts was, in the largest whole unit: 45s, 12m, 3h, 2d.
func age(now time.Time, ts *timestamppb.Timestamp) string {
	if ts == nil || (ts.Seconds == 0 && ts.Nanos == 0) {
		return ""
	}
	d := now.Sub(ts.AsTime())
	switch {
	case d < 0:
		return "0s"
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d/time.Second))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d/time.Minute))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d/time.Hour))
	default:
		return fmt.Sprintf("%dd", int(d/(24*time.Hour)))
	}
}

// timestamp formats ts in RFC 3339, local time, with its age.
func timestamp(now time.Time, ts *timestamppb.Timestamp) string {
	if ts == nil || (ts.Seconds == 0 && ts.Nanos == 0) {
		return ""
	}
	return fmt.Sprintf("%s (%s ago)", ts.AsTime().Local().Format(time.RFC3339), age(now, ts))
}

// formatMap formats a map as k=v pairs sorted by key.
func formatMap(m map[string]string) string {
	keys := slices.Sorted(maps.Keys(m))
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, k+"="+m[k])
	}
	return strings.Join(parts, ",")
}

// formatLimits formats resource limits on one line.
func formatLimits(l *sandboxv1.ResourceLimits) string {
	if l == nil {
		return ""
	}
	return fmt.Sprintf("cpu=%dm memory=%dMiB pids=%d disk=%dMiB max-timeout=%ds",
		l.GetCpuMillis(), l.GetMemoryMib(), l.GetPids(), l.GetDiskMib(), l.GetMaxExecutionTimeoutSeconds())
}

// formatDuration formats milliseconds for people.
func formatDuration(ms int64) string {
	if ms <= 0 {
		return ""
	}
	d := time.Duration(ms) * time.Millisecond
	if d < time.Second {
		return d.String()
	}
	return d.Round(10 * time.Millisecond).String()
}

// formatBytes formats a size for people: 512B, 1.5KiB, 3.2MiB.
func formatBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%dB", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f%ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// kvFlag is a repeatable K=V flag collected into a map.
type kvFlag map[string]string

func (f kvFlag) String() string { return formatMap(f) }

func (f kvFlag) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("want KEY=VALUE, got %q", s)
	}
	f[k] = v
	return nil
}

// listFlag is a repeatable flag whose values may also be comma-separated.
type listFlag []string

func (f *listFlag) String() string { return strings.Join(*f, ",") }

func (f *listFlag) Set(s string) error {
	for _, v := range strings.Split(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			*f = append(*f, v)
		}
	}
	return nil
}

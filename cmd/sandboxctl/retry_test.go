package main

import (
	"context"
	"errors"
	"maps"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	"github.com/sandboxhq/sandbox/api/gen/sandbox/v1/sandboxv1connect"
)

var hexKey = regexp.MustCompile(`^[0-9a-f]{32}$`)

func TestIdempotencyKeys(t *testing.T) {
	f := newFakeAPI()
	addr := f.serve(t)
	for range 2 {
		if r := runCLI(t, addr, invocation{}, "sessions", "create", "--template", "python-basic"); r.code != 0 {
			t.Fatalf("sessions create: code %d, stderr %q", r.code, r.stderr)
		}
		if r := runCLI(t, addr, invocation{}, "exec", "-c", "x"); r.code != 0 {
			t.Fatalf("exec: code %d, stderr %q", r.code, r.stderr)
		}
	}
	f.mu.Lock()
	var keys []string
	for _, c := range f.created {
		keys = append(keys, c.GetIdempotencyKey())
	}
	for _, e := range f.executed {
		keys = append(keys, e.GetIdempotencyKey())
	}
	f.mu.Unlock()
	if len(keys) != 6 {
		t.Fatalf("%d keyed calls, want 4 CreateSession and 2 Execute", len(keys))
	}
	for _, k := range keys {
		if !hexKey.MatchString(k) {
			t.Errorf("idempotency key %q is not 128 bits in hex", k)
		}
	}
	if len(slices.Compact(slices.Sorted(slices.Values(keys)))) != len(keys) {
		t.Errorf("idempotency keys %v repeat across calls", keys)
	}

	tests := []struct {
		name        string
		args        []string
		wantCode    int
		wantSession string
		wantExecute string
	}{
		{name: "sessions create", args: []string{"sessions", "create", "--template", "python-basic", "--idempotency-key", "job-7"}, wantSession: "job-7"},
		{name: "exec", args: []string{"exec", "--idempotency-key", "job-8", "-c", "x"}, wantSession: "job-8-session", wantExecute: "job-8"},
		{name: "exec in a session", args: []string{"exec", "--session", "s-1", "--idempotency-key", "job-9", "-c", "x"}, wantExecute: "job-9"},
		{name: "empty key", args: []string{"sessions", "create", "--template", "python-basic", "--idempotency-key", ""}, wantCode: exitUsage},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeAPI()
			addr := f.serve(t)
			f.addSession("python-basic", nil)
			r := runCLI(t, addr, invocation{}, tt.args...)
			if r.code != tt.wantCode {
				t.Fatalf("exit code = %d, want %d (stderr %q)", r.code, tt.wantCode, r.stderr)
			}
			f.mu.Lock()
			defer f.mu.Unlock()
			if tt.wantSession != "" && (len(f.created) != 1 || f.created[0].GetIdempotencyKey() != tt.wantSession) {
				t.Errorf("CreateSession requests %v, want one with key %q", f.created, tt.wantSession)
			}
			if tt.wantExecute != "" && (len(f.executed) != 1 || f.executed[0].GetIdempotencyKey() != tt.wantExecute) {
				t.Errorf("Execute requests %v, want one with key %q", f.executed, tt.wantExecute)
			}
		})
	}
}

// TestRetries makes CreateSession and Execute meet faults: unavailable
// before or after the server did the work, a broken stream, and final
// errors. A retryable fault is retried with the same idempotency key, and
// the fake, like the server, then does the work once; others are not.
func TestRetries(t *testing.T) {
	const (
		create  = sandboxv1connect.SessionServiceCreateSessionProcedure
		execute = sandboxv1connect.ExecutionServiceExecuteProcedure
	)
	unavailable := fault{code: connect.CodeUnavailable}
	lostAnswer := fault{code: connect.CodeUnavailable, after: true}
	brokenStream := fault{abort: true, after: true}
	tests := []struct {
		name   string
		args   []string
		faults map[string][]fault
		// wantCalls is the number of calls to each procedure.
		wantCalls  map[string]int
		wantCode   int
		wantStdout string
		wantStderr string
		// Records the fake holds afterwards.
		wantSessions, wantExecutions int
	}{
		{
			name: "create: unavailable twice", args: []string{"sessions", "create", "--template", "python-basic"},
			faults:    map[string][]fault{create: {unavailable, unavailable}},
			wantCalls: map[string]int{create: 3}, wantStdout: "s-1\n", wantStderr: "retrying create session", wantSessions: 1,
		},
		{
			name: "create: answer lost", args: []string{"sessions", "create", "--template", "python-basic"},
			faults:    map[string][]fault{create: {lostAnswer}},
			wantCalls: map[string]int{create: 2}, wantStdout: "s-1\n", wantSessions: 1,
		},
		{
			name: "create: broken stream", args: []string{"sessions", "create", "--template", "python-basic"},
			faults:    map[string][]fault{create: {brokenStream}},
			wantCalls: map[string]int{create: 2}, wantStdout: "s-1\n", wantStderr: "INTERNAL_ERROR; received from peer; retrying create session in ", wantSessions: 1,
		},
		{
			name: "create: invalid argument is final", args: []string{"sessions", "create", "--template", "python-basic"},
			faults:    map[string][]fault{create: {{code: connect.CodeInvalidArgument}}},
			wantCalls: map[string]int{create: 1}, wantCode: exitError, wantStderr: "sandboxctl: invalid_argument: injected invalid_argument\n",
		},
		{
			name: "create: a server's internal error is final", args: []string{"sessions", "create", "--template", "python-basic"},
			faults:    map[string][]fault{create: {{code: connect.CodeInternal}}},
			wantCalls: map[string]int{create: 1}, wantCode: exitError, wantStderr: "sandboxctl: internal: injected internal\n",
		},
		{
			name: "create: gives up", args: []string{"sessions", "create", "--template", "python-basic"},
			faults:    map[string][]fault{create: slices.Repeat([]fault{unavailable}, 5)},
			wantCalls: map[string]int{create: 5}, wantCode: exitError,
			wantStderr: "sandboxctl: unavailable: create session: gave up after 5 attempts: injected unavailable\n",
		},
		{
			name: "exec: execute answer lost twice", args: []string{"exec", "-c", "x"},
			faults:    map[string][]fault{execute: {lostAnswer, lostAnswer}},
			wantCalls: map[string]int{create: 1, execute: 3}, wantStdout: "ran: x", wantStderr: "retrying execute", wantSessions: 1, wantExecutions: 1,
		},
		{
			name: "exec: both calls meet faults", args: []string{"exec", "-c", "x"},
			faults:    map[string][]fault{create: {brokenStream}, execute: {brokenStream, unavailable}},
			wantCalls: map[string]int{create: 2, execute: 3}, wantStdout: "ran: x", wantSessions: 1, wantExecutions: 1,
		},
		{
			name: "exec over gRPC: both calls meet faults", args: []string{"exec", "--protocol", "grpc", "-c", "x"},
			faults:    map[string][]fault{create: {brokenStream, unavailable}, execute: {lostAnswer, brokenStream}},
			wantCalls: map[string]int{create: 3, execute: 3}, wantStdout: "ran: x", wantSessions: 1, wantExecutions: 1,
		},
		{
			name: "exec: invalid argument is final", args: []string{"exec", "-c", "x"},
			faults:    map[string][]fault{execute: {{code: connect.CodeInvalidArgument}}},
			wantCalls: map[string]int{create: 1, execute: 1}, wantCode: exitPlatform,
			wantStderr: "sandboxctl: invalid_argument: injected invalid_argument\n", wantSessions: 1,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeAPI()
			f.faults = tt.faults
			addr := f.serve(t)
			r := runCLI(t, addr, invocation{}, tt.args...)
			if r.code != tt.wantCode {
				t.Fatalf("exit code = %d, want %d (stderr %q)", r.code, tt.wantCode, r.stderr)
			}
			if r.stdout != tt.wantStdout {
				t.Errorf("stdout = %q, want %q", r.stdout, tt.wantStdout)
			}
			if !strings.Contains(r.stderr, tt.wantStderr) {
				t.Errorf("stderr = %q, want %q", r.stderr, tt.wantStderr)
			}
			if tt.wantCode != 0 && !strings.HasSuffix(r.stderr, tt.wantStderr) {
				t.Errorf("stderr = %q, want it to end with %q", r.stderr, tt.wantStderr)
			}
			f.mu.Lock()
			defer f.mu.Unlock()
			calls := map[string]int{}
			for _, c := range f.calls {
				if c.procedure == create || c.procedure == execute {
					calls[c.procedure]++
				}
			}
			if !maps.Equal(calls, tt.wantCalls) {
				t.Errorf("calls %v, want %v", calls, tt.wantCalls)
			}
			for p, keys := range f.keys {
				if len(keys) != tt.wantCalls[p] || len(slices.Compact(slices.Clone(keys))) != 1 || !hexKey.MatchString(keys[0]) {
					t.Errorf("%s idempotency keys %q: want one random key, the same on all %d attempts", p, keys, tt.wantCalls[p])
				}
			}
			if len(f.sessions) != tt.wantSessions || len(f.executions) != tt.wantExecutions {
				t.Errorf("the server holds %d sessions and %d executions, want %d and %d",
					len(f.sessions), len(f.executions), tt.wantSessions, tt.wantExecutions)
			}
		})
	}
}

// TestRetryStopsOnInterrupt: a signal during the wait between attempts
// ends the retries at once, and a signal during a call is final.
func TestRetryStopsOnInterrupt(t *testing.T) {
	for _, during := range []string{"wait", "call"} {
		t.Run(during, func(t *testing.T) {
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			// The retry note is written right before the wait.
			stderr := writerFunc(func(p []byte) (int, error) {
				cancel()
				return len(p), nil
			})
			a := &app{stderr: stderr, retry: retryPolicy{attempts: 5, initial: time.Hour, max: time.Hour}}
			calls := 0
			_, err := withRetry(ctx, a, "create session", func(context.Context) (struct{}, error) {
				calls++
				if during == "call" {
					cancel()
				}
				return struct{}{}, connect.NewError(connect.CodeUnavailable, errors.New("no leader"))
			})
			if calls != 1 || err == nil || ctx.Err() == nil {
				t.Errorf("%d calls, error %v; want 1 call and an error", calls, err)
			}
			if during == "wait" && connect.CodeOf(err) != connect.CodeCanceled {
				t.Errorf("error %v, want canceled", err)
			}
		})
	}
}

// writerFunc is an io.Writer made of a function.
type writerFunc func(p []byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

func TestRetryable(t *testing.T) {
	done, cancel := context.WithCancel(t.Context())
	cancel()
	tests := []struct {
		name string
		ctx  context.Context
		err  error
		want bool
	}{
		{"unavailable", t.Context(), connect.NewError(connect.CodeUnavailable, errors.New("no leader")), true},
		{"unavailable from the server", t.Context(), connect.NewWireError(connect.CodeUnavailable, errors.New("no leader")), true},
		{"transport", t.Context(), connect.NewError(connect.CodeInternal, errors.New("stream error: INTERNAL_ERROR")), true},
		{"not a connect error", t.Context(), errors.New("connection reset"), true},
		{"internal from the server", t.Context(), connect.NewWireError(connect.CodeInternal, errors.New("bug")), false},
		{"invalid argument", t.Context(), connect.NewError(connect.CodeInvalidArgument, errors.New("bad")), false},
		{"resource exhausted", t.Context(), connect.NewWireError(connect.CodeResourceExhausted, errors.New("full")), false},
		{"deadline", t.Context(), connect.NewError(connect.CodeDeadlineExceeded, errors.New("slow")), false},
		{"after the context ended", done, connect.NewError(connect.CodeUnavailable, errors.New("no leader")), false},
	}
	for _, tt := range tests {
		if got := retryable(tt.ctx, tt.err); got != tt.want {
			t.Errorf("%s: retryable = %v, want %v", tt.name, got, tt.want)
		}
	}
}

// TestExecAwaitsUnfinished: when Execute hands back an execution that is
// still running, as a retried Execute may, exec polls it to its end.
func TestExecAwaitsUnfinished(t *testing.T) {
	f := newFakeAPI()
	f.running = 3
	addr := f.serve(t)
	r := runCLI(t, addr, invocation{}, "exec", "-c", "x")
	if r.code != 0 || r.stdout != "ran: x" {
		t.Fatalf("exit code %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	polls := 0
	for _, c := range f.calls {
		if c.procedure == sandboxv1connect.ExecutionServiceGetExecutionProcedure {
			polls++
		}
	}
	if polls != 3 {
		t.Errorf("%d GetExecution polls, want 3", polls)
	}
}

func TestStaleReads(t *testing.T) {
	reads := map[string]bool{
		sandboxv1connect.SessionServiceGetSessionProcedure:         true,
		sandboxv1connect.SessionServiceListSessionsProcedure:       true,
		sandboxv1connect.TemplateServiceGetTemplateProcedure:       true,
		sandboxv1connect.ClusterServiceGetClusterStatusProcedure:   true,
		sandboxv1connect.ClusterServiceListNodesProcedure:          true,
		sandboxv1connect.ExecutionServiceDownloadArtifactProcedure: true,
	}
	for _, stale := range []bool{false, true} {
		t.Run(map[bool]string{false: "consistent", true: "stale"}[stale], func(t *testing.T) {
			f := newFakeAPI()
			f.files = map[string]string{"a.txt": "A"}
			addr := f.serve(t)
			sid := f.addSession("python-basic", nil)
			var global []string
			if stale {
				global = []string{"--stale"}
			}
			for _, args := range [][]string{
				append(slices.Clone(global), "sessions", "list"),
				{"cluster", "status", "--stale=" + map[bool]string{false: "false", true: "true"}[stale]},
				append([]string{"cluster", "nodes"}, global...),
				append([]string{"exec", "--session", sid, "--artifacts", t.TempDir(), "-c", "x"}, global...),
				append([]string{"cluster", "drain", "agent-1"}, global...),
			} {
				if r := runCLI(t, addr, invocation{}, args...); r.code != 0 {
					t.Fatalf("%v: exit code %d, stderr %q", args, r.code, r.stderr)
				}
			}
			f.mu.Lock()
			defer f.mu.Unlock()
			seen := map[string]bool{}
			for _, c := range f.calls {
				seen[c.procedure] = true
				want := ""
				if stale && reads[c.procedure] {
					want = readConsistencyStale
				}
				if c.consistency != want {
					t.Errorf("%s: %s = %q, want %q", c.procedure, readConsistencyHeader, c.consistency, want)
				}
			}
			for p := range reads {
				if !seen[p] {
					t.Errorf("%s was never called; the test covers less than it claims", p)
				}
			}
			for _, p := range []string{sandboxv1connect.ExecutionServiceExecuteProcedure, sandboxv1connect.ClusterServiceDrainNodeProcedure} {
				if !seen[p] {
					t.Errorf("write %s was never called", p)
				}
			}
		})
	}
}

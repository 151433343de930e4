package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/encoding/protojson"

	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
)

func TestExecExitCodes(t *testing.T) {
	tests := []struct {
		name       string
		result     func(e *sandboxv1.Execution)
		createErr  error
		executeErr error
		wantCode   int
		wantStdout string
		// wantStderr is the exact stderr when set, else a substring of it.
		wantStderr      string
		wantStderrExact bool
		wantSession     bool
	}{
		{
			name:       "completed 0",
			result:     func(e *sandboxv1.Execution) { e.Stdout = "hello\n" },
			wantCode:   0,
			wantStdout: "hello\n", wantStderr: "", wantStderrExact: true, wantSession: true,
		},
		{
			name: "completed 3",
			result: func(e *sandboxv1.Execution) {
				e.Stdout, e.Stderr, e.ExitCode = "out\n", "Traceback: boom\n", 3
			},
			wantCode:   3,
			wantStdout: "out\n", wantStderr: "Traceback: boom\n", wantStderrExact: true, wantSession: true,
		},
		{
			name: "timed out",
			result: func(e *sandboxv1.Execution) {
				e.State, e.Stdout, e.TimeoutSeconds = sandboxv1.ExecutionState_EXECUTION_STATE_TIMED_OUT, "partial\n", 2
			},
			wantCode:   exitTimedOut,
			wantStdout: "partial\n", wantStderr: "sandboxctl: deadline_exceeded: execution e-2 timed out after 2s\n", wantStderrExact: true, wantSession: true,
		},
		{
			name: "canceled",
			result: func(e *sandboxv1.Execution) {
				e.State, e.Stdout, e.StateReason = sandboxv1.ExecutionState_EXECUTION_STATE_CANCELED, "", "canceled by client"
			},
			wantCode: exitCanceled, wantStderr: "canceled: execution e-2 was canceled: canceled by client", wantSession: true,
		},
		{
			name: "failed",
			result: func(e *sandboxv1.Execution) {
				e.State, e.Stdout, e.StateReason = sandboxv1.ExecutionState_EXECUTION_STATE_FAILED, "", "executor died"
			},
			wantCode: exitPlatform, wantStderr: "sandboxctl: internal: execution e-2 failed: executor died\n", wantStderrExact: true, wantSession: true,
		},
		{
			name: "lost",
			result: func(e *sandboxv1.Execution) {
				e.State, e.Stdout = sandboxv1.ExecutionState_EXECUTION_STATE_LOST, ""
			},
			wantCode: exitPlatform, wantStderr: "sandboxctl: unavailable: execution e-2 was lost", wantSession: true,
		},
		{
			name: "truncated output",
			result: func(e *sandboxv1.Execution) {
				e.Stdout, e.StdoutTruncated = "xxxx", true
			},
			wantCode: 0, wantStdout: "xxxx", wantStderr: "stdout of execution e-2 truncated", wantSession: true,
		},
		{
			name:       "execute error",
			executeErr: connect.NewError(connect.CodeInvalidArgument, errors.New("language \"cobol\" is not supported")),
			wantCode:   exitPlatform, wantStderr: "sandboxctl: invalid_argument: language \"cobol\" is not supported\n", wantStderrExact: true, wantSession: true,
		},
		{
			name:      "create session error",
			createErr: connect.NewError(connect.CodeResourceExhausted, errors.New("no agent has room")),
			wantCode:  exitPlatform, wantStderr: "sandboxctl: resource_exhausted: no agent has room\n", wantStderrExact: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeAPI()
			f.result, f.createErr, f.executeErr = tt.result, tt.createErr, tt.executeErr
			addr := f.serve(t)
			r := runCLI(t, addr, invocation{}, "exec", "--template", "python-basic", "-c", "print('hello')")
			if r.code != tt.wantCode {
				t.Errorf("exit code = %d, want %d (stderr %q)", r.code, tt.wantCode, r.stderr)
			}
			if r.stdout != tt.wantStdout {
				t.Errorf("stdout = %q, want exactly %q", r.stdout, tt.wantStdout)
			}
			if tt.wantStderrExact && r.stderr != tt.wantStderr {
				t.Errorf("stderr = %q, want exactly %q", r.stderr, tt.wantStderr)
			}
			if !tt.wantStderrExact && !strings.Contains(r.stderr, tt.wantStderr) {
				t.Errorf("stderr = %q, want it to contain %q", r.stderr, tt.wantStderr)
			}
			terminated, _, _, _ := f.snapshot()
			if tt.wantSession {
				if !slices.Equal(terminated, []string{"s-1"}) {
					t.Errorf("terminated sessions = %v, want [s-1]", terminated)
				}
			} else if len(terminated) != 0 {
				t.Errorf("terminated sessions = %v, want none", terminated)
			}
		})
	}
}

func TestExecExistingSessionIsKept(t *testing.T) {
	f := newFakeAPI()
	addr := f.serve(t)
	id := f.addSession("nodejs-basic", nil)
	r := runCLI(t, addr, invocation{}, "exec", "--session", id, "-c", "console.log(1)")
	if r.code != 0 {
		t.Fatalf("exit code = %d, stderr %q", r.code, r.stderr)
	}
	terminated, _, created, executed := f.snapshot()
	if len(terminated) != 0 || created != 0 {
		t.Errorf("terminated %v, created %d sessions; want neither", terminated, created)
	}
	if len(executed) != 1 || executed[0].GetSessionId() != id || executed[0].GetLanguage() != "node" {
		t.Errorf("executed %v, want one node execution in %s", executed, id)
	}
}

func TestExecCodeSources(t *testing.T) {
	dir := t.TempDir()
	for name, content := range map[string]string{"job.py": "print(2)", "app.js": "console.log(3)", "run.sh": "echo 4", "plain": "print(5)"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		name         string
		args         []string
		stdin        string
		tty          bool
		wantCode     int
		wantCodeText string
		wantLanguage string
		wantTemplate string
	}{
		{name: "-c", args: []string{"-c", "print(1)"}, tty: true, wantCodeText: "print(1)", wantLanguage: "python", wantTemplate: "python-basic"},
		{name: "python file", args: []string{"job.py"}, tty: true, wantCodeText: "print(2)", wantLanguage: "python", wantTemplate: "python-basic"},
		{name: "node file picks a node template", args: []string{"app.js"}, tty: true, wantCodeText: "console.log(3)", wantLanguage: "node", wantTemplate: "nodejs-basic"},
		{name: "shell file with template", args: []string{"--template", "python-basic", "run.sh"}, tty: true, wantCodeText: "echo 4", wantLanguage: "bash", wantTemplate: "python-basic"},
		{name: "file without extension", args: []string{"plain"}, tty: true, wantCodeText: "print(5)", wantLanguage: "python", wantTemplate: "python-basic"},
		{name: "stdin dash", args: []string{"-"}, stdin: "print(6)", tty: true, wantCodeText: "print(6)", wantLanguage: "python", wantTemplate: "python-basic"},
		{name: "stdin pipe", args: nil, stdin: "print(7)", wantCodeText: "print(7)", wantLanguage: "python", wantTemplate: "python-basic"},
		{name: "template language", args: []string{"--template", "nodejs-basic", "-c", "1"}, tty: true, wantCodeText: "1", wantLanguage: "node", wantTemplate: "nodejs-basic"},
		{name: "template first language", args: []string{"--template", "bash-only", "-"}, stdin: "echo", wantCodeText: "echo", wantLanguage: "bash", wantTemplate: "bash-only"},
		{name: "language flag wins", args: []string{"job.py", "--language", "bash"}, tty: true, wantCodeText: "print(2)", wantLanguage: "bash", wantTemplate: "python-basic"},
		{name: "no code on a terminal", args: nil, tty: true, wantCode: exitPlatform},
		{name: "-c and a file", args: []string{"-c", "1", "job.py"}, tty: true, wantCode: exitPlatform},
		{name: "missing file", args: []string{"nope.py"}, tty: true, wantCode: exitPlatform},
		{name: "unknown language", args: []string{"--language", "cobol", "-c", "x"}, tty: true, wantCode: exitPlatform},
		{name: "template and session", args: []string{"--template", "python-basic", "--session", "s-9", "-c", "x"}, tty: true, wantCode: exitPlatform},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeAPI()
			addr := f.serve(t)
			r := runCLI(t, addr, invocation{stdin: tt.stdin, tty: tt.tty, cwd: dir}, append([]string{"exec"}, tt.args...)...)
			if r.code != tt.wantCode {
				t.Fatalf("exit code = %d, want %d (stderr %q)", r.code, tt.wantCode, r.stderr)
			}
			_, _, created, executed := f.snapshot()
			if tt.wantCode != 0 {
				if len(executed) != 0 || created != 0 {
					t.Errorf("a rejected command line created %d sessions and ran %v", created, executed)
				}
				if !strings.HasPrefix(r.stderr, "sandboxctl: ") {
					t.Errorf("stderr = %q, want a sandboxctl: message", r.stderr)
				}
				return
			}
			if len(executed) != 1 {
				t.Fatalf("executed %d times, want once", len(executed))
			}
			if got := executed[0]; got.GetCode() != tt.wantCodeText || got.GetLanguage() != tt.wantLanguage {
				t.Errorf("executed %q in %q, want %q in %q", got.GetCode(), got.GetLanguage(), tt.wantCodeText, tt.wantLanguage)
			}
			if want := "ran: " + tt.wantCodeText; r.stdout != want {
				t.Errorf("stdout = %q, want exactly %q", r.stdout, want)
			}
			f.mu.Lock()
			gotTemplate := f.created[0].GetTemplateId()
			f.mu.Unlock()
			if gotTemplate != tt.wantTemplate {
				t.Errorf("session template = %q, want %q", gotTemplate, tt.wantTemplate)
			}
		})
	}
}

func TestExecForwardsOptions(t *testing.T) {
	f := newFakeAPI()
	addr := f.serve(t)
	r := runCLI(t, addr, invocation{}, "exec", "-c", "x", "--timeout", "7", "--env", "A=1", "--env", "B=x=y")
	if r.code != 0 {
		t.Fatalf("exit code = %d, stderr %q", r.code, r.stderr)
	}
	_, _, _, executed := f.snapshot()
	got := executed[0]
	if got.GetTimeoutSeconds() != 7 || got.GetEnv()["A"] != "1" || got.GetEnv()["B"] != "x=y" || got.GetAsync() {
		t.Errorf("request = %v, want timeout 7, env A=1 B=x=y, synchronous", got)
	}
}

func TestExecJSON(t *testing.T) {
	f := newFakeAPI()
	f.result = func(e *sandboxv1.Execution) { e.Stdout, e.ExitCode = "hi\n", 4 }
	addr := f.serve(t)
	r := runCLI(t, addr, invocation{}, "exec", "-o", "json", "-c", "x")
	if r.code != 4 {
		t.Fatalf("exit code = %d, want 4 (stderr %q)", r.code, r.stderr)
	}
	var e sandboxv1.Execution
	if err := protojson.Unmarshal([]byte(r.stdout), &e); err != nil {
		t.Fatalf("stdout is not an Execution in JSON: %v\n%s", err, r.stdout)
	}
	if e.GetStdout() != "hi\n" || e.GetExitCode() != 4 || e.GetId() != "e-2" {
		t.Errorf("execution = %v", &e)
	}
	if !strings.Contains(r.stdout, `"exitCode": 4`) {
		t.Errorf("stdout lacks exitCode: %s", r.stdout)
	}
}

// TestExecInterrupt cancels the command's context, as SIGINT does, while
// the execution runs: exec cancels the execution, removes the session and
// exits 130.
func TestExecInterrupt(t *testing.T) {
	f := newFakeAPI()
	f.block = true
	addr := f.serve(t)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	done := make(chan result, 1)
	go func() { done <- runCLI(t, addr, invocation{ctx: ctx}, "exec", "-c", "while True: pass") }()
	var execID string
	select {
	case execID = <-f.started:
	case <-time.After(30 * time.Second):
		t.Fatal("the execution never started")
	}
	cancel()
	var r result
	select {
	case r = <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("exec did not return after its context was canceled")
	}
	if r.code != exitCanceled {
		t.Errorf("exit code = %d, want %d (stderr %q)", r.code, exitCanceled, r.stderr)
	}
	if r.stdout != "" {
		t.Errorf("stdout = %q, want nothing", r.stdout)
	}
	terminated, canceled, _, _ := f.snapshot()
	if !slices.Equal(canceled, []string{execID}) {
		t.Errorf("canceled executions = %v, want [%s]", canceled, execID)
	}
	if !slices.Equal(terminated, []string{"s-1"}) {
		t.Errorf("terminated sessions = %v, want [s-1]", terminated)
	}
}

// TestExecInterruptedCreate: when the context ends while the session is
// being created, exec finds the session by its label and removes it.
func TestExecInterruptedCreate(t *testing.T) {
	f := newFakeAPI()
	addr := f.serve(t)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	// The server creates the session, then the client goes away before
	// the answer arrives.
	f.onCreate = func(ctx context.Context) {
		cancel()
		<-ctx.Done()
	}
	r := runCLI(t, addr, invocation{ctx: ctx}, "exec", "-c", "x")
	if r.code != exitCanceled {
		t.Errorf("exit code = %d, want %d (stderr %q)", r.code, exitCanceled, r.stderr)
	}
	terminated, _, _, executed := f.snapshot()
	if !slices.Equal(terminated, []string{"s-1"}) {
		t.Errorf("terminated sessions = %v, want [s-1]", terminated)
	}
	if len(executed) != 0 {
		t.Errorf("executed %v after the interrupt", executed)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.listedLabels) != 1 || f.listedLabels[0][execLabel] != f.created[0].GetLabels()[execLabel] {
		t.Errorf("listed sessions by labels %v, want one lookup by the created session's %s", f.listedLabels, execLabel)
	}
}

func TestAuthorization(t *testing.T) {
	keyDir := t.TempDir()
	sub := filepath.Join(keyDir, "a", "b")
	if err := os.MkdirAll(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	writeKey := func(dir, key string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Join(dir, ".sandbox"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, ".sandbox", "api-key"), []byte(key+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	writeKey(keyDir, "project-key")
	home := t.TempDir()
	writeKey(home, "home-key")

	tests := []struct {
		name string
		args []string
		env  map[string]string
		cwd  string
		want string
	}{
		{name: "environment", env: map[string]string{envAPIKey: "env-key"}, want: "Bearer env-key"},
		{name: "flag before the command", args: []string{"--api-key", "flag-key"}, env: map[string]string{envAPIKey: "env-key"}, want: "Bearer flag-key"},
		{name: "file in a parent directory", env: map[string]string{envAPIKey: "", "HOME": home}, cwd: sub, want: "Bearer project-key"},
		{name: "file in HOME", env: map[string]string{envAPIKey: "", "HOME": home}, want: "Bearer home-key"},
		{name: "none", env: map[string]string{envAPIKey: ""}, want: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeAPI()
			addr := f.serve(t)
			args := append(slices.Clone(tt.args), "templates", "list")
			r := runCLI(t, addr, invocation{env: tt.env, cwd: tt.cwd}, args...)
			if r.code != 0 {
				t.Fatalf("exit code = %d, stderr %q", r.code, r.stderr)
			}
			f.mu.Lock()
			defer f.mu.Unlock()
			if len(f.auth) == 0 {
				t.Fatal("no request reached the server")
			}
			for i, got := range f.auth {
				if got != tt.want {
					t.Errorf("request %d: Authorization = %q, want %q", i, got, tt.want)
				}
				if f.protoMajors[i] != 2 {
					t.Errorf("request %d: HTTP/%d, want HTTP/2 (h2c)", i, f.protoMajors[i])
				}
			}
		})
	}
}

func TestAuthorizationOnEveryCall(t *testing.T) {
	for _, protocol := range []string{"connect", "grpc", "grpcweb"} {
		t.Run(protocol, func(t *testing.T) {
			f := newFakeAPI()
			f.files = map[string]string{"out.txt": "data"}
			addr := f.serve(t)
			dir := t.TempDir()
			r := runCLI(t, addr, invocation{}, "exec", "--protocol", protocol, "--artifacts", dir, "-c", "x")
			if r.code != 0 {
				t.Fatalf("exit code = %d, stderr %q", r.code, r.stderr)
			}
			f.mu.Lock()
			defer f.mu.Unlock()
			// GetTemplate is skipped (-c defaults to python): create, execute,
			// download, terminate.
			if len(f.auth) != 4 {
				t.Errorf("%d requests, want 4", len(f.auth))
			}
			for i, got := range f.auth {
				if got != "Bearer test-key" {
					t.Errorf("request %d: Authorization = %q", i, got)
				}
			}
		})
	}
}

func TestArtifactsGet(t *testing.T) {
	tests := []struct {
		name      string
		path      string
		out       string // -o value; "" for the default
		corrupt   bool
		wantCode  int
		wantFile  string // file expected in the working directory
		wantOut   string // expected stdout
		wantError string
		wantCalls int
	}{
		{name: "default name", path: "results/report.csv", wantFile: "report.csv", wantCalls: 1},
		{name: "named file", path: "results/report.csv", out: "copy.csv", wantFile: "copy.csv", wantCalls: 1},
		{name: "stdout", path: "results/report.csv", out: "-", wantOut: "a,b\n1,2\n", wantCalls: 1},
		{name: "checksum mismatch", path: "results/report.csv", corrupt: true, wantCode: exitError, wantError: "sandboxctl: data_loss: artifact results/report.csv: sha256 mismatch", wantCalls: 1},
		{name: "checksum mismatch to stdout", path: "results/report.csv", out: "-", corrupt: true, wantCode: exitError, wantError: "data_loss", wantCalls: 1},
		{name: "parent traversal", path: "../../etc/passwd", wantCode: exitError, wantError: "sandboxctl: invalid_argument: artifact path \"../../etc/passwd\": \"..\" is refused"},
		{name: "inner traversal", path: "results/../../x", wantCode: exitError, wantError: "invalid_argument"},
		{name: "absolute", path: "/etc/passwd", wantCode: exitError, wantError: "absolute paths are refused"},
		{name: "missing", path: "nope.txt", wantCode: exitError, wantError: "sandboxctl: not_found: artifact nope.txt: artifact \"nope.txt\" not found", wantCalls: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeAPI()
			f.corrupt = tt.corrupt
			addr := f.serve(t)
			execID := f.addExecution("s-0", map[string]string{"results/report.csv": "a,b\n1,2\n"})
			cwd := t.TempDir()
			args := []string{"artifacts", "get", execID, tt.path}
			if tt.out != "" {
				args = append(args, "-o", tt.out)
			}
			r := runCLI(t, addr, invocation{cwd: cwd}, args...)
			if r.code != tt.wantCode {
				t.Fatalf("exit code = %d, want %d (stderr %q)", r.code, tt.wantCode, r.stderr)
			}
			if !strings.Contains(r.stderr, tt.wantError) {
				t.Errorf("stderr = %q, want %q", r.stderr, tt.wantError)
			}
			if r.stdout != tt.wantOut {
				t.Errorf("stdout = %q, want %q", r.stdout, tt.wantOut)
			}
			files := dirEntries(t, cwd)
			if tt.wantFile == "" {
				if len(files) != 0 {
					t.Errorf("working directory holds %v, want nothing (not even a temporary file)", files)
				}
			} else {
				if !slices.Equal(files, []string{tt.wantFile}) {
					t.Errorf("working directory holds %v, want [%s]", files, tt.wantFile)
				}
				b, err := os.ReadFile(filepath.Join(cwd, tt.wantFile))
				if err != nil || string(b) != "a,b\n1,2\n" {
					t.Errorf("%s = %q, %v", tt.wantFile, b, err)
				}
			}
			f.mu.Lock()
			defer f.mu.Unlock()
			if f.downloadCalls != tt.wantCalls {
				t.Errorf("%d download calls, want %d", f.downloadCalls, tt.wantCalls)
			}
		})
	}
}

func TestExecArtifactsDir(t *testing.T) {
	tests := []struct {
		name      string
		files     map[string]string
		wantCode  int
		wantFiles map[string]string // relative to DIR
		wantError string
	}{
		{
			name:      "nested",
			files:     map[string]string{"a.txt": "A", "out/deep/b.bin": "BBBBBBBBB", "empty": ""},
			wantFiles: map[string]string{"a.txt": "A", "out/deep/b.bin": "BBBBBBBBB", "empty": ""},
		},
		{
			name:      "traversal is refused, the rest is written",
			files:     map[string]string{"../escape.txt": "evil", "ok.txt": "fine", "/abs.txt": "evil"},
			wantCode:  exitPlatform,
			wantFiles: map[string]string{"ok.txt": "fine"},
			wantError: `artifact path "../escape.txt": ".." is refused`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeAPI()
			f.files = tt.files
			addr := f.serve(t)
			parent := t.TempDir()
			r := runCLI(t, addr, invocation{cwd: parent}, "exec", "--artifacts", "arts", "-c", "x")
			if r.code != tt.wantCode {
				t.Fatalf("exit code = %d, want %d (stderr %q)", r.code, tt.wantCode, r.stderr)
			}
			if !strings.Contains(r.stderr, tt.wantError) {
				t.Errorf("stderr = %q, want %q", r.stderr, tt.wantError)
			}
			if got := dirEntries(t, parent); !slices.Equal(got, []string{"arts"}) {
				t.Errorf("the working directory holds %v, want only arts", got)
			}
			got := map[string]string{}
			root := filepath.Join(parent, "arts")
			err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
				if err != nil || d.IsDir() {
					return err
				}
				b, err := os.ReadFile(p)
				rel, _ := filepath.Rel(root, p)
				got[filepath.ToSlash(rel)] = string(b)
				return err
			})
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(got) != fmt.Sprint(tt.wantFiles) {
				t.Errorf("artifacts directory holds %v, want %v", got, tt.wantFiles)
			}
		})
	}
}

func TestSafeRelPath(t *testing.T) {
	tests := []struct {
		in, want string
		ok       bool
	}{
		{"a.txt", "a.txt", true},
		{"dir/sub/a.txt", filepath.FromSlash("dir/sub/a.txt"), true},
		{"./a.txt", "a.txt", true},
		{"a..b", "a..b", true},
		{"..", "", false},
		{"../a", "", false},
		{"a/../../b", "", false},
		{"a/..", "", false},
		{`a\..\b`, "", false},
		{"/etc/passwd", "", false},
		{`\windows`, "", false},
		{"", "", false},
		{".", "", false},
		{"a\x00b", "", false},
	}
	for _, tt := range tests {
		got, err := safeRelPath(tt.in)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("safeRelPath(%q) = %q, %v; want %q, ok=%v", tt.in, got, err, tt.want, tt.ok)
		}
	}
}

func TestSessionsOutput(t *testing.T) {
	f := newFakeAPI()
	addr := f.serve(t)
	f.addSession("python-basic", map[string]string{"team": "ml"})
	f.addSession("nodejs-basic", nil)

	r := runCLI(t, addr, invocation{}, "sessions", "list")
	if r.code != 0 {
		t.Fatalf("exit code = %d, stderr %q", r.code, r.stderr)
	}
	lines := strings.Split(strings.TrimRight(r.stdout, "\n"), "\n")
	if len(lines) != 3 {
		t.Fatalf("table has %d lines, want a header and 2 rows:\n%s", len(lines), r.stdout)
	}
	if got := strings.Fields(lines[0]); !slices.Equal(got, []string{"ID", "TEMPLATE", "STATE", "AGENT", "AGE", "LABELS"}) {
		t.Errorf("header = %v", got)
	}
	if got := strings.Fields(lines[1]); !slices.Equal(got, []string{"s-1", "python-basic", "running", "agent-1", "1m", "team=ml"}) {
		t.Errorf("row = %v", got)
	}
	// Columns are aligned: every row's STATE starts where the header's does.
	col := strings.Index(lines[0], "STATE")
	for _, l := range lines[1:] {
		if l[col:col+len("running")] != "running" {
			t.Errorf("row %q is not aligned with the header %q", l, lines[0])
		}
	}

	r = runCLI(t, addr, invocation{}, "sessions", "list", "-o", "json")
	var list sandboxv1.ListSessionsResponse
	if err := protojson.Unmarshal([]byte(r.stdout), &list); err != nil {
		t.Fatalf("not a ListSessionsResponse: %v\n%s", err, r.stdout)
	}
	if len(list.GetSessions()) != 2 || !strings.HasPrefix(r.stdout, "{") || !strings.Contains(r.stdout, `"sessions"`) {
		t.Errorf("json = %s", r.stdout)
	}

	r = runCLI(t, addr, invocation{}, "sessions", "get", "s-1", "-o", "json")
	var s sandboxv1.Session
	if err := protojson.Unmarshal([]byte(r.stdout), &s); err != nil || s.GetId() != "s-1" {
		t.Fatalf("not session s-1: %v\n%s", err, r.stdout)
	}
	r = runCLI(t, addr, invocation{}, "sessions", "get", "s-1")
	if !strings.Contains(r.stdout, "State:") || !strings.Contains(r.stdout, "running") || !strings.Contains(r.stdout, "team=ml") {
		t.Errorf("details = %s", r.stdout)
	}

	r = runCLI(t, addr, invocation{}, "sessions", "get", "s-404")
	if r.code != exitError || r.stderr != "sandboxctl: not_found: session \"s-404\" not found\n" {
		t.Errorf("missing session: code %d, stderr %q", r.code, r.stderr)
	}
}

func TestSessionsListPagesAndFilters(t *testing.T) {
	f := newFakeAPI()
	f.pageSize = 2
	addr := f.serve(t)
	for range 5 {
		f.addSession("python-basic", map[string]string{"k": "v"})
	}
	f.addSession("python-basic", nil)
	f.mu.Lock()
	f.sessions["s-6"].State = sandboxv1.SessionState_SESSION_STATE_TERMINATED
	f.mu.Unlock()

	tests := []struct {
		name     string
		args     []string
		wantRows int
		wantNote bool
	}{
		{name: "one page", args: nil, wantRows: 2, wantNote: true},
		{name: "all pages", args: []string{"--all"}, wantRows: 6},
		{name: "limit", args: []string{"--all", "--limit", "4"}, wantRows: 6},
		{name: "state", args: []string{"--all", "--state", "terminated"}, wantRows: 1},
		{name: "state upper case", args: []string{"--all", "--state", "RUNNING"}, wantRows: 5},
		{name: "label", args: []string{"--all", "--label", "k=v"}, wantRows: 5},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runCLI(t, addr, invocation{}, append([]string{"sessions", "list"}, tt.args...)...)
			if r.code != 0 {
				t.Fatalf("exit code = %d, stderr %q", r.code, r.stderr)
			}
			if rows := strings.Count(r.stdout, "\n") - 1; rows != tt.wantRows {
				t.Errorf("%d rows, want %d:\n%s", rows, tt.wantRows, r.stdout)
			}
			if got := strings.Contains(r.stderr, "more results"); got != tt.wantNote {
				t.Errorf("stderr = %q, want a more-results note: %v", r.stderr, tt.wantNote)
			}
		})
	}
	r := runCLI(t, addr, invocation{}, "sessions", "list", "--state", "bogus")
	if r.code != exitUsage {
		t.Errorf("bogus state: exit code %d, want %d", r.code, exitUsage)
	}
}

func TestSessionsCreateAndRm(t *testing.T) {
	f := newFakeAPI()
	addr := f.serve(t)
	r := runCLI(t, addr, invocation{}, "sessions", "create", "--template", "python-basic", "--memory-mib", "256",
		"--cpu-millis", "500", "--pids", "64", "--disk-mib", "100", "--env", "A=1", "--label", "team=ml", "--idle-timeout", "60", "--max-lifetime", "3600")
	if r.code != 0 || r.stdout != "s-1\n" {
		t.Fatalf("create: code %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	f.mu.Lock()
	req := f.created[0]
	f.mu.Unlock()
	l := req.GetResourceLimits()
	if l.GetMemoryMib() != 256 || l.GetCpuMillis() != 500 || l.GetPids() != 64 || l.GetDiskMib() != 100 ||
		req.GetEnv()["A"] != "1" || req.GetLabels()["team"] != "ml" || req.GetIdleTimeoutSeconds() != 60 ||
		req.GetMaxLifetimeSeconds() != 3600 {
		t.Errorf("request = %v", req)
	}
	r = runCLI(t, addr, invocation{}, "sessions", "get", "s-1")
	if !strings.Contains(r.stdout, "Max lifetime: 3600s") {
		t.Errorf("sessions get does not show the maximum lifetime:\n%s", r.stdout)
	}
	r = runCLI(t, addr, invocation{}, "sessions", "create", "--template", "python-basic", "--max-lifetime", "-1")
	if r.code != exitUsage || !strings.Contains(r.stderr, "--max-lifetime must not be negative") {
		t.Errorf("negative max lifetime: code %d, stderr %q", r.code, r.stderr)
	}

	r = runCLI(t, addr, invocation{}, "sessions", "rm", "s-1", "s-404")
	if r.code != exitError || r.stdout != "s-1\n" || !strings.Contains(r.stderr, "sandboxctl: not_found: session s-404: ") {
		t.Errorf("rm: code %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
	}
	if terminated, _, _, _ := f.snapshot(); !slices.Equal(terminated, []string{"s-1"}) {
		t.Errorf("terminated = %v", terminated)
	}

	r = runCLI(t, addr, invocation{}, "sessions", "create")
	if r.code != exitUsage || !strings.Contains(r.stderr, "--template is required") {
		t.Errorf("create without template: code %d, stderr %q", r.code, r.stderr)
	}
}

func TestExecutionsAndTemplates(t *testing.T) {
	f := newFakeAPI()
	addr := f.serve(t)
	sid := f.addSession("python-basic", nil)
	execID := f.addExecution(sid, map[string]string{"x.txt": "hello"})

	tests := []struct {
		name     string
		args     []string
		wantCode int
		want     []string // substrings of stdout
	}{
		{name: "executions get", args: []string{"executions", "get", execID}, want: []string{"State:", "completed", "x.txt (5B)"}},
		{name: "executions list", args: []string{"executions", "list", "--session", sid}, want: []string{"ID", "STATE", execID, "completed"}},
		{name: "executions list json", args: []string{"executions", "list", "--session", sid, "-o", "json"}, want: []string{`"executions": [`}},
		{name: "executions list needs a session", args: []string{"executions", "list"}, wantCode: exitUsage},
		{name: "executions cancel", args: []string{"executions", "cancel", execID}, want: []string{execID + " canceled\n"}},
		{name: "artifacts list", args: []string{"artifacts", "list", execID}, want: []string{"PATH", "x.txt", "5B", artifactOf("", []byte("hello")).Sha256}},
		{name: "artifacts list json", args: []string{"artifacts", "list", execID, "-o", "json"}, want: []string{`"artifacts": [`, `"sizeBytes": "5"`}},
		{name: "templates list", args: []string{"templates", "list"}, want: []string{"ID", "LANGUAGES", "python-basic", "python,bash"}},
		{name: "templates list json", args: []string{"templates", "list", "-o", "json"}, want: []string{`"templates": [`}},
		{name: "templates get", args: []string{"templates", "get", "nodejs-basic"}, want: []string{"Languages:", "node,bash"}},
		{name: "templates create", args: []string{"templates", "create", "--id", "r", "--image", "img", "--language", "python,bash"}, want: []string{"r\n"}},
		{name: "templates rm", args: []string{"templates", "rm", "r"}, want: []string{"r\n"}},
		{name: "templates rm builtin", args: []string{"templates", "rm", "python-basic"}, wantCode: exitError},
		{name: "unknown output format", args: []string{"templates", "list", "-o", "yaml"}, wantCode: exitUsage},
		{name: "too many arguments", args: []string{"templates", "get", "a", "b"}, wantCode: exitUsage},
		{name: "unknown command", args: []string{"frobnicate"}, wantCode: exitUsage},
		{name: "version", args: []string{"version"}, want: []string{"sandboxctl "}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runCLI(t, addr, invocation{}, tt.args...)
			if r.code != tt.wantCode {
				t.Fatalf("exit code = %d, want %d (stderr %q)", r.code, tt.wantCode, r.stderr)
			}
			for _, w := range tt.want {
				if !strings.Contains(r.stdout, w) {
					t.Errorf("stdout lacks %q:\n%s", w, r.stdout)
				}
			}
		})
	}
}

func TestHelpOnEveryLevel(t *testing.T) {
	cases := [][]string{{"-h"}, {"--help"}}
	var walk func(path []string, tree []*command)
	walk = func(path []string, tree []*command) {
		for _, c := range tree {
			p := append(slices.Clone(path), c.name)
			cases = append(cases, append(slices.Clone(p), "-h"))
			walk(p, c.sub)
		}
	}
	walk(nil, commands())
	for _, args := range cases {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			r := runCLI(t, "http://127.0.0.1:1", invocation{}, args...)
			if r.code != 0 || !strings.HasPrefix(r.stdout, "Usage: sandboxctl") {
				t.Errorf("code %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
			}
		})
	}
}

func TestErrorLine(t *testing.T) {
	ce := connect.NewError(connect.CodeNotFound, errors.New("session \"x\" not found"))
	tests := []struct {
		err  error
		want string
	}{
		{ce, `not_found: session "x" not found`},
		{fmt.Errorf("session x: %w", ce), `not_found: session x: session "x" not found`},
		{errors.New("read code: no such file"), "read code: no such file"},
		{errors.New("two\nlines"), "two lines"},
	}
	for _, tt := range tests {
		if got := errorLine(tt.err); got != tt.want {
			t.Errorf("errorLine(%v) = %q, want %q", tt.err, got, tt.want)
		}
	}
}

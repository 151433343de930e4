package executor

import (
	"errors"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/sandboxhq/sandbox/executor/executorapi"
)

func TestBwrapArgsOrder(t *testing.T) {
	args := bwrapArgs("/tmp/ws", "/usr/bin/python3", "main.py", map[string]string{"B": "2", "A": "1"})
	joined := " " + strings.Join(args, " ") + " "
	// Later mounts cover earlier ones: the workspace and the /run tmpfs must
	// come after the root bind, and the code file after the tmpfs.
	order := []string{
		" --ro-bind / / ",
		" --proc /proc ",
		" --bind /tmp/ws /workspace ",
		" --tmpfs /run ",
		" --ro-bind-data 3 /run/code/main.py ",
		" --setenv A 1 --setenv B 2 ",
		" -- /usr/bin/python3 /run/code/main.py ",
	}
	last := -1
	for _, want := range order {
		i := strings.Index(joined, want)
		if i < 0 || i < last {
			t.Fatalf("%q missing or out of order in %s", want, joined)
		}
		last = i
	}
	for _, flag := range []string{"--unshare-all", "--die-with-parent", "--new-session", "--clearenv", "--disable-userns"} {
		if !slices.Contains(args, flag) {
			t.Errorf("missing %s", flag)
		}
	}
	if !strings.HasSuffix(joined, " -- /usr/bin/python3 /run/code/main.py ") {
		t.Errorf("command is not last: %s", joined)
	}
}

func TestMergeEnv(t *testing.T) {
	got := mergeEnv(baseEnv(), map[string]string{"A": "session", "HOME": "/elsewhere"}, map[string]string{"A": "exec"})
	if got["A"] != "exec" || got["HOME"] != "/elsewhere" || got["PATH"] != basePath || got["PYTHONUNBUFFERED"] != "1" {
		t.Errorf("merged env %v", got)
	}
}

func TestLookPath(t *testing.T) {
	if _, err := lookPath("sh", "/nonexistent:/bin:/usr/bin"); err != nil {
		t.Errorf("sh: %v", err)
	}
	if _, err := lookPath("no-such-interpreter", basePath); err == nil {
		t.Error("found a missing program")
	}
}

func TestStartProcessFailures(t *testing.T) {
	cases := []struct {
		name string
		spec processSpec
		want string
	}{
		{"unknown language", processSpec{Bwrap: "/bin/true", Language: "cobol"}, "unknown language"},
		{"missing bwrap", processSpec{Bwrap: "/nonexistent/bwrap", Language: "bash", Workspace: t.TempDir()}, "/nonexistent/bwrap"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := startProcess(tc.spec, nil, nil)
			if !errors.Is(err, errStart) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err %v, want errStart naming %q", err, tc.want)
			}
		})
	}
}

func TestClassifyExit(t *testing.T) {
	cases := []struct {
		name   string
		stderr string
		exit   processExit
		state  string
		code   int
		errHas string
	}{
		{name: "zero", exit: processExit{ExitCode: 0}, state: executorapi.StateCompleted, code: 0},
		{name: "non-zero", exit: processExit{ExitCode: 3}, state: executorapi.StateCompleted, code: 3},
		{name: "program killed", exit: processExit{ExitCode: 137}, state: executorapi.StateCompleted, code: 137, errHas: "SIGKILL"},
		{name: "bwrap killed", exit: processExit{ExitCode: 128 + 9, Signal: syscall.SIGKILL}, state: executorapi.StateCompleted, code: 137, errHas: "sandbox killed by signal SIGKILL"},
		{name: "setup failed", stderr: "bwrap: Can't mkdir /workspace: Read-only file system\n", exit: processExit{ExitCode: 1},
			state: executorapi.StateFailed, code: -1, errHas: "Can't mkdir /workspace"},
		{name: "user stderr with status 1", stderr: "Traceback...\n", exit: processExit{ExitCode: 1}, state: executorapi.StateCompleted, code: 1},
		{name: "wait failed", exit: processExit{ExitCode: -1, Err: errors.New("boom")}, state: executorapi.StateFailed, code: -1, errHas: "boom"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			res := executorapi.Result{State: executorapi.StateCompleted, Stderr: tc.stderr}
			classifyExit(&res, tc.exit)
			if res.State != tc.state || res.ExitCode != tc.code || (tc.errHas == "") != (res.Error == "") || !strings.Contains(res.Error, tc.errHas) {
				t.Errorf("got %s %d %q, want %s %d containing %q", res.State, res.ExitCode, res.Error, tc.state, tc.code, tc.errHas)
			}
		})
	}
}

package main

import (
	"bytes"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	sandboxv1 "github.com/sandboxhq/sandbox/api/gen/sandbox/v1"
)

// tableLines splits a table into lines of fields.
func tableLines(out string) [][]string {
	var rows [][]string
	for _, l := range strings.Split(strings.TrimRight(out, "\n"), "\n") {
		rows = append(rows, strings.Fields(l))
	}
	return rows
}

func TestClusterStatus(t *testing.T) {
	f := newFakeAPI()
	addr := f.serve(t)

	r := runCLI(t, addr, invocation{}, "cluster", "status")
	if r.code != 0 {
		t.Fatalf("exit code = %d, stderr %q", r.code, r.stderr)
	}
	want := [][]string{
		{"ID", "ADDRESS", "API", "ROLE", "VOTER"},
		{"server-1", "10.0.0.1:7402", "10.0.0.1:7400", "LEADER", "true"},
		{"server-2", "10.0.0.2:7402", "10.0.0.2:7400", "FOLLOWER", "true"},
		{"server-3", "10.0.0.3:7402", "10.0.0.3:7400", "NONVOTER", "false"},
		nil,
		strings.Fields("leader server-1, term 7, commit index 1042, applied index 1040 (as seen by server-2)"),
	}
	if got := tableLines(r.stdout); !slices.EqualFunc(got, want, slices.Equal) {
		t.Errorf("stdout:\n%s\nwant rows %q", r.stdout, want)
	}

	r = runCLI(t, addr, invocation{}, "cluster", "status", "-o", "json")
	var st sandboxv1.GetClusterStatusResponse
	if err := protojson.Unmarshal([]byte(r.stdout), &st); err != nil {
		t.Fatalf("not a GetClusterStatusResponse: %v\n%s", err, r.stdout)
	}
	if !proto.Equal(&st, f.status) {
		t.Errorf("json = %v, want %v", &st, f.status)
	}
	if !strings.Contains(r.stdout, `"role": "SERVER_ROLE_LEADER"`) || !strings.Contains(r.stdout, `"commitIndex": "1042"`) {
		t.Errorf("json lacks the role or the commit index:\n%s", r.stdout)
	}

	f.mu.Lock()
	f.status.LeaderId = ""
	f.mu.Unlock()
	r = runCLI(t, addr, invocation{}, "cluster", "status")
	if !strings.Contains(r.stdout, "leader none, term 7") {
		t.Errorf("without a leader, stdout = %s", r.stdout)
	}
}

func TestClusterNodes(t *testing.T) {
	f := newFakeAPI()
	addr := f.serve(t)

	r := runCLI(t, addr, invocation{}, "cluster", "nodes")
	if r.code != 0 {
		t.Fatalf("exit code = %d, stderr %q", r.code, r.stderr)
	}
	want := [][]string{
		{"ID", "ADDRESS", "STATE", "CPU", "MEMORY", "SESSIONS", "WARM", "AGE"},
		{"agent-1", "10.0.1.1:7500", "ready", "1500m/4000m", "512/8192MiB", "2", "nodejs-basic=1,python-basic=3", "3h"},
		{"agent-2", "10.0.1.2:7500", "dead", "0m/2000m", "0/4096MiB", "0", "-", "1m"},
	}
	if got := tableLines(r.stdout); !slices.EqualFunc(got, want, slices.Equal) {
		t.Errorf("stdout:\n%s\nwant rows %q", r.stdout, want)
	}

	r = runCLI(t, addr, invocation{}, "cluster", "nodes", "-o", "json")
	var list sandboxv1.ListNodesResponse
	if err := protojson.Unmarshal([]byte(r.stdout), &list); err != nil {
		t.Fatalf("not a ListNodesResponse: %v\n%s", err, r.stdout)
	}
	if len(list.GetNodes()) != 2 || !proto.Equal(list.GetNodes()[0], f.nodes[0]) || list.GetNodes()[1].GetStateReason() != "missed probes" {
		t.Errorf("json = %s", r.stdout)
	}
}

func TestClusterChanges(t *testing.T) {
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantStdout string
		wantStderr string
		// check inspects the fake afterwards.
		check func(t *testing.T, f *fakeAPI)
	}{
		{
			name: "drain", args: []string{"cluster", "drain", "agent-1"}, wantStdout: "agent-1 draining\n",
			check: func(t *testing.T, f *fakeAPI) {
				if !slices.Equal(f.drained, []string{"agent-1"}) {
					t.Errorf("drained %v", f.drained)
				}
			},
		},
		{
			name: "drain json", args: []string{"cluster", "drain", "-o", "json", "agent-2"}, wantStdout: `"state": "NODE_STATE_DRAINING"`,
		},
		{
			name: "drain unknown node", args: []string{"cluster", "drain", "agent-9"}, wantCode: exitError,
			wantStderr: "sandboxctl: not_found: node agent-9: node \"agent-9\" not found\n",
		},
		{name: "drain needs a node", args: []string{"cluster", "drain"}, wantCode: exitUsage, wantStderr: "missing arguments"},
		{
			name: "join", args: []string{"cluster", "join", "10.0.0.4:7401"}, wantStdout: "server-4\n",
			check: func(t *testing.T, f *fakeAPI) {
				if !slices.Equal(f.joined, []string{"10.0.0.4:7401"}) {
					t.Errorf("joined %v", f.joined)
				}
			},
		},
		{
			name: "join json", args: []string{"cluster", "join", "h4:7401", "-o", "json"}, wantStdout: `"internalAddress": "h4:7401"`,
		},
		{
			name: "join needs host:port", args: []string{"cluster", "join", "10.0.0.4"}, wantCode: exitUsage, wantStderr: "host:port",
			check: func(t *testing.T, f *fakeAPI) {
				if len(f.joined) != 0 {
					t.Errorf("joined %v", f.joined)
				}
			},
		},
		{
			name: "remove", args: []string{"cluster", "remove", "server-3"}, wantStdout: "server-3\n",
			check: func(t *testing.T, f *fakeAPI) {
				if !slices.Equal(f.removed, []string{"server-3"}) || len(f.status.Servers) != 2 {
					t.Errorf("removed %v, servers left %v", f.removed, f.status.Servers)
				}
			},
		},
		{
			name: "remove unknown server", args: []string{"cluster", "remove", "server-9"}, wantCode: exitError,
			wantStderr: "sandboxctl: not_found: server server-9: ",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeAPI()
			addr := f.serve(t)
			r := runCLI(t, addr, invocation{}, tt.args...)
			if r.code != tt.wantCode {
				t.Fatalf("exit code = %d, want %d (stderr %q)", r.code, tt.wantCode, r.stderr)
			}
			if !strings.Contains(r.stdout, tt.wantStdout) {
				t.Errorf("stdout = %q, want %q", r.stdout, tt.wantStdout)
			}
			if !strings.Contains(r.stderr, tt.wantStderr) {
				t.Errorf("stderr = %q, want %q", r.stderr, tt.wantStderr)
			}
			if tt.check != nil {
				f.mu.Lock()
				defer f.mu.Unlock()
				tt.check(t, f)
			}
		})
	}
}

// randomBytes returns n random bytes.
func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

func TestSnapshotSave(t *testing.T) {
	data := randomBytes(t, 200_000)
	tests := []struct {
		name        string
		data        []byte
		failure     error
		out         string
		wantCode    int
		wantStdout  []byte
		wantFile    bool
		wantStderr  string
		wantNothing bool
	}{
		{name: "file", data: data, out: "backup.snap", wantFile: true, wantStderr: "wrote 200000 bytes of snapshot to backup.snap"},
		{name: "stdout", data: data, out: "-", wantStdout: data, wantStderr: "wrote 200000 bytes of snapshot to stdout"},
		{
			name: "broken stream leaves nothing", data: data, out: "backup.snap", failure: connect.NewError(connect.CodeUnavailable, errors.New("leader lost")),
			wantCode: exitError, wantStderr: "sandboxctl: unavailable: save snapshot: leader lost",
		},
		{name: "empty snapshot leaves nothing", out: "backup.snap", wantCode: exitError, wantStderr: "empty snapshot"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeAPI()
			f.snapshotData, f.snapshotErr = tt.data, tt.failure
			addr := f.serve(t)
			cwd := t.TempDir()
			r := runCLI(t, addr, invocation{cwd: cwd}, "cluster", "snapshot", "save", tt.out)
			if r.code != tt.wantCode {
				t.Fatalf("exit code = %d, want %d (stderr %q)", r.code, tt.wantCode, r.stderr)
			}
			if !strings.Contains(r.stderr, tt.wantStderr) {
				t.Errorf("stderr = %q, want %q", r.stderr, tt.wantStderr)
			}
			if !bytes.Equal([]byte(r.stdout), tt.wantStdout) {
				t.Errorf("stdout has %d bytes, want %d, equal to the snapshot", len(r.stdout), len(tt.wantStdout))
			}
			files := dirEntries(t, cwd)
			if !tt.wantFile {
				if len(files) != 0 {
					t.Errorf("working directory holds %v, want nothing (not even a temporary file)", files)
				}
				return
			}
			if !slices.Equal(files, []string{tt.out}) {
				t.Fatalf("working directory holds %v, want [%s]", files, tt.out)
			}
			got, err := os.ReadFile(filepath.Join(cwd, tt.out))
			if err != nil || !bytes.Equal(got, tt.data) {
				t.Errorf("%s: %d bytes (%v), want the %d bytes of the snapshot", tt.out, len(got), err, len(tt.data))
			}
			if fi, err := os.Stat(filepath.Join(cwd, tt.out)); err != nil || fi.Mode().Perm() != 0o600 {
				t.Errorf("%s: mode %v (%v), want 0600", tt.out, fi.Mode(), err)
			}
		})
	}
}

func TestSnapshotRestore(t *testing.T) {
	data := randomBytes(t, 150_000)
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "backup.snap"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "empty.snap"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name       string
		args       []string
		stdin      string
		tty        bool
		wantCode   int
		wantStderr string
		wantCalls  int
	}{
		{name: "yes flag", args: []string{"backup.snap", "--yes"}, wantCalls: 1, wantStderr: "restored the cluster's state from backup.snap (150000 bytes)"},
		{name: "confirmed on the terminal", args: []string{"backup.snap"}, tty: true, stdin: "yes\n", wantCalls: 1, wantStderr: "Type yes to continue"},
		{name: "declined on the terminal", args: []string{"backup.snap"}, tty: true, stdin: "no\n", wantCode: exitError, wantStderr: "aborted, nothing was changed"},
		{name: "no answer", args: []string{"backup.snap"}, tty: true, stdin: "", wantCode: exitError, wantStderr: "aborted"},
		{name: "no terminal and no --yes", args: []string{"backup.snap"}, stdin: "yes\n", wantCode: exitUsage, wantStderr: "run with --yes"},
		{name: "stdin", args: []string{"-", "--yes"}, stdin: string(data), wantCalls: 1},
		{name: "stdin needs --yes", args: []string{"-"}, stdin: string(data), wantCode: exitUsage, wantStderr: "needs --yes"},
		{name: "missing file", args: []string{"nope.snap", "--yes"}, wantCode: exitError, wantStderr: "no such file"},
		{name: "empty file", args: []string{"empty.snap", "--yes"}, wantCode: exitError, wantStderr: "empty.snap is empty"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeAPI()
			addr := f.serve(t)
			r := runCLI(t, addr, invocation{cwd: dir, tty: tt.tty, stdin: tt.stdin}, append([]string{"cluster", "snapshot", "restore"}, tt.args...)...)
			if r.code != tt.wantCode {
				t.Fatalf("exit code = %d, want %d (stderr %q)", r.code, tt.wantCode, r.stderr)
			}
			if !strings.Contains(r.stderr, tt.wantStderr) {
				t.Errorf("stderr = %q, want %q", r.stderr, tt.wantStderr)
			}
			f.mu.Lock()
			defer f.mu.Unlock()
			if f.restoreCalls != tt.wantCalls {
				t.Fatalf("%d RestoreSnapshot calls, want %d", f.restoreCalls, tt.wantCalls)
			}
			if tt.wantCalls == 0 {
				return
			}
			var sizes []int
			for _, c := range f.restored {
				sizes = append(sizes, len(c))
			}
			if want := []int{65536, 65536, 150_000 - 2*65536}; !slices.Equal(sizes, want) {
				t.Errorf("chunk sizes %v, want %v", sizes, want)
			}
			if got := bytes.Join(f.restored, nil); !bytes.Equal(got, data) {
				t.Errorf("reassembled %d bytes, not the file's %d", len(got), len(data))
			}
		})
	}
}

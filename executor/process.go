package executor

import (
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sandboxhq/sandbox"
)

// Paths as user code sees them.
const (
	// sandboxWorkspace is where the workspace is bound inside the sandbox. The
	// directory must exist in the root filesystem (it does in the template
	// images): bwrap cannot create a mount point on the read-only root bind.
	sandboxWorkspace = "/workspace"
	// sandboxRun is replaced by an empty tmpfs, which hides the socket
	// directory (executorapi.SocketDir, below it) and with it the executor's
	// and the agent's sockets: a unix socket stays connectable through a
	// read-only bind, so it must not be visible at all.
	sandboxRun = "/run"
	// sandboxCodeDir holds the code file, on that tmpfs.
	sandboxCodeDir = "/run/code"
	// codeFD is the descriptor bwrap reads the code from (the first of ExtraFiles).
	codeFD = 3
	// SeccompFD is the descriptor bwrap reads user code's seccomp filter
	// from (the second of ExtraFiles; see SeccompFile).
	SeccompFD = 4
)

// basePath is the PATH user code starts with, and the one interpreters are resolved on.
const basePath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// interpreter says how one language runs: the program and the code file's name.
type interpreter struct {
	program string
	file    string
}

var interpreters = map[string]interpreter{
	sandbox.LanguagePython: {program: "python3", file: "main.py"},
	sandbox.LanguageNode:   {program: "node", file: "main.js"},
	sandbox.LanguageBash:   {program: "bash", file: "main.sh"},
}

// baseEnv is the environment every execution starts from; the session's env
// and then the execution's env are laid over it.
func baseEnv() map[string]string { return BaseEnv() }

// BaseEnv is the environment every execution starts from (exported for the
// benchmark's floors, which run the executor's sandbox).
func BaseEnv() map[string]string {
	return map[string]string{
		"PATH":             basePath,
		"HOME":             sandboxWorkspace,
		"LANG":             "C.UTF-8",
		"PYTHONUNBUFFERED": "1",
	}
}

// mergeEnv lays each layer over the previous ones.
func mergeEnv(layers ...map[string]string) map[string]string {
	out := map[string]string{}
	for _, l := range layers {
		maps.Copy(out, l)
	}
	return out
}

// processSpec is one program to run under bubblewrap.
type processSpec struct {
	// Bwrap is the bubblewrap binary.
	Bwrap string
	// Workspace is the host directory bound at /workspace.
	Workspace string
	Language  string
	Code      string
	Env       map[string]string
	// Stdout and Stderr receive the output as it is produced; they must not
	// block for long (a cappedBuffer never does).
	Stdout, Stderr io.Writer
}

// bwrapArgs is bubblewrap's command line for an interpreter in the
// executor's container: its root filesystem and /tmp, the given workspace.
func bwrapArgs(workspace, interpreterPath, codeFile string, env map[string]string) []string {
	return BwrapArgs(BwrapMounts{Root: "/", Workspace: workspace, Tmp: "/tmp"}, interpreterPath, codeFile, env)
}

// BwrapMounts are the host paths a sandbox's root filesystem, workspace and
// /tmp come from.
type BwrapMounts struct {
	Root, Workspace, Tmp string
}

// BwrapArgs is bubblewrap's command line for an interpreter (an absolute
// path in the sandbox) running the code file, which bubblewrap reads from
// file descriptor 3, under the seccomp filter it reads from descriptor 4
// (SeccompFile). Mounts apply in order, so each later one covers what an
// earlier one put at that path: the root goes first, then /proc, /dev, the
// workspace, /tmp, the /run tmpfs and the code file on it. It is exported so
// that the benchmark's floor runs exactly the executor's sandbox.
func BwrapArgs(m BwrapMounts, interpreterPath, codeFile string, env map[string]string) []string {
	codePath := sandboxCodeDir + "/" + codeFile
	args := []string{
		"--unshare-all",
		// --unshare-all only tries the user namespace; ask for it outright so
		// that --disable-userns can stop user code from making nested ones.
		"--unshare-user", "--disable-userns",
		"--die-with-parent", "--new-session", "--clearenv",
		"--ro-bind", m.Root, "/",
		"--proc", "/proc",
		"--dev", "/dev",
		"--bind", m.Workspace, sandboxWorkspace,
		"--bind", m.Tmp, "/tmp",
		"--tmpfs", sandboxRun,
		"--ro-bind-data", fmt.Sprint(codeFD), codePath,
		"--hostname", "sandbox",
		"--seccomp", fmt.Sprint(SeccompFD),
		"--chdir", sandboxWorkspace,
	}
	for _, k := range slices.Sorted(maps.Keys(env)) {
		args = append(args, "--setenv", k, env[k])
	}
	return append(args, "--", interpreterPath, codePath)
}

// lookPath finds program in the directories of path, as the sandbox's
// base PATH would (the sandbox sees the same root filesystem read-only).
func lookPath(program, path string) (string, error) {
	for _, dir := range filepath.SplitList(path) {
		p := filepath.Join(dir, program)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found in %s", program, path)
}

// process is one running bubblewrap sandbox. It is the building block of a
// one-shot execution and, later, of a streamed process service: output goes
// to the spec's writers as it arrives.
type process struct {
	cmd     *exec.Cmd
	started time.Time
	done    chan struct{} // closed when the process has exited and its output is drained
	exit    processExit   // valid after done

	mu     sync.Mutex
	exited bool // the leader has been reaped; its group id may be reused
}

// processExit is how a process ended.
type processExit struct {
	// ExitCode is bwrap's exit status. bwrap exits with 128+N when the
	// program was killed by signal N.
	ExitCode int
	// Signal is set when bwrap itself was killed by a signal.
	Signal syscall.Signal
	// Err is a failure to wait for the process at all.
	Err error
}

// errStart marks a process that could not be started (no bwrap, no interpreter).
var errStart = errors.New("cannot start sandbox")

// startProcess starts spec under bubblewrap. start runs cmd.Start (the
// reaper wraps it to track the child); nil means cmd.Start.
func startProcess(spec processSpec, start func(*exec.Cmd) error, wait func(*exec.Cmd) error) (*process, error) {
	in, ok := interpreters[spec.Language]
	if !ok {
		return nil, fmt.Errorf("%w: unknown language %q", errStart, spec.Language)
	}
	interp, err := lookPath(in.program, basePath)
	if err != nil {
		return nil, fmt.Errorf("%w: %s interpreter: %w", errStart, spec.Language, err)
	}
	code, err := codeFile(spec.Code)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errStart, err)
	}
	defer code.Close()
	filter, err := SeccompFile()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errStart, err)
	}
	defer filter.Close()
	outR, outW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("%w: stdout pipe: %w", errStart, err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return nil, fmt.Errorf("%w: stderr pipe: %w", errStart, err)
	}
	cmd := exec.Command(spec.Bwrap, bwrapArgs(spec.Workspace, interp, in.file, spec.Env)...)
	// bwrap gets an empty environment: nothing of the executor's (its token
	// included) reaches it, and --clearenv keeps it from user code anyway.
	cmd.Env = []string{}
	cmd.Stdin = nil // /dev/null
	cmd.Stdout = outW
	cmd.Stderr = errW
	cmd.ExtraFiles = []*os.File{code, filter}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Its own process group, so a timeout kills bwrap and everything
		// still in its group at once; the pid namespace takes the rest.
		Setpgid:   true,
		Pdeathsig: syscall.SIGKILL,
	}
	if start == nil {
		start = (*exec.Cmd).Start
	}
	if wait == nil {
		wait = (*exec.Cmd).Wait
	}
	err = start(cmd)
	// The child has its copies; ours must go so EOF comes when it exits.
	outW.Close()
	errW.Close()
	if err != nil {
		outR.Close()
		errR.Close()
		return nil, fmt.Errorf("%w: %s: %w", errStart, spec.Bwrap, err)
	}
	p := &process{cmd: cmd, started: time.Now(), done: make(chan struct{})}
	var copies sync.WaitGroup
	copies.Add(2)
	go drain(&copies, outR, spec.Stdout)
	go drain(&copies, errR, spec.Stderr)
	go p.waitAndDrain(wait, &copies, outR, errR)
	return p, nil
}

// drain copies r into w until EOF or until r's deadline passes.
func drain(wg *sync.WaitGroup, r *os.File, w io.Writer) {
	defer wg.Done()
	_, _ = io.Copy(w, r)
}

// drainGrace is how long output may keep flowing after bwrap exited. The
// pid namespace dies with bwrap, so the pipes close at once in practice;
// the deadline only guards against a writer that somehow outlived it.
const drainGrace = 2 * time.Second

// waitAndDrain reaps the process, then waits for its output to be drained.
func (p *process) waitAndDrain(wait func(*exec.Cmd) error, copies *sync.WaitGroup, outR, errR *os.File) {
	defer close(p.done)
	err := wait(p.cmd)
	p.mu.Lock()
	p.exited = true
	p.mu.Unlock()

	drained := make(chan struct{})
	go func() { copies.Wait(); close(drained) }()
	select {
	case <-drained:
	case <-time.After(drainGrace):
		_ = outR.SetReadDeadline(time.Now())
		_ = errR.SetReadDeadline(time.Now())
		<-drained
	}
	outR.Close()
	errR.Close()

	var ee *exec.ExitError
	switch {
	case err == nil:
		p.exit.ExitCode = 0
	case errors.As(err, &ee):
		ws, _ := ee.Sys().(syscall.WaitStatus)
		if ws.Signaled() {
			p.exit.Signal = ws.Signal()
			p.exit.ExitCode = 128 + int(ws.Signal())
		} else {
			p.exit.ExitCode = ws.ExitStatus()
		}
	default:
		p.exit.ExitCode = -1
		p.exit.Err = err
	}
}

// Kill kills the process group: bwrap and whatever is still in its group.
// bwrap dying takes its pid namespace, and so all of user code, with it.
// Once the leader has been reaped Kill does nothing, so a recycled group id
// is not signalled.
func (p *process) Kill() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.exited {
		return
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
}

// codeFile puts the code in an anonymous memory file for bwrap's
// --ro-bind-data: no argv length limit, nothing written to disk.
func codeFile(code string) (*os.File, error) {
	return MemFile("code", []byte(code))
}

// MemFile returns an anonymous memory file holding data, positioned at its
// start, for a child to read from an inherited descriptor (the code, the
// seccomp filter). The benchmark's floor uses it to hand bubblewrap the
// same files the executor does.
func MemFile(name string, data []byte) (*os.File, error) {
	fd, err := unix.MemfdCreate(name, unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("%s memfd: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), name)
	if _, err := f.Write(data); err != nil {
		f.Close()
		return nil, fmt.Errorf("write %s: %w", name, err)
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		f.Close()
		return nil, fmt.Errorf("rewind %s: %w", name, err)
	}
	return f, nil
}

// signalName names a signal for people: "SIGKILL".
func signalName(s syscall.Signal) string {
	if n := unix.SignalName(s); n != "" {
		return n
	}
	return fmt.Sprintf("signal %d", int(s))
}

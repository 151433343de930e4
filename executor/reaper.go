package executor

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// reaper reaps orphaned descendants, a container PID 1's duty.
//
// Who becomes an orphan here: bwrap forks the init of its pid namespace; when
// a timeout SIGKILLs bwrap's process group, that init can outlive bwrap for
// a moment and is re-parented to the executor (as PID 1, or as a child
// subreaper). Nothing else would ever wait for it.
//
// Why it cannot steal an exit status from exec.Cmd.Wait: it never calls
// wait on "any child". Each pass lists the executor's zombie children from
// /proc and reaps, by pid, only those it does not track. Every child the
// executor starts itself is tracked from the moment it exists: Start and the
// tracking happen under mu held for reading, and a reaping pass holds mu for
// writing, so a pass can never see one of our children before it is tracked;
// a child is untracked only after its Wait has returned. A tracked child
// that is a zombie is left for its Wait.
type reaper struct {
	log *slog.Logger

	mu      sync.RWMutex // read: Start+track in progress; write: a reaping pass
	trackMu sync.Mutex
	tracked map[int]struct{}
}

// newReaper makes the process a child subreaper, so orphans reach it even
// when it is not PID 1 (under tests, or under an init like tini).
func newReaper(log *slog.Logger) (*reaper, error) {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return nil, fmt.Errorf("become child subreaper: %w", err)
	}
	return &reaper{log: log, tracked: map[int]struct{}{}}, nil
}

// start starts cmd and tracks its pid before any reaping pass can look.
func (r *reaper) start(cmd *exec.Cmd) error {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if err := cmd.Start(); err != nil {
		return err
	}
	r.trackMu.Lock()
	r.tracked[cmd.Process.Pid] = struct{}{}
	r.trackMu.Unlock()
	return nil
}

// wait waits for cmd and only then stops tracking it.
func (r *reaper) wait(cmd *exec.Cmd) error {
	err := cmd.Wait()
	r.trackMu.Lock()
	delete(r.tracked, cmd.Process.Pid)
	r.trackMu.Unlock()
	return err
}

// run reaps on every SIGCHLD, and every few seconds in case signals were
// coalesced, until ctx ends.
func (r *reaper) run(ctx context.Context) {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGCHLD)
	defer signal.Stop(sigs)
	tick := time.NewTicker(5 * time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-sigs:
		case <-tick.C:
		}
		r.reapOnce()
	}
}

// reapOnce reaps every untracked zombie child and reports how many.
func (r *reaper) reapOnce() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, pid := range zombieChildren(os.Getpid()) {
		r.trackMu.Lock()
		_, ours := r.tracked[pid]
		r.trackMu.Unlock()
		if ours {
			continue
		}
		var ws unix.WaitStatus
		if got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil); err == nil && got == pid {
			n++
			r.log.Debug("reaped orphan", "pid", pid, "status", ws.ExitStatus(), "signal", ws.Signal())
		}
	}
	return n
}

// zombieChildren lists the zombies whose parent is ppid, from /proc.
func zombieChildren(ppid int) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		state, parent, ok := procState(pid)
		if ok && state == 'Z' && parent == ppid {
			out = append(out, pid)
		}
	}
	return out
}

// procState reads a process's state letter and parent pid from /proc/PID/stat.
func procState(pid int) (state byte, ppid int, ok bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, false
	}
	// "pid (comm) S ppid ...": comm may hold spaces and parentheses, so
	// parse from the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, false
	}
	f := bytes.Fields(b[i+1:])
	if len(f) < 2 || len(f[0]) != 1 {
		return 0, 0, false
	}
	ppid, err = strconv.Atoi(string(f[1]))
	if err != nil {
		return 0, 0, false
	}
	return f[0][0], ppid, true
}

package executor

import (
	"os"
	"os/exec"
	"slices"
	"testing"
	"time"
)

// waitZombie polls until pid is a zombie child of this process.
func waitZombie(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !slices.Contains(zombieChildren(os.Getpid()), pid) {
		if time.Now().After(deadline) {
			t.Fatalf("pid %d never became a zombie child", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestReaperLeavesTrackedChildren checks the property the reaper's design
// rests on: it reaps untracked zombies and never a tracked child, whose
// exit status its own Wait still gets. (The reaper is built without
// becoming a subreaper, so this test binary is unchanged.)
func TestReaperLeavesTrackedChildren(t *testing.T) {
	r := &reaper{log: quietLog(), tracked: map[int]struct{}{}}

	ours := exec.Command("sh", "-c", "exit 7")
	if err := r.start(ours); err != nil {
		t.Fatal(err)
	}
	orphan := exec.Command("sh", "-c", "exit 3")
	if err := orphan.Start(); err != nil { // not tracked: stands in for an orphan
		t.Fatal(err)
	}
	waitZombie(t, ours.Process.Pid)
	waitZombie(t, orphan.Process.Pid)

	if n := r.reapOnce(); n != 1 {
		t.Errorf("reaped %d, want 1 (the untracked child only)", n)
	}
	if slices.Contains(zombieChildren(os.Getpid()), orphan.Process.Pid) {
		t.Error("untracked zombie left")
	}
	err := r.wait(ours)
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 7 {
		t.Errorf("tracked child's Wait: %v, want exit status 7", err)
	}
	if len(r.tracked) != 0 {
		t.Errorf("still tracking %v", r.tracked)
	}
	_ = orphan.Wait() // already reaped: ECHILD, nothing left behind
}

func TestProcState(t *testing.T) {
	state, ppid, ok := procState(os.Getpid())
	if !ok || ppid != os.Getppid() || state == 'Z' {
		t.Errorf("procState(self) = %c %d %v", state, ppid, ok)
	}
	if _, _, ok := procState(-1); ok {
		t.Error("procState of a missing process succeeded")
	}
}

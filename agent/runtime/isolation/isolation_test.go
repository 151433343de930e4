package isolation

import (
	"errors"
	"slices"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/agent/runtime"
)

func validSpec() runtime.Spec {
	return runtime.Spec{
		ID:        "c1",
		Image:     "localhost/sandbox/python-basic:latest",
		Limits:    sandbox.Limits{CPUMillis: 1500, MemoryMiB: 256, Pids: 100, DiskMiB: 64},
		SocketDir: "/var/lib/sandbox/sockets/c1",
	}
}

func TestValidateSpec(t *testing.T) {
	cases := []struct {
		name   string
		modify func(*runtime.Spec)
		ok     bool
	}{
		{"valid", func(*runtime.Spec) {}, true},
		{"no id", func(s *runtime.Spec) { s.ID = "" }, false},
		{"no image", func(s *runtime.Spec) { s.Image = "" }, false},
		{"no socket dir", func(s *runtime.Spec) { s.SocketDir = "" }, false},
		{"relative socket dir", func(s *runtime.Spec) { s.SocketDir = "sockets" }, false},
		{"relative log path", func(s *runtime.Spec) { s.LogPath = "x.log" }, false},
		{"zero cpu", func(s *runtime.Spec) { s.Limits.CPUMillis = 0 }, false},
		{"zero memory", func(s *runtime.Spec) { s.Limits.MemoryMiB = 0 }, false},
		{"zero pids", func(s *runtime.Spec) { s.Limits.Pids = 0 }, false},
		{"zero disk", func(s *runtime.Spec) { s.Limits.DiskMiB = 0 }, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := validSpec()
			c.modify(&s)
			err := ValidateSpec(s)
			if c.ok != (err == nil) {
				t.Fatalf("ValidateSpec = %v, want ok=%v", err, c.ok)
			}
			if err != nil && !errors.Is(err, sandbox.ErrInvalidArgument) {
				t.Errorf("error %v is not ErrInvalidArgument", err)
			}
		})
	}
}

func TestValidateUpdate(t *testing.T) {
	ok := sandbox.Limits{CPUMillis: 100, MemoryMiB: 64, Pids: 10, DiskMiB: 16}
	if err := ValidateUpdate("c1", ok, 16); err != nil {
		t.Fatalf("ValidateUpdate(%+v) = %v", ok, err)
	}
	for name, l := range map[string]sandbox.Limits{
		"zero cpu":    {MemoryMiB: 64, Pids: 10, DiskMiB: 16},
		"zero memory": {CPUMillis: 100, Pids: 10, DiskMiB: 16},
		"zero pids":   {CPUMillis: 100, MemoryMiB: 64, DiskMiB: 16},
		"other disk":  {CPUMillis: 100, MemoryMiB: 64, Pids: 10, DiskMiB: 32},
	} {
		if err := ValidateUpdate("c1", l, 16); !errors.Is(err, sandbox.ErrInvalidArgument) {
			t.Errorf("%s: ValidateUpdate = %v, want ErrInvalidArgument", name, err)
		}
	}
}

// TestSeccompProfile: the container's profile is Docker's default for a
// container without capabilities (everything unlisted is EPERM), widened
// by bubblewrap's calls only; never unconfined.
func TestSeccompProfile(t *testing.T) {
	p := SeccompProfile()
	if p == nil || p.DefaultAction != specs.ActErrno || len(p.Architectures) == 0 {
		t.Fatalf("seccomp profile %+v: want a default action of errno over the native architectures", p)
	}
	allowed := map[string]bool{}
	conditional := map[string]bool{}
	for _, r := range p.Syscalls {
		for _, n := range r.Names {
			if r.Action == specs.ActAllow {
				if len(r.Args) == 0 {
					allowed[n] = true
				} else {
					conditional[n] = true
				}
			}
		}
	}
	for _, n := range append(slices.Clone(BubblewrapSyscalls), "read", "execve", "seccomp", "prctl") {
		if !allowed[n] {
			t.Errorf("%s is not allowed: bubblewrap or ordinary code needs it", n)
		}
	}
	for _, n := range []string{"keyctl", "add_key", "request_key", "bpf", "perf_event_open", "setns", "kexec_load",
		"init_module", "open_by_handle_at", "reboot", "swapon", "acct", "clone3", "fsopen", "move_mount"} {
		if allowed[n] || conditional[n] {
			t.Errorf("%s is allowed", n)
		}
	}
}

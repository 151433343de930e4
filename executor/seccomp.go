package executor

import (
	"encoding/binary"
	"fmt"
	"os"
	"runtime"
	"sync"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// The user-code seccomp filter, which bubblewrap installs (--seccomp) right
// before it executes the interpreter, so that it binds user code and not
// bubblewrap itself. The container's own profile had to allow what
// bubblewrap needs to build its sandbox (new namespaces, mounts,
// pivot_root); this filter takes those back, and refuses the calls that
// reach into other processes or the kernel's shared state: ptrace, keyrings,
// bpf, perf events, and terminal input injection (TIOCSTI). A refused call
// fails with EPERM, as code expects of a forbidden operation, rather than
// killing the process.

// deniedSyscalls fail with EPERM for user code.
var deniedSyscalls = []struct {
	name string
	nr   uint32
}{
	{"mount", unix.SYS_MOUNT},
	{"umount2", unix.SYS_UMOUNT2},
	{"pivot_root", unix.SYS_PIVOT_ROOT},
	{"chroot", unix.SYS_CHROOT},
	{"unshare", unix.SYS_UNSHARE},
	{"setns", unix.SYS_SETNS},
	{"move_mount", unix.SYS_MOVE_MOUNT},
	{"open_tree", unix.SYS_OPEN_TREE},
	{"fsopen", unix.SYS_FSOPEN},
	{"fsconfig", unix.SYS_FSCONFIG},
	{"fsmount", unix.SYS_FSMOUNT},
	{"fspick", unix.SYS_FSPICK},
	{"mount_setattr", unix.SYS_MOUNT_SETATTR},
	{"ptrace", unix.SYS_PTRACE},
	{"process_vm_readv", unix.SYS_PROCESS_VM_READV},
	{"process_vm_writev", unix.SYS_PROCESS_VM_WRITEV},
	{"keyctl", unix.SYS_KEYCTL},
	{"add_key", unix.SYS_ADD_KEY},
	{"request_key", unix.SYS_REQUEST_KEY},
	{"bpf", unix.SYS_BPF},
	{"perf_event_open", unix.SYS_PERF_EVENT_OPEN},
	{"userfaultfd", unix.SYS_USERFAULTFD},
	{"open_by_handle_at", unix.SYS_OPEN_BY_HANDLE_AT},
	{"name_to_handle_at", unix.SYS_NAME_TO_HANDLE_AT},
	{"kexec_load", unix.SYS_KEXEC_LOAD},
	{"init_module", unix.SYS_INIT_MODULE},
	{"finit_module", unix.SYS_FINIT_MODULE},
	{"delete_module", unix.SYS_DELETE_MODULE},
	{"acct", unix.SYS_ACCT},
	{"swapon", unix.SYS_SWAPON},
	{"swapoff", unix.SYS_SWAPOFF},
	{"reboot", unix.SYS_REBOOT},
	{"sethostname", unix.SYS_SETHOSTNAME},
	{"setdomainname", unix.SYS_SETDOMAINNAME},
}

// cloneNamespaceFlags are clone's flags that make new namespaces: user code
// may create threads and processes, not namespaces.
const cloneNamespaceFlags = unix.CLONE_NEWNS | unix.CLONE_NEWCGROUP | unix.CLONE_NEWUTS | unix.CLONE_NEWIPC |
	unix.CLONE_NEWUSER | unix.CLONE_NEWPID | unix.CLONE_NEWNET | unix.CLONE_NEWTIME

// Offsets in struct seccomp_data: nr, arch, instruction pointer, args[6].
const (
	seccompNR     = 0
	seccompArch   = 4
	seccompArg0   = 16 // low 32 bits on a little-endian machine
	seccompArg1   = 24
	auditArchX86  = 0xC000003E // AUDIT_ARCH_X86_64
	auditArchArm  = 0xC00000B7 // AUDIT_ARCH_AARCH64
	x32SyscallBit = 0x40000000
)

// seccompProgram is the filter as the kernel reads it (struct sock_filter
// entries), built once.
var seccompProgram = sync.OnceValues(buildSeccompProgram)

// buildSeccompProgram assembles the filter for this machine's architecture.
// A call from another architecture (on amd64: the x32 ABI, or 32-bit
// int 0x80) is refused outright: its syscall numbers differ, so none of the
// rules below would match it.
func buildSeccompProgram() ([]byte, error) {
	var arch uint32
	switch runtime.GOARCH {
	case "amd64":
		arch = auditArchX86
	case "arm64":
		arch = auditArchArm
	default:
		return nil, fmt.Errorf("no user-code seccomp filter for %s", runtime.GOARCH)
	}
	errno := func(e unix.Errno) bpf.Instruction {
		return bpf.RetConstant{Val: unix.SECCOMP_RET_ERRNO | uint32(e)}
	}
	allow := bpf.RetConstant{Val: unix.SECCOMP_RET_ALLOW}

	// Labels are resolved by hand below: the program is a straight list of
	// checks, each jumping forward to one of the shared tails at its end.
	var prog []bpf.Instruction
	type fixup struct{ at int }
	var toDeny, toClone, toIoctl, toNoSys []fixup
	prog = append(prog,
		bpf.LoadAbsolute{Off: seccompArch, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: arch, SkipTrue: 1},
		bpf.RetConstant{Val: unix.SECCOMP_RET_KILL_PROCESS},
		bpf.LoadAbsolute{Off: seccompNR, Size: 4},
	)
	if runtime.GOARCH == "amd64" {
		toDeny = append(toDeny, fixup{len(prog)})
		prog = append(prog, bpf.JumpIf{Cond: bpf.JumpGreaterOrEqual, Val: x32SyscallBit})
	}
	for _, d := range deniedSyscalls {
		toDeny = append(toDeny, fixup{len(prog)})
		prog = append(prog, bpf.JumpIf{Cond: bpf.JumpEqual, Val: d.nr})
	}
	toClone = append(toClone, fixup{len(prog)})
	prog = append(prog, bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.SYS_CLONE})
	toIoctl = append(toIoctl, fixup{len(prog)})
	prog = append(prog, bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.SYS_IOCTL})
	// clone3 passes its flags in memory the filter cannot read: ENOSYS makes
	// the C library fall back to clone, whose flags it can.
	toNoSys = append(toNoSys, fixup{len(prog)})
	prog = append(prog, bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.SYS_CLONE3})
	prog = append(prog, allow)

	cloneAt := len(prog)
	prog = append(prog,
		bpf.LoadAbsolute{Off: seccompArg0, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: cloneNamespaceFlags, SkipFalse: 1},
		errno(unix.EPERM),
		allow,
	)
	// ioctl's request is an unsigned int to the kernel: its low 32 bits are
	// all that count, so comparing them cannot be dodged with high bits.
	ioctlAt := len(prog)
	prog = append(prog,
		bpf.LoadAbsolute{Off: seccompArg1, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.TIOCSTI, SkipTrue: 2},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.TIOCLINUX, SkipTrue: 1},
		allow,
		errno(unix.EPERM),
	)
	noSysAt := len(prog)
	prog = append(prog, errno(unix.ENOSYS))
	denyAt := len(prog)
	prog = append(prog, errno(unix.EPERM))

	jump := func(fs []fixup, target int) error {
		for _, f := range fs {
			j := prog[f.at].(bpf.JumpIf)
			skip := target - f.at - 1
			if skip < 0 || skip > 255 {
				return fmt.Errorf("seccomp filter: jump from %d to %d does not fit", f.at, target)
			}
			j.SkipTrue = uint8(skip)
			prog[f.at] = j
		}
		return nil
	}
	for _, j := range []struct {
		fs     []fixup
		target int
	}{{toDeny, denyAt}, {toClone, cloneAt}, {toIoctl, ioctlAt}, {toNoSys, noSysAt}} {
		if err := jump(j.fs, j.target); err != nil {
			return nil, err
		}
	}
	raw, err := bpf.Assemble(prog)
	if err != nil {
		return nil, fmt.Errorf("seccomp filter: %w", err)
	}
	out := make([]byte, 0, 8*len(raw))
	for _, r := range raw {
		out = binary.LittleEndian.AppendUint16(out, r.Op)
		out = append(out, r.Jt, r.Jf)
		out = binary.LittleEndian.AppendUint32(out, r.K)
	}
	return out, nil
}

// SeccompFile holds the user-code filter for one bubblewrap run, which
// reads it from the descriptor given to --seccomp (SeccompFD). It is
// exported so that the benchmark's floor runs exactly the executor's
// sandbox.
func SeccompFile() (*os.File, error) {
	prog, err := seccompProgram()
	if err != nil {
		return nil, err
	}
	return MemFile("seccomp", prog)
}

package executor

import (
	"encoding/binary"
	"runtime"
	"testing"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// TestSeccompProgram runs the user-code filter in x/net/bpf's virtual
// machine. The VM loads words big-endian where the kernel loads them in the
// machine's order, so the test lays seccomp_data out big-endian; the
// kernel's reading is exercised by the integration tests.
func TestSeccompProgram(t *testing.T) {
	raw, err := seccompProgram()
	if err != nil {
		t.Skipf("no filter on %s: %v", runtime.GOARCH, err)
	}
	if len(raw)%8 != 0 || len(raw)/8 > 4096 {
		t.Fatalf("program is %d bytes: not a whole number of instructions within BPF_MAXINSNS", len(raw))
	}
	var prog []bpf.Instruction
	for i := 0; i < len(raw); i += 8 {
		prog = append(prog, bpf.RawInstruction{
			Op: binary.LittleEndian.Uint16(raw[i:]), Jt: raw[i+2], Jf: raw[i+3], K: binary.LittleEndian.Uint32(raw[i+4:]),
		}.Disassemble())
	}
	vm, err := bpf.NewVM(prog)
	if err != nil {
		t.Fatalf("the kernel would refuse the program too: %v", err)
	}
	arch := uint32(auditArchX86)
	if runtime.GOARCH == "arm64" {
		arch = auditArchArm
	}
	run := func(a uint32, nr uint32, args ...uint64) uint32 {
		data := make([]byte, 64)
		binary.BigEndian.PutUint32(data[0:], nr)
		binary.BigEndian.PutUint32(data[4:], a)
		for i, v := range args {
			// The low 32 bits sit where the filter reads them.
			binary.BigEndian.PutUint32(data[16+8*i:], uint32(v))
			binary.BigEndian.PutUint32(data[16+8*i+4:], uint32(v>>32))
		}
		got, err := vm.Run(data)
		if err != nil {
			t.Fatalf("run: %v", err)
		}
		return uint32(got)
	}
	const (
		allow = unix.SECCOMP_RET_ALLOW
		eperm = unix.SECCOMP_RET_ERRNO | uint32(unix.EPERM)
		enosy = unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS)
		kill  = unix.SECCOMP_RET_KILL_PROCESS
	)
	cases := []struct {
		name string
		nr   uint32
		args []uint64
		want uint32
	}{
		{"read", unix.SYS_READ, nil, allow},
		{"write", unix.SYS_WRITE, nil, allow},
		{"execve", unix.SYS_EXECVE, nil, allow},
		{"a thread", unix.SYS_CLONE, []uint64{unix.CLONE_VM | unix.CLONE_FS | unix.CLONE_FILES | unix.CLONE_SIGHAND | unix.CLONE_THREAD}, allow},
		{"fork", unix.SYS_CLONE, []uint64{uint64(unix.SIGCHLD)}, allow},
		{"clone into a new user namespace", unix.SYS_CLONE, []uint64{unix.CLONE_NEWUSER | uint64(unix.SIGCHLD)}, eperm},
		{"clone into a new network namespace", unix.SYS_CLONE, []uint64{unix.CLONE_NEWNET}, eperm},
		{"clone3", unix.SYS_CLONE3, nil, enosy},
		{"ioctl TCGETS", unix.SYS_IOCTL, []uint64{0, unix.TCGETS}, allow},
		{"ioctl TIOCSTI", unix.SYS_IOCTL, []uint64{0, unix.TIOCSTI}, eperm},
		{"ioctl TIOCSTI with high bits", unix.SYS_IOCTL, []uint64{0, 1<<32 | unix.TIOCSTI}, eperm},
		{"ioctl TIOCLINUX", unix.SYS_IOCTL, []uint64{0, unix.TIOCLINUX}, eperm},
		{"other architecture", unix.SYS_READ, nil, kill},
	}
	for _, d := range deniedSyscalls {
		cases = append(cases, struct {
			name string
			nr   uint32
			args []uint64
			want uint32
		}{d.name, d.nr, nil, eperm})
	}
	if runtime.GOARCH == "amd64" {
		cases = append(cases, struct {
			name string
			nr   uint32
			args []uint64
			want uint32
		}{"x32 ABI read", x32SyscallBit | unix.SYS_READ, nil, eperm})
	}
	for _, c := range cases {
		a := arch
		if c.name == "other architecture" {
			a = 0x40000003 // AUDIT_ARCH_I386
		}
		if got := run(a, c.nr, c.args...); got != c.want {
			t.Errorf("%s: filter returns %#x, want %#x", c.name, got, c.want)
		}
	}
}

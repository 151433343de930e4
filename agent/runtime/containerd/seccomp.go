package containerd

import (
	"github.com/containerd/containerd/contrib/seccomp"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// bubblewrapSyscalls are what the container's seccomp profile allows beyond
// Docker's default for a container without capabilities: the calls
// bubblewrap makes to build the user code's sandbox inside its own user
// namespace (new namespaces by clone and unshare, its mounts, pivot_root and
// chroot into the new root, the sandbox's hostname). The default profile
// allows them only to CAP_SYS_ADMIN (or CAP_SYS_CHROOT); the container has
// no capabilities, and bubblewrap gets them only inside the namespace it
// creates. The executor's own filter, which bubblewrap installs for user
// code, takes them back (executor/seccomp.go).
var bubblewrapSyscalls = []string{
	"clone",
	"unshare",
	"mount",
	"umount2",
	"pivot_root",
	"chroot",
	"sethostname",
}

// seccompProfile is Docker's default profile (as containerd ships it) for
// the capabilities spec leaves the container, widened by bubblewrapSyscalls.
// Everything it does not list fails with EPERM; clone3 fails with ENOSYS so
// that the C library falls back to clone.
func seccompProfile(spec *specs.Spec) *specs.LinuxSeccomp {
	p := seccomp.DefaultProfile(spec)
	p.Syscalls = append(p.Syscalls, specs.LinuxSyscall{
		Names:  bubblewrapSyscalls,
		Action: specs.ActAllow,
	})
	return p
}

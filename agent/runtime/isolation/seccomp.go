package isolation

import (
	"encoding/json"

	"github.com/containerd/containerd/contrib/seccomp"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// BubblewrapSyscalls are what the container's seccomp profile allows beyond
// Docker's default for a container without capabilities: the calls
// bubblewrap makes to build the user code's sandbox inside its own user
// namespace (new namespaces by clone and unshare, its mounts, pivot_root and
// chroot into the new root, the sandbox's hostname). The default profile
// allows them only to CAP_SYS_ADMIN (or CAP_SYS_CHROOT); the container has
// no capabilities, and bubblewrap gets them only inside the namespace it
// creates. The executor's own filter, which bubblewrap installs for user
// code, takes them back (executor/seccomp.go).
var BubblewrapSyscalls = []string{
	"clone",
	"unshare",
	"mount",
	"umount2",
	"pivot_root",
	"chroot",
	"sethostname",
}

// SeccompProfile is Docker's default profile (as containerd ships it) for a
// container without capabilities, widened by BubblewrapSyscalls. Everything
// it does not list fails with EPERM; clone3 fails with ENOSYS so that the C
// library falls back to clone.
func SeccompProfile() *specs.LinuxSeccomp {
	// The default profile adds the calls of the capabilities the spec's
	// process holds: none.
	p := seccomp.DefaultProfile(&specs.Spec{Process: &specs.Process{Capabilities: &specs.LinuxCapabilities{}}})
	p.Syscalls = append(p.Syscalls, specs.LinuxSyscall{
		Names:  BubblewrapSyscalls,
		Action: specs.ActAllow,
	})
	return p
}

// SeccompProfileJSON is SeccompProfile in the JSON form Docker's
// --security-opt seccomp= and a Kubernetes Localhost profile read: the
// field names of the OCI runtime spec, which both accept.
func SeccompProfileJSON() ([]byte, error) {
	return json.Marshal(SeccompProfile())
}

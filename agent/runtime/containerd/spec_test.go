package containerd

import (
	"reflect"
	"slices"
	"testing"

	"github.com/containerd/containerd/containers"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/agent/runtime"
	"github.com/sandboxhq/sandbox/agent/runtime/isolation"
)

func validSpec() runtime.Spec {
	return runtime.Spec{
		ID:        "c1",
		Image:     "localhost/sandbox/python-basic:latest",
		Limits:    sandbox.Limits{CPUMillis: 1500, MemoryMiB: 256, Pids: 100, DiskMiB: 64},
		SocketDir: "/var/lib/sandbox/sockets/c1",
		Env:       []string{"A=1"},
		Labels:    map[string]string{runtime.LabelSession: "s1"},
	}
}

func TestOCISpec(t *testing.T) {
	img := imageInfo{args: []string{"/usr/local/bin/sandbox-executor"}, pathEnv: "PATH=/image/bin"}
	s := ociSpec(validSpec(), img, "/sandbox", 128)

	if !s.Root.Readonly {
		t.Error("root is writable")
	}
	p := s.Process
	if p.User.UID != 1000 || p.User.GID != 1000 || !p.NoNewPrivileges || p.Cwd != "/workspace" {
		t.Errorf("process = %+v", p)
	}
	if c := p.Capabilities; c == nil || len(c.Bounding)+len(c.Effective)+len(c.Permitted)+len(c.Inheritable)+len(c.Ambient) != 0 {
		t.Errorf("capabilities = %+v, want all five sets empty", c)
	}
	if !slices.Equal(p.Args, img.args) {
		t.Errorf("args = %v, want the image's %v", p.Args, img.args)
	}
	if !slices.Equal(p.Env, []string{"PATH=/image/bin", "A=1"}) {
		t.Errorf("env = %v", p.Env)
	}
	for _, r := range p.Rlimits {
		if r.Type == "RLIMIT_NPROC" {
			t.Error("RLIMIT_NPROC is per uid across the host; the pids cgroup bounds a sandbox")
		}
	}
	if len(s.Linux.MaskedPaths) != 0 || len(s.Linux.ReadonlyPaths) != 0 {
		t.Error("masked or read-only paths break bubblewrap's --proc")
	}
	var ns []specs.LinuxNamespaceType
	for _, n := range s.Linux.Namespaces {
		if n.Path != "" {
			t.Errorf("namespace %s joins %s, want a new one", n.Type, n.Path)
		}
		ns = append(ns, n.Type)
	}
	for _, want := range []specs.LinuxNamespaceType{specs.PIDNamespace, specs.IPCNamespace, specs.UTSNamespace, specs.MountNamespace, specs.NetworkNamespace, specs.CgroupNamespace} {
		if !slices.Contains(ns, want) {
			t.Errorf("no %s namespace", want)
		}
	}
	if slices.Contains(ns, specs.UserNamespace) {
		t.Error("user namespace: not with runc on this host")
	}
	r := s.Linux.Resources
	if *r.Memory.Limit != 256<<20 || *r.Memory.Swap != 256<<20 || *r.CPU.Quota != 150000 || *r.CPU.Period != 100000 || r.Pids.Limit != 100 {
		t.Errorf("resources: memory %d swap %d quota %d period %d pids %d", *r.Memory.Limit, *r.Memory.Swap, *r.CPU.Quota, *r.CPU.Period, r.Pids.Limit)
	}
	if first := r.Devices[0]; first.Allow || first.Access != "rwm" || first.Major != nil {
		t.Errorf("first device rule %+v, want deny all", first)
	}
	if s.Linux.CgroupsPath != "/sandbox/c1" {
		t.Errorf("cgroups path %s", s.Linux.CgroupsPath)
	}
	var dests []string
	for _, m := range s.Mounts {
		dests = append(dests, m.Destination)
		if m.Type == "bind" && m.Source != "/var/lib/sandbox/sockets/c1" {
			t.Errorf("bind mount of %s: only the socket dir may come from the host", m.Source)
		}
	}
	want := []string{"/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/workspace", "/tmp", "/run/sandbox"}
	if !slices.Equal(dests, want) {
		t.Errorf("mounts %v, want %v", dests, want)
	}
}

func TestOCISpecOverrides(t *testing.T) {
	sp := validSpec()
	sp.Args = []string{"sleep", "1"}
	sp.Env = []string{"PATH=/mine", "B=2"}
	s := ociSpec(sp, imageInfo{args: []string{"/entry"}, pathEnv: "PATH=/image"}, "/sandbox", 64)
	if !slices.Equal(s.Process.Args, sp.Args) {
		t.Errorf("args = %v, want Spec.Args", s.Process.Args)
	}
	if !slices.Equal(s.Process.Env, sp.Env) {
		t.Errorf("env = %v, want Spec.Env unchanged when it sets PATH", s.Process.Env)
	}
}

// TestOCISpecGroup: a Group becomes the annotation that makes the runc shim
// serve the group's containers from one process; no Group, no annotation.
func TestOCISpecGroup(t *testing.T) {
	img := imageInfo{pathEnv: "PATH=/image"}
	sp := validSpec()
	if a := ociSpec(sp, img, "/sandbox", 64).Annotations; len(a) != 0 {
		t.Errorf("annotations without a group = %v, want none", a)
	}
	sp.Group = "agent-1/python-basic/3"
	if got := ociSpec(sp, img, "/sandbox", 64).Annotations["io.containerd.runc.v2.group"]; got != sp.Group {
		t.Errorf("group annotation = %q, want %q", got, sp.Group)
	}
}

// TestWorkspaceMiB reads back the workspace size ociSpec wrote, which
// Update checks a new disk limit against.
func TestWorkspaceMiB(t *testing.T) {
	sp := validSpec()
	v, err := typeurl.MarshalAny(ociSpec(sp, imageInfo{}, "/sandbox", 64))
	if err != nil {
		t.Fatal(err)
	}
	got, err := workspaceMiB(containers.Container{ID: sp.ID, Spec: v})
	if err != nil || got != sp.Limits.DiskMiB {
		t.Errorf("workspaceMiB = %d, %v; want %d", got, err, sp.Limits.DiskMiB)
	}
	if _, err := workspaceMiB(containers.Container{ID: sp.ID}); err == nil {
		t.Error("workspaceMiB of a container without a spec: no error")
	}
}

// TestSpecSeccomp: the container's spec carries the sandbox profile.
func TestSpecSeccomp(t *testing.T) {
	s := ociSpec(validSpec(), imageInfo{args: []string{"/x"}, pathEnv: "PATH=/bin"}, "/sandbox", 128)
	if !reflect.DeepEqual(s.Linux.Seccomp, isolation.SeccompProfile()) {
		t.Fatal("the spec's seccomp profile is not isolation.SeccompProfile")
	}
}

package kubernetes

import (
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/sandboxhq/sandbox/agent/runtime"
)

func mustQuantity(s string) resource.Quantity { return resource.MustParse(s) }

func testConfig() Config {
	cfg := DefaultConfig()
	cfg.Namespace = "sandboxes"
	return cfg
}

// TestBuildPod checks the pod of a Spec field by field: the isolation it
// gives is what this package promises.
func TestBuildPod(t *testing.T) {
	spec := testSpec("rtt-pod")
	spec.Env = append(spec.Env, "EXECUTOR_PORT=1", "A=b=c")
	p := buildPod(testConfig(), spec)

	if p.Name != "rtt-pod" || p.Namespace != "sandboxes" {
		t.Errorf("pod %s/%s, want sandboxes/rtt-pod", p.Namespace, p.Name)
	}
	wantLabels := map[string]string{runtime.LabelAgent: "agent-1", runtime.LabelSession: "rtt-pod", "app.kubernetes.io/managed-by": "sandbox-agent"}
	if !equality.Semantic.DeepEqual(p.Labels, wantLabels) {
		t.Errorf("labels = %v, want %v", p.Labels, wantLabels)
	}
	if !slices.Equal(p.Finalizers, []string{"sandbox.agent/exit-status"}) {
		t.Errorf("finalizers = %v", p.Finalizers)
	}

	s := p.Spec
	if s.RestartPolicy != corev1.RestartPolicyNever || s.Hostname != "sandbox" ||
		s.AutomountServiceAccountToken == nil || *s.AutomountServiceAccountToken ||
		s.EnableServiceLinks == nil || *s.EnableServiceLinks ||
		s.HostNetwork || s.HostPID || s.HostIPC || s.HostUsers == nil || *s.HostUsers ||
		s.NodeName != "" || s.RuntimeClassName != nil ||
		s.TerminationGracePeriodSeconds == nil || *s.TerminationGracePeriodSeconds != 10 {
		t.Errorf("pod spec = %+v", s)
	}
	if ps := s.SecurityContext; ps == nil || *ps.RunAsUser != 1000 || *ps.RunAsGroup != 1000 || !*ps.RunAsNonRoot ||
		*ps.FSGroup != 1000 || *ps.SupplementalGroupsPolicy != corev1.SupplementalGroupsPolicyStrict ||
		ps.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("pod security context = %+v", ps)
	}

	if len(s.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(s.Containers))
	}
	c := s.Containers[0]
	if c.Name != "executor" || c.Image != spec.Image || c.ImagePullPolicy != corev1.PullIfNotPresent ||
		!slices.Equal(c.Command, []string{"sleep", "300"}) || c.Args != nil || c.WorkingDir != "/workspace" {
		t.Errorf("container = %+v", c)
	}
	sc := c.SecurityContext
	if sc == nil || *sc.RunAsUser != 1000 || *sc.RunAsGroup != 1000 || !*sc.RunAsNonRoot || *sc.Privileged ||
		*sc.AllowPrivilegeEscalation || !*sc.ReadOnlyRootFilesystem ||
		!slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) != 0 ||
		sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault ||
		sc.ProcMount == nil || *sc.ProcMount != corev1.UnmaskedProcMount {
		t.Errorf("container security context = %+v", sc)
	}

	want := corev1.ResourceList{corev1.ResourceCPU: mustQuantity("500m"), corev1.ResourceMemory: mustQuantity("128Mi")}
	if !equality.Semantic.DeepEqual(c.Resources.Limits, want) || !equality.Semantic.DeepEqual(c.Resources.Requests, want) {
		t.Errorf("resources = %+v, want requests = limits = %v", c.Resources, want)
	}
	for _, rp := range c.ResizePolicy {
		if rp.RestartPolicy != corev1.NotRequired {
			t.Errorf("resize policy %+v, want no restart", rp)
		}
	}

	wantEnv := []corev1.EnvVar{
		{Name: "SANDBOX_TEST", Value: "1"}, {Name: "A", Value: "b=c"},
		{Name: "EXECUTOR_HOST", Value: "0.0.0.0"}, {Name: "EXECUTOR_PORT", Value: "8080"},
	}
	if !equality.Semantic.DeepEqual(c.Env, wantEnv) {
		t.Errorf("env = %v, want %v", c.Env, wantEnv)
	}
	if len(c.Ports) != 1 || c.Ports[0].ContainerPort != 8080 || c.Ports[0].Protocol != corev1.ProtocolTCP {
		t.Errorf("ports = %v", c.Ports)
	}

	// Every mount is a size-limited tmpfs of its own; nothing else.
	mounts := map[string]string{}
	for _, m := range c.VolumeMounts {
		mounts[m.Name] = m.MountPath
	}
	wantMounts := map[string]string{"workspace": "/workspace", "tmp": "/tmp", "run-sandbox": "/run/sandbox"}
	if !equality.Semantic.DeepEqual(mounts, wantMounts) {
		t.Errorf("mounts = %v, want %v", mounts, wantMounts)
	}
	sizes := map[string]string{"workspace": "16Mi", "tmp": "128Mi", "run-sandbox": "1Mi"}
	if len(s.Volumes) != len(sizes) {
		t.Errorf("%d volumes, want %d", len(s.Volumes), len(sizes))
	}
	for _, v := range s.Volumes {
		if v.EmptyDir == nil || v.EmptyDir.Medium != corev1.StorageMediumMemory || v.EmptyDir.SizeLimit == nil ||
			v.EmptyDir.SizeLimit.Cmp(mustQuantity(sizes[v.Name])) != 0 {
			t.Errorf("volume %s = %+v, want an emptyDir in memory of %s", v.Name, v.VolumeSource, sizes[v.Name])
		}
	}
	if disk, err := workspaceMiB(p); err != nil || disk != 16 {
		t.Errorf("workspaceMiB = %d, %v; want 16", disk, err)
	}
}

// TestBuildPodOptions: the configuration's optional parts reach the pod.
func TestBuildPodOptions(t *testing.T) {
	cfg := testConfig()
	cfg.NodeName = "node-7"
	cfg.RuntimeClassName = "gvisor"
	cfg.SeccompProfile = "profiles/sandbox.json"
	cfg.HostUsers = true
	cfg.ImagePullPolicy = corev1.PullAlways
	cfg.TerminationGracePeriod = 3 * time.Second
	cfg.ExecutorPort = 9000
	spec := testSpec("rtt-options")
	spec.Args = nil
	p := buildPod(cfg, spec)
	s := p.Spec
	if s.NodeName != "node-7" || s.RuntimeClassName == nil || *s.RuntimeClassName != "gvisor" ||
		*s.HostUsers != true || *s.TerminationGracePeriodSeconds != 3 {
		t.Errorf("pod spec = %+v", s)
	}
	c := s.Containers[0]
	for _, sp := range []*corev1.SeccompProfile{s.SecurityContext.SeccompProfile, c.SecurityContext.SeccompProfile} {
		if sp.Type != corev1.SeccompProfileTypeLocalhost || *sp.LocalhostProfile != "profiles/sandbox.json" {
			t.Errorf("seccomp profile = %+v, want Localhost profiles/sandbox.json", sp)
		}
	}
	if c.SecurityContext.ProcMount != nil {
		t.Errorf("procMount %v in the host's user namespace, want the default", *c.SecurityContext.ProcMount)
	}
	if c.Command != nil || c.Args != nil || c.ImagePullPolicy != corev1.PullAlways || c.Ports[0].ContainerPort != 9000 {
		t.Errorf("container = %+v, want the image's entrypoint on port 9000", c)
	}
}

func TestStatus(t *testing.T) {
	p := buildPod(testConfig(), testSpec("rtt-status"))
	if st := status(p, 8080); st.Running || st.Pid != 0 || st.Endpoint != "" || st.ExitCode != 0 {
		t.Errorf("status of a new pod = %+v", st)
	}
	p.Status = corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "fd00::5", ContainerStatuses: []corev1.ContainerStatus{
		{Name: "executor", State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{}}},
	}}
	if st := status(p, 8080); !st.Running || st.Pid != 1 || st.Endpoint != "[fd00::5]:8080" {
		t.Errorf("status of a running pod = %+v", st)
	}
	p.Status.Phase = corev1.PodFailed
	p.Status.ContainerStatuses[0].State = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: 3}}
	if st := status(p, 8080); st.Running || st.Pid != 0 || st.ExitCode != 3 || st.Endpoint != "" {
		t.Errorf("status of an exited pod = %+v", st)
	}
	// Evicted before its container ran.
	p.Status = corev1.PodStatus{Phase: corev1.PodFailed, Reason: "Evicted"}
	if res := exitResult(p); res.ExitCode != 255 || res.Err == nil {
		t.Errorf("exit of an evicted pod = %+v, want 255 and an error", res)
	}
}

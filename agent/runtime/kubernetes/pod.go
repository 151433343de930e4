package kubernetes

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"maps"
	"net"
	"path"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/agent/runtime"
	"github.com/sandboxhq/sandbox/agent/runtime/isolation"
	"github.com/sandboxhq/sandbox/executor/executorapi"
)

// Names the adapter gives to what it creates.
const (
	// ContainerName is the one container of every sandbox pod.
	ContainerName = "executor"
	// LabelManagedBy and ManagedBy mark the pods and the NetworkPolicy the
	// adapter made; the policy selects the pods by them.
	LabelManagedBy = "app.kubernetes.io/managed-by"
	ManagedBy      = "sandbox-agent"
	// Finalizer keeps a stopped pod's object, and with it the exit code of
	// its container, until Destroy removes it (see Runtime.Stop).
	Finalizer = "sandbox.agent/exit-status"
	// PolicyName is the NetworkPolicy of the sandbox pods of a namespace.
	PolicyName = "sandbox-executors"

	// The pod's volumes.
	workspaceVolume = "workspace"
	tmpVolume       = "tmp"
	runVolume       = "run-sandbox"
	// runMiB bounds /run/sandbox, which holds at most a socket or two.
	runMiB = 1

	mib = 1 << 20
	// unknownExit is the exit code of a pod that ended without its container
	// reporting one (containerd's UnknownExitStatus).
	unknownExit = 255
	// killedExit is the exit code of a container killed by SIGKILL.
	killedExit = 137
)

// Environment the adapter sets for the executor; the Spec's own entries
// with these names give way.
const (
	envExecutorHost = "EXECUTOR_HOST"
	envExecutorPort = "EXECUTOR_PORT"
)

// AnnotationID holds the container id a pod was started for: its name is
// that id only when the id is a valid pod name (PodName).
const AnnotationID = "sandbox.id"

// maxIDBytes bounds a container id (an annotation value could hold more).
const maxIDBytes = 253

// PodName is the pod of container id: id itself when it is a DNS-1123
// label (63 characters of [a-z0-9-]), else a label made of it (lower case,
// other characters as '-', cut to 54) and 8 hex digits of its SHA-256, so
// that ids differing only in case or punctuation get different pods. The
// agent's ids (s-<session id>, w-<random>) hold '_' and capitals.
func PodName(id string) string {
	if len(validation.IsDNS1123Label(id)) == 0 {
		return id
	}
	b := []byte(strings.ToLower(id))
	for i, c := range b {
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') {
			b[i] = '-'
		}
	}
	base := strings.Trim(string(b), "-")
	if len(base) > 54 {
		base = strings.TrimRight(base[:54], "-")
	}
	sum := sha256.Sum256([]byte(id))
	if base == "" {
		return "c-" + hex.EncodeToString(sum[:4])
	}
	return base + "-" + hex.EncodeToString(sum[:4])
}

// idOf is the container id of a pod.
func idOf(p *corev1.Pod) string {
	if id := p.Annotations[AnnotationID]; id != "" {
		return id
	}
	return p.Name
}

// validateSpec rejects a Spec the adapter cannot turn into a safe pod. It
// asks what isolation.ValidateSpec asks but for a socket directory, which
// pods do not use, and what the API server would refuse anyway (names and
// labels), so that the refusal is sandbox.ErrInvalidArgument.
func validateSpec(s runtime.Spec) error {
	if s.ID == "" || len(s.ID) > maxIDBytes {
		return fmt.Errorf("%w: container id %q must be 1-%d bytes", sandbox.ErrInvalidArgument, s.ID, maxIDBytes)
	}
	switch {
	case s.Image == "":
		return fmt.Errorf("%w: container %s: image is empty", sandbox.ErrInvalidArgument, s.ID)
	case s.LogPath != "" && !path.IsAbs(s.LogPath):
		return fmt.Errorf("%w: container %s: log path %q must be absolute", sandbox.ErrInvalidArgument, s.ID, s.LogPath)
	}
	// Kubernetes reads a missing limit as none, and an emptyDir without
	// sizeLimit as the node's memory.
	if err := isolation.ValidateLimits(s.ID, s.Limits); err != nil {
		return err
	}
	if err := validateLabels(s.Labels); err != nil {
		return fmt.Errorf("container %s: %w", s.ID, err)
	}
	for _, e := range s.Env {
		if k, _, ok := strings.Cut(e, "="); !ok || k == "" {
			return fmt.Errorf("%w: container %s: env entry %q is not KEY=VALUE", sandbox.ErrInvalidArgument, s.ID, e)
		}
	}
	return nil
}

// validateLabels checks labels are valid Kubernetes label keys and values.
func validateLabels(labels map[string]string) error {
	for _, k := range slices.Sorted(maps.Keys(labels)) {
		if errs := validation.IsQualifiedName(k); len(errs) > 0 {
			return fmt.Errorf("%w: label key %q: %s", sandbox.ErrInvalidArgument, k, strings.Join(errs, "; "))
		}
		if errs := validation.IsValidLabelValue(labels[k]); len(errs) > 0 {
			return fmt.Errorf("%w: label %s value %q: %s", sandbox.ErrInvalidArgument, k, labels[k], strings.Join(errs, "; "))
		}
	}
	return nil
}

// buildPod is the whole pod of one sandbox container. Every permission the
// container has is written down here rather than left to defaults.
func buildPod(cfg Config, s runtime.Spec) *corev1.Pod {
	labels := maps.Clone(s.Labels)
	if labels == nil {
		labels = map[string]string{}
	}
	labels[LabelManagedBy] = ManagedBy

	env := make([]corev1.EnvVar, 0, len(s.Env)+2)
	for _, e := range s.Env {
		k, v, _ := strings.Cut(e, "=")
		if k == envExecutorHost || k == envExecutorPort {
			continue
		}
		env = append(env, corev1.EnvVar{Name: k, Value: v})
	}
	// On Kubernetes the executor serves TCP on the pod's IP (design.md);
	// the NetworkPolicy lets only the agents reach it.
	env = append(env,
		corev1.EnvVar{Name: envExecutorHost, Value: "0.0.0.0"},
		corev1.EnvVar{Name: envExecutorPort, Value: strconv.Itoa(int(cfg.ExecutorPort))},
	)

	grace := int64(cfg.TerminationGracePeriod.Seconds())
	c := corev1.Container{
		Name:            ContainerName,
		Image:           s.Image,
		ImagePullPolicy: cfg.ImagePullPolicy,
		// Args replaces the image's entrypoint and command: as command, with
		// no args, Kubernetes ignores both of the image's.
		Command:    slices.Clone(s.Args),
		WorkingDir: isolation.WorkspacePath,
		Env:        env,
		Ports:      []corev1.ContainerPort{{Name: "executor", ContainerPort: cfg.ExecutorPort, Protocol: corev1.ProtocolTCP}},
		Resources:  resources(s.Limits),
		// Limits change in place (Update), without a restart.
		ResizePolicy: []corev1.ContainerResizePolicy{
			{ResourceName: corev1.ResourceCPU, RestartPolicy: corev1.NotRequired},
			{ResourceName: corev1.ResourceMemory, RestartPolicy: corev1.NotRequired},
		},
		VolumeMounts: []corev1.VolumeMount{
			{Name: workspaceVolume, MountPath: isolation.WorkspacePath},
			{Name: tmpVolume, MountPath: isolation.TmpPath},
			{Name: runVolume, MountPath: executorapi.SocketDir},
		},
		SecurityContext:          containerSecurity(cfg),
		TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError,
	}
	if len(s.Args) == 0 {
		c.Command = nil
	}

	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name:        PodName(s.ID),
			Namespace:   cfg.Namespace,
			Labels:      labels,
			Annotations: map[string]string{AnnotationID: s.ID},
			Finalizers:  []string{Finalizer},
		},
		Spec: corev1.PodSpec{
			RestartPolicy:                 corev1.RestartPolicyNever,
			NodeName:                      cfg.NodeName,
			Hostname:                      isolation.Hostname,
			AutomountServiceAccountToken:  ptr(false),
			EnableServiceLinks:            ptr(false),
			TerminationGracePeriodSeconds: &grace,
			// Written out although they are the defaults: none of the host's
			// namespaces, and (unless HostUsers) a user namespace of its own.
			HostNetwork:           false,
			HostPID:               false,
			HostIPC:               false,
			ShareProcessNamespace: ptr(false),
			HostUsers:             ptr(cfg.HostUsers),
			SecurityContext:       podSecurity(cfg),
			Containers:            []corev1.Container{c},
			Volumes: []corev1.Volume{
				memoryVolume(workspaceVolume, s.Limits.DiskMiB),
				memoryVolume(tmpVolume, cfg.TmpMiB),
				memoryVolume(runVolume, runMiB),
			},
		},
	}
	if cfg.RuntimeClassName != "" {
		pod.Spec.RuntimeClassName = ptr(cfg.RuntimeClassName)
	}
	return pod
}

// containerSecurity is the executor's identity and privileges: uid/gid
// 1000, no capabilities, no_new_privs, a read-only root.
func containerSecurity(cfg Config) *corev1.SecurityContext {
	sc := &corev1.SecurityContext{
		RunAsUser:                ptr(int64(isolation.SandboxUID)),
		RunAsGroup:               ptr(int64(isolation.SandboxGID)),
		RunAsNonRoot:             ptr(true),
		Privileged:               ptr(false),
		AllowPrivilegeEscalation: ptr(false),
		Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
		ReadOnlyRootFilesystem:   ptr(true),
		SeccompProfile:           seccompProfile(cfg),
	}
	// bubblewrap mounts a fresh /proc for user code, which the kernel
	// refuses while paths of the container's /proc are masked; Kubernetes
	// unmasks them only for a pod in a user namespace.
	if !cfg.HostUsers {
		sc.ProcMount = ptr(corev1.UnmaskedProcMount)
	}
	return sc
}

func podSecurity(cfg Config) *corev1.PodSecurityContext {
	return &corev1.PodSecurityContext{
		RunAsUser:    ptr(int64(isolation.SandboxUID)),
		RunAsGroup:   ptr(int64(isolation.SandboxGID)),
		RunAsNonRoot: ptr(true),
		// The volumes belong to the sandbox group; Strict keeps the image's
		// /etc/group from adding groups to the executor.
		FSGroup:                  ptr(int64(isolation.SandboxGID)),
		SupplementalGroupsPolicy: ptr(corev1.SupplementalGroupsPolicyStrict),
		SeccompProfile:           seccompProfile(cfg),
	}
}

func seccompProfile(cfg Config) *corev1.SeccompProfile {
	if cfg.SeccompProfile == "" {
		return &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault}
	}
	return &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeLocalhost, LocalhostProfile: ptr(cfg.SeccompProfile)}
}

// memoryVolume is a tmpfs of size mib. Its pages are charged to the pod's
// memory, as the containerd adapter's tmpfs mounts are.
func memoryVolume(name string, size int64) corev1.Volume {
	return corev1.Volume{Name: name, VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{
		Medium:    corev1.StorageMediumMemory,
		SizeLimit: resource.NewQuantity(size*mib, resource.BinarySI),
	}}}
}

// resources are requests equal to limits (the Guaranteed QoS class) for
// cpu and memory. Kubernetes has no per-pod pids limit: the node's
// podPidsLimit applies.
func resources(l sandbox.Limits) corev1.ResourceRequirements {
	list := corev1.ResourceList{
		corev1.ResourceCPU:    *resource.NewMilliQuantity(int64(l.CPUMillis), resource.DecimalSI),
		corev1.ResourceMemory: *resource.NewQuantity(l.MemoryMiB*mib, resource.BinarySI),
	}
	return corev1.ResourceRequirements{Requests: list, Limits: list.DeepCopy()}
}

// sameLimits reports whether have carries the cpu and memory limits of want.
func sameLimits(have, want corev1.ResourceList) bool {
	for _, name := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
		h, ok := have[name]
		w := want[name]
		if !ok || h.Cmp(w) != 0 {
			return false
		}
	}
	return true
}

// workspaceMiB reads the size of /workspace from a pod's volumes.
func workspaceMiB(p *corev1.Pod) (int64, error) {
	for _, v := range p.Spec.Volumes {
		if v.Name == workspaceVolume && v.EmptyDir != nil && v.EmptyDir.SizeLimit != nil {
			return v.EmptyDir.SizeLimit.Value() / mib, nil
		}
	}
	return 0, fmt.Errorf("pod has no %s volume with a size limit", workspaceVolume)
}

// networkPolicy lets only the agents' pods reach the sandbox pods, on the
// executor's port, and lets the sandbox pods reach nothing (but the agents'
// callback port, when there is one).
func networkPolicy(cfg Config) *networkingv1.NetworkPolicy {
	tcp := corev1.ProtocolTCP
	agents := networkingv1.NetworkPolicyPeer{PodSelector: &metav1.LabelSelector{MatchLabels: maps.Clone(cfg.AgentSelector)}}
	if cfg.AgentNamespace != "" && cfg.AgentNamespace != cfg.Namespace {
		// A pod selector alone picks pods of the policy's own namespace.
		agents.NamespaceSelector = &metav1.LabelSelector{MatchLabels: map[string]string{"kubernetes.io/metadata.name": cfg.AgentNamespace}}
	}
	executor := intstr.FromInt32(cfg.ExecutorPort)
	np := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{
			Name:      PolicyName,
			Namespace: cfg.Namespace,
			Labels:    map[string]string{LabelManagedBy: ManagedBy},
		},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{LabelManagedBy: ManagedBy}},
			// Egress listed with no egress rule denies all egress.
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{agents},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &executor}},
			}},
		},
	}
	if cfg.CallbackPort != 0 {
		callback := intstr.FromInt32(cfg.CallbackPort)
		np.Spec.Egress = []networkingv1.NetworkPolicyEgressRule{{
			To:    []networkingv1.NetworkPolicyPeer{*agents.DeepCopy()},
			Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &callback}},
		}}
	}
	return np
}

// container returns the pod's executor container and its status (nil
// until the kubelet reports one).
func container(p *corev1.Pod) (*corev1.Container, *corev1.ContainerStatus) {
	var c *corev1.Container
	for i := range p.Spec.Containers {
		if p.Spec.Containers[i].Name == ContainerName {
			c = &p.Spec.Containers[i]
		}
	}
	for i := range p.Status.ContainerStatuses {
		if p.Status.ContainerStatuses[i].Name == ContainerName {
			return c, &p.Status.ContainerStatuses[i]
		}
	}
	return c, nil
}

// running reports whether the pod's container runs.
func running(p *corev1.Pod) bool {
	_, cs := container(p)
	return p.Status.Phase == corev1.PodRunning && cs != nil && cs.State.Running != nil
}

// exited reports whether the pod's container has ended, or the pod has
// ended without it.
func exited(p *corev1.Pod) bool {
	_, cs := container(p)
	return (cs != nil && cs.State.Terminated != nil) ||
		p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed
}

// exitResult is how a pod that exited ended. One that ended without its
// container reporting an exit (evicted, say) gets unknownExit and an error
// saying why.
func exitResult(p *corev1.Pod) runtime.ExitResult {
	if _, cs := container(p); cs != nil && cs.State.Terminated != nil {
		return runtime.ExitResult{ExitCode: int(cs.State.Terminated.ExitCode)}
	}
	return runtime.ExitResult{ExitCode: unknownExit, Err: fmt.Errorf("pod %s ended (%s) without an exit of its container: %s %s",
		p.Name, p.Status.Phase, p.Status.Reason, p.Status.Message)}
}

// status is what Inspect and List report of a pod. Kubernetes does not
// tell a container's pid: a running one reports 1, its pid in its own pid
// namespace.
func status(p *corev1.Pod, port int32) runtime.Status {
	st := runtime.Status{ID: idOf(p), Labels: p.Labels, CreatedAt: p.CreationTimestamp.Time}
	switch {
	case running(p):
		st.Running, st.Pid = true, 1
		if p.Status.PodIP != "" {
			st.Endpoint = net.JoinHostPort(p.Status.PodIP, strconv.Itoa(int(port)))
		}
	case exited(p):
		st.ExitCode = exitResult(p).ExitCode
	}
	return st
}

func ptr[T any](v T) *T { return &v }

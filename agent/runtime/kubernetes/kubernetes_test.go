package kubernetes

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	k8stesting "k8s.io/client-go/testing"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/agent/runtime"
	"github.com/sandboxhq/sandbox/agent/runtime/runtimetest"
)

const (
	fakeNamespace = "sandbox-test"
	// fakeImage is the one image the kubelet double can pull.
	fakeImage = "registry.test/sandbox/python-basic:latest"
)

var fakeAgents = map[string]string{"app.kubernetes.io/name": "sandbox-agent"}

// newFakeRuntime opens the adapter on fc, with short timeouts.
func newFakeRuntime(t *testing.T, fc *fakeCluster, modify ...func(*Config)) *Runtime {
	t.Helper()
	cfg := Config{
		Clientset:     fc,
		Namespace:     fc.ns,
		AgentSelector: fakeAgents,
		StartTimeout:  30 * time.Second,
		ErrorGrace:    200 * time.Millisecond,
		ResizeTimeout: 10 * time.Second,
		Logger:        slog.New(slog.DiscardHandler),
	}
	for _, m := range modify {
		m(&cfg)
	}
	rt, err := New(t.Context(), cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { rt.Close() })
	return rt
}

// TestConformance runs the conformance suite on client-go's fake clientset,
// with a stand-in for the kubelet (kubelet_test.go): the lifecycle cases
// run, those that need a real container are skipped.
func TestConformance(t *testing.T) {
	fc := newFakeCluster(t, fakeNamespace, fakeImage)
	rt := newFakeRuntime(t, fc)
	runtimetest.Run(t, runtimetest.Harness{
		Runtime:   hostDirs{rt, fc.kubelet},
		Image:     fakeImage,
		Leftovers: fc.leftovers,
		Reopen: func(t *testing.T) runtime.Runtime {
			return hostDirs{newFakeRuntime(t, fc), fc.kubelet}
		},
		Simulated:   "client-go's fake clientset and a stand-in for the kubelet run no processes",
		NoSocketDir: "a pod does not see the agent's socket directory",
	})
}

// TestNetworkPolicy: New makes the namespace's policy: ingress from the
// agents' pods on the executor's port only, no egress; it restores one
// that was changed, and follows the configuration.
func TestNetworkPolicy(t *testing.T) {
	fc := newFakeCluster(t, fakeNamespace)
	policies := fc.NetworkingV1().NetworkPolicies(fakeNamespace)
	tcp := corev1.ProtocolTCP
	port := intstr.FromInt32(8080)
	want := networkingv1.NetworkPolicySpec{
		PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app.kubernetes.io/managed-by": "sandbox-agent"}},
		PolicyTypes: []networkingv1.PolicyType{"Ingress", "Egress"},
		Ingress: []networkingv1.NetworkPolicyIngressRule{{
			From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app.kubernetes.io/name": "sandbox-agent"}}}},
			Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &port}},
		}},
	}
	check := func(t *testing.T, want networkingv1.NetworkPolicySpec) {
		t.Helper()
		l, err := policies.List(t.Context(), metav1.ListOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(l.Items) != 1 || l.Items[0].Name != "sandbox-executors" {
			t.Fatalf("network policies = %v, want one named sandbox-executors", l.Items)
		}
		if got := l.Items[0].Spec; !equality.Semantic.DeepEqual(got, want) {
			t.Errorf("network policy spec = %+v, want %+v", got, want)
		}
		if len(l.Items[0].Spec.Egress) != 0 {
			t.Errorf("egress rules %v, want none", l.Items[0].Spec.Egress)
		}
	}

	newFakeRuntime(t, fc)
	check(t, want)

	// An edited policy is put back by the next agent to start.
	np, err := policies.Get(t.Context(), PolicyName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	np.Spec.Ingress = append(np.Spec.Ingress, networkingv1.NetworkPolicyIngressRule{})
	np.Spec.PolicyTypes = []networkingv1.PolicyType{"Ingress"}
	if _, err := policies.Update(t.Context(), np, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	newFakeRuntime(t, fc)
	check(t, want)

	// Agents in another namespace, with a callback port.
	newFakeRuntime(t, fc, func(c *Config) { c.AgentNamespace, c.CallbackPort, c.ExecutorPort = "sandbox-system", 9090, 8443 })
	agents := networkingv1.NetworkPolicyPeer{
		NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"kubernetes.io/metadata.name": "sandbox-system"}},
		PodSelector:       &metav1.LabelSelector{MatchLabels: map[string]string{"app.kubernetes.io/name": "sandbox-agent"}},
	}
	executor, callback := intstr.FromInt32(8443), intstr.FromInt32(9090)
	want.Ingress = []networkingv1.NetworkPolicyIngressRule{{
		From:  []networkingv1.NetworkPolicyPeer{agents},
		Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &executor}},
	}}
	egress := []networkingv1.NetworkPolicyEgressRule{{
		To:    []networkingv1.NetworkPolicyPeer{agents},
		Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &callback}},
	}}
	np, err = policies.Get(t.Context(), PolicyName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	want.Egress = egress
	if !equality.Semantic.DeepEqual(np.Spec, want) {
		t.Errorf("network policy with a callback port = %+v, want %+v", np.Spec, want)
	}
}

func TestNewRefusesBadConfig(t *testing.T) {
	fc := newFakeCluster(t, fakeNamespace)
	for name, cfg := range map[string]Config{
		"no clientset":         {Namespace: fakeNamespace},
		"invalid agent labels": {Clientset: fc, AgentSelector: map[string]string{"app": "not a label value"}},
	} {
		if _, err := New(t.Context(), cfg); !errors.Is(err, sandbox.ErrInvalidArgument) {
			t.Errorf("New with %s: %v, want ErrInvalidArgument", name, err)
		}
	}
}

// TestStartRefusesInvalidSpec: what the API would refuse is refused
// before a pod is made, as sandbox.ErrInvalidArgument.
func TestStartRefusesInvalidSpec(t *testing.T) {
	fc := newFakeCluster(t, fakeNamespace, fakeImage)
	rt := newFakeRuntime(t, fc)
	cases := map[string]func(*runtime.Spec){
		"long id":           func(s *runtime.Spec) { s.ID = strings.Repeat("a", 254) },
		"label key":         func(s *runtime.Spec) { s.Labels = map[string]string{"bad key": "x"} },
		"label value":       func(s *runtime.Spec) { s.Labels = map[string]string{"sandbox.agent": "a/b"} },
		"long label value":  func(s *runtime.Spec) { s.Labels = map[string]string{"sandbox.agent": strings.Repeat("a", 64)} },
		"env without value": func(s *runtime.Spec) { s.Env = []string{"NOEQUALS"} },
		"relative log path": func(s *runtime.Spec) { s.LogPath = "executor.log" },
		"no image":          func(s *runtime.Spec) { s.Image = "" },
		"zero pids":         func(s *runtime.Spec) { s.Limits.Pids = 0 },
	}
	for name, modify := range cases {
		t.Run(name, func(t *testing.T) {
			spec := testSpec("rtt-invalid")
			modify(&spec)
			if _, err := rt.Start(t.Context(), spec); !errors.Is(err, sandbox.ErrInvalidArgument) {
				t.Errorf("Start: %v, want ErrInvalidArgument", err)
			}
		})
	}
	if l, err := fc.CoreV1().Pods(fakeNamespace).List(t.Context(), metav1.ListOptions{}); err != nil || len(l.Items) != 0 {
		t.Errorf("pods after refused starts: %v, %v; want none", l, err)
	}
}

// TestPodNames: the agent's ids (capitals, '_') become valid pod names,
// distinct for ids differing only there, and the adapter answers for the
// ids it was given.
func TestPodNames(t *testing.T) {
	fc := newFakeCluster(t, fakeNamespace, fakeImage)
	rt := newFakeRuntime(t, fc)
	ids := []string{"s-ses_AbC123", "s-ses-abc123", "w-" + strings.Repeat("x_", 60)}
	names := map[string]string{}
	for _, id := range ids {
		name := PodName(id)
		if errs := validation.IsDNS1123Label(name); len(errs) > 0 {
			t.Errorf("PodName(%q) = %q: %v", id, name, errs)
		}
		if other, dup := names[name]; dup {
			t.Errorf("PodName(%q) = PodName(%q) = %q", id, other, name)
		}
		names[name] = id
		spec := testSpec(id)
		delete(spec.Labels, runtime.LabelSession) // a label value holds 63 characters at most
		st, err := rt.Start(t.Context(), spec)
		if err != nil {
			t.Fatalf("Start %s: %v", id, err)
		}
		t.Cleanup(func() { _ = rt.Destroy(context.Background(), id) })
		if st.ID != id {
			t.Errorf("Start(%s) reports id %q", id, st.ID)
		}
		if got, err := rt.Inspect(t.Context(), id); err != nil || got.ID != id || !got.Running {
			t.Errorf("Inspect(%s) = %+v, %v", id, got, err)
		}
	}
	if got := PodName("rtt-1"); got != "rtt-1" {
		t.Errorf("PodName of a valid name = %q, want it unchanged", got)
	}
	l, err := rt.List(t.Context(), map[string]string{})
	if err != nil {
		t.Fatal(err)
	}
	var listed []string
	for _, st := range l {
		listed = append(listed, st.ID)
	}
	for _, id := range ids {
		if !slices.Contains(listed, id) {
			t.Errorf("List = %v, lacks %s", listed, id)
		}
	}
	for _, id := range ids {
		if err := rt.Destroy(t.Context(), id); err != nil {
			t.Fatalf("Destroy %s: %v", id, err)
		}
		if _, err := rt.Inspect(t.Context(), id); !errors.Is(err, runtime.ErrNotFound) {
			t.Errorf("Inspect(%s) after Destroy: %v", id, err)
		}
	}
}

func testSpec(id string) runtime.Spec {
	return runtime.Spec{
		ID:        id,
		Image:     fakeImage,
		Limits:    sandbox.Limits{CPUMillis: 500, MemoryMiB: 128, Pids: 64, DiskMiB: 16},
		SocketDir: "/run/sandbox-agent/" + id,
		Env:       []string{"SANDBOX_TEST=1"},
		Labels:    map[string]string{runtime.LabelAgent: "agent-1", runtime.LabelSession: id},
		Args:      []string{"sleep", "300"},
	}
}

// TestStartImagePullFailure: an image the kubelet cannot pull fails Start
// after ErrorGrace with the kubelet's reason, and the pod goes.
func TestStartImagePullFailure(t *testing.T) {
	fc := newFakeCluster(t, fakeNamespace, fakeImage)
	rt := newFakeRuntime(t, fc)
	spec := testSpec("rtt-pull")
	spec.Image = "registry.test/no-such-image:1"
	_, err := rt.Start(t.Context(), spec)
	if !errors.Is(err, sandbox.ErrFailedPrecondition) || !strings.Contains(err.Error(), "ErrImagePull") || !strings.Contains(err.Error(), spec.Image) {
		t.Fatalf("Start: %v, want ErrFailedPrecondition naming ErrImagePull and the image", err)
	}
	if err := fc.leftovers(t.Context(), spec.ID); err != nil {
		t.Error(err)
	}
}

// TestStartTimeout: a pod that is never scheduled fails Start after
// StartTimeout, and goes.
func TestStartTimeout(t *testing.T) {
	fc := newFakeCluster(t, fakeNamespace) // no kubelet
	rt := newFakeRuntime(t, fc, func(c *Config) { c.StartTimeout = 200 * time.Millisecond })
	_, err := rt.Start(t.Context(), testSpec("rtt-timeout"))
	if !errors.Is(err, sandbox.ErrUnavailable) || !strings.Contains(err.Error(), "did not start within") {
		t.Fatalf("Start: %v, want ErrUnavailable after the start timeout", err)
	}
	if err := fc.leftovers(t.Context(), "rtt-timeout"); err != nil {
		t.Error(err)
	}
}

// TestStartCancelled: a Start whose context ends leaves nothing behind.
func TestStartCancelled(t *testing.T) {
	fc := newFakeCluster(t, fakeNamespace) // no kubelet
	rt := newFakeRuntime(t, fc)
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	if _, err := rt.Start(ctx, testSpec("rtt-cancel")); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Start: %v, want the context's error", err)
	}
	if err := fc.leftovers(t.Context(), "rtt-cancel"); err != nil {
		t.Error(err)
	}
}

// TestEndpoint: a running pod's executor is at its IP and ExecutorPort.
func TestEndpoint(t *testing.T) {
	fc := newFakeCluster(t, fakeNamespace, fakeImage)
	rt := newFakeRuntime(t, fc, func(c *Config) { c.ExecutorPort = 8443 })
	st, err := rt.Start(t.Context(), testSpec("rtt-endpoint"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rt.Destroy(context.Background(), "rtt-endpoint") })
	p, err := fc.CoreV1().Pods(fakeNamespace).Get(t.Context(), "rtt-endpoint", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if want := p.Status.PodIP + ":8443"; p.Status.PodIP == "" || st.Endpoint != want {
		t.Errorf("Endpoint = %q, want %q", st.Endpoint, want)
	}
	if err := rt.Stop(t.Context(), "rtt-endpoint", time.Second); err != nil {
		t.Fatal(err)
	}
	if st, err := rt.Inspect(t.Context(), "rtt-endpoint"); err != nil || st.Endpoint != "" || st.Pid != 0 {
		t.Errorf("Inspect of a stopped pod = %+v, %v; want no endpoint and no pid", st, err)
	}
}

// TestUpdateResizesInPlace: Update writes the new cpu and memory as both
// requests and limits through the resize subresource, and a node without
// the memory refuses it as sandbox.ErrResourceExhausted.
func TestUpdateResizesInPlace(t *testing.T) {
	fc := newFakeCluster(t, fakeNamespace, fakeImage)
	rt := newFakeRuntime(t, fc)
	spec := testSpec("rtt-resize")
	if _, err := rt.Start(t.Context(), spec); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rt.Destroy(context.Background(), spec.ID) })
	l := spec.Limits
	l.CPUMillis, l.MemoryMiB, l.Pids = 1500, 256, 10
	if err := rt.Update(t.Context(), spec.ID, runtime.Update{Limits: &l}); err != nil {
		t.Fatalf("Update: %v", err)
	}
	p, err := fc.CoreV1().Pods(fakeNamespace).Get(t.Context(), spec.ID, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	want := corev1.ResourceList{corev1.ResourceCPU: mustQuantity("1500m"), corev1.ResourceMemory: mustQuantity("256Mi")}
	if r := p.Spec.Containers[0].Resources; !equality.Semantic.DeepEqual(r.Limits, want) || !equality.Semantic.DeepEqual(r.Requests, want) {
		t.Errorf("resources after Update = %+v, want requests and limits %v", r, want)
	}
	resizes := 0
	for _, a := range fc.Actions() {
		if a.GetVerb() == "update" && a.GetSubresource() == "resize" {
			resizes++
		}
	}
	if resizes != 1 {
		t.Errorf("%d resize updates, want 1", resizes)
	}

	l.MemoryMiB = 8192 // beyond the double's node
	err = rt.Update(t.Context(), spec.ID, runtime.Update{Limits: &l})
	if !errors.Is(err, sandbox.ErrResourceExhausted) {
		t.Errorf("Update beyond the node's memory: %v, want ErrResourceExhausted", err)
	}
}

// TestLogPath: the pod's log is streamed into LogPath.
func TestLogPath(t *testing.T) {
	fc := newFakeCluster(t, fakeNamespace, fakeImage)
	fc.PrependReactor("get", "pods/log", func(k8stesting.Action) (bool, kruntime.Object, error) {
		return true, &kruntime.Unknown{Raw: []byte("out-line\nerr-line\n")}, nil
	})
	rt := newFakeRuntime(t, fc)
	spec := testSpec("rtt-logs")
	spec.LogPath = filepath.Join(t.TempDir(), "executor.log")
	if _, err := rt.Start(t.Context(), spec); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rt.Destroy(context.Background(), spec.ID) })
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, _ := os.ReadFile(spec.LogPath)
		if string(b) == "out-line\nerr-line\n" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("log file holds %q, want both lines", b)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestWaitDestroyed: a Destroy delivers a kill to a waiter.
func TestWaitDestroyed(t *testing.T) {
	fc := newFakeCluster(t, fakeNamespace, fakeImage)
	rt := newFakeRuntime(t, fc)
	if _, err := rt.Start(t.Context(), testSpec("rtt-wait")); err != nil {
		t.Fatal(err)
	}
	ch, err := rt.Wait(t.Context(), "rtt-wait")
	if err != nil {
		t.Fatal(err)
	}
	if err := rt.Destroy(t.Context(), "rtt-wait"); err != nil {
		t.Fatal(err)
	}
	select {
	case res := <-ch:
		if res.Err != nil || res.ExitCode != 137 {
			t.Errorf("Wait after Destroy = %+v, want exit code 137", res)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no exit after Destroy")
	}
	if _, err := rt.Wait(t.Context(), "rtt-wait"); !errors.Is(err, runtime.ErrNotFound) {
		t.Errorf("Wait of a destroyed pod: %v, want ErrNotFound", err)
	}
}

// TestStopKeepsPodUntilDestroy: a stopped pod stays, with its exit code,
// held by the adapter's finalizer, until Destroy.
func TestStopKeepsPodUntilDestroy(t *testing.T) {
	fc := newFakeCluster(t, fakeNamespace, fakeImage)
	rt := newFakeRuntime(t, fc)
	if _, err := rt.Start(t.Context(), testSpec("rtt-stop")); err != nil {
		t.Fatal(err)
	}
	if err := rt.Stop(t.Context(), "rtt-stop", 100*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	p, err := fc.CoreV1().Pods(fakeNamespace).Get(t.Context(), "rtt-stop", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("pod after Stop: %v", err)
	}
	if p.DeletionTimestamp == nil || len(p.Finalizers) != 1 || p.Finalizers[0] != Finalizer {
		t.Errorf("pod after Stop: deletion %v, finalizers %v; want deleted and held by %s", p.DeletionTimestamp, p.Finalizers, Finalizer)
	}
	if st, err := rt.Inspect(t.Context(), "rtt-stop"); err != nil || st.Running || st.ExitCode != 137 {
		t.Errorf("Inspect after Stop = %+v, %v; want stopped with 137 (sleep ignores SIGTERM)", st, err)
	}
	if err := rt.Destroy(t.Context(), "rtt-stop"); err != nil {
		t.Fatal(err)
	}
	if _, err := fc.CoreV1().Pods(fakeNamespace).Get(t.Context(), "rtt-stop", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("pod after Destroy: %v, want not found", err)
	}
}

package kubernetes

// The tests against a real cluster (make test-kubernetes) run when
// SANDBOX_TEST_KUBERNETES=1 and SANDBOX_KUBECONFIG or KUBECONFIG names a
// kubeconfig file; otherwise they skip. SANDBOX_TEST_IMAGE names an image
// the cluster's nodes can pull, with /bin/sh and sleep;
// SANDBOX_TEST_NAMESPACE (default sandbox-test) is created when missing
// and then deleted. SANDBOX_TEST_HOST_USERS=1 runs the pods in the host's
// user namespace, for clusters without user namespaces. The cluster needs
// in-place pod resize (Kubernetes 1.33 or later) and room on a node for a
// pod of 1.5 cpu (the Update case).
//
// Against a real cluster, the conformance suite runs its lifecycle cases:
// StartInspect, ExitCodes, Update, UpdateErrors, Destroy, List, LogPath,
// StartFailureLeavesNothing (missing image, missing program), DuplicateID
// and InvalidLimits. It skips the cases that read what a probe writes into
// the socket directory, which a pod on a cluster node does not have: the
// isolation probes (Identity, Environment, Filesystem, Mounts, Network,
// Devices, Bubblewrap, OOMKill, PidsLimit, CPUQuota, ExecutorClaimRefill)
// and those that wait for a probe's ready file (Group, Recovery, Stop).
// TestRealClusterStop covers Stop and recovery by a second instance
// instead, with readiness read from the pod's log. CgroupLimits is skipped:
// the harness cannot read a node's cgroups.
//
// None of these has been run against a real cluster yet: where this
// adapter was written there was none. What has run is TestConformance, on
// client-go's fake clientset with a stand-in for the kubelet
// (kubelet_test.go), in make test.

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8s "k8s.io/client-go/kubernetes"

	"github.com/sandboxhq/sandbox/agent/runtime"
	"github.com/sandboxhq/sandbox/agent/runtime/runtimetest"
)

// realCluster connects to the test cluster, or skips.
func realCluster(t *testing.T) (cfg Config, image string) {
	t.Helper()
	if os.Getenv("SANDBOX_TEST_KUBERNETES") != "1" {
		t.Skip("set SANDBOX_TEST_KUBERNETES=1 to run against a real cluster (make test-kubernetes)")
	}
	kubeconfig := os.Getenv("SANDBOX_KUBECONFIG")
	if kubeconfig == "" {
		kubeconfig = os.Getenv("KUBECONFIG")
	}
	if kubeconfig == "" {
		t.Skip("no cluster: set SANDBOX_KUBECONFIG or KUBECONFIG")
	}
	image = os.Getenv("SANDBOX_TEST_IMAGE")
	if image == "" {
		t.Fatal("set SANDBOX_TEST_IMAGE to an image the cluster's nodes can pull (with /bin/sh and sleep)")
	}
	ns := os.Getenv("SANDBOX_TEST_NAMESPACE")
	if ns == "" {
		ns = "sandbox-test"
	}
	cs, err := NewClientset(kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	ensureNamespace(t, cs, ns)
	return Config{
		Clientset:     cs,
		Namespace:     ns,
		AgentSelector: map[string]string{"sandbox.test/agent": "none"},
		HostUsers:     os.Getenv("SANDBOX_TEST_HOST_USERS") == "1",
		StartTimeout:  3 * time.Minute,
		Logger:        slog.New(slog.DiscardHandler),
	}, image
}

// ensureNamespace creates ns when missing, and deletes it at the end.
func ensureNamespace(t *testing.T, cs k8s.Interface, ns string) {
	t.Helper()
	_, err := cs.CoreV1().Namespaces().Get(t.Context(), ns, metav1.GetOptions{})
	if err == nil {
		return
	}
	if !apierrors.IsNotFound(err) {
		t.Fatalf("namespace %s: %v", ns, err)
	}
	if _, err := cs.CoreV1().Namespaces().Create(t.Context(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create namespace %s: %v", ns, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := cs.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{}); err != nil {
			t.Errorf("delete namespace %s: %v", ns, err)
		}
	})
}

func openReal(t *testing.T, cfg Config) *Runtime {
	t.Helper()
	rt, err := New(t.Context(), cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { rt.Close() })
	return rt
}

func TestRealClusterConformance(t *testing.T) {
	cfg, image := realCluster(t)
	rt := openReal(t, cfg)
	pods := cfg.Clientset.CoreV1().Pods(cfg.Namespace)
	runtimetest.Run(t, runtimetest.Harness{
		Runtime: rt,
		Image:   image,
		Leftovers: func(ctx context.Context, id string) error {
			_, err := pods.Get(ctx, id, metav1.GetOptions{})
			if apierrors.IsNotFound(err) {
				return nil
			}
			if err == nil {
				return fmt.Errorf("pod %s is still there", id)
			}
			return err
		},
		Reopen:      func(t *testing.T) runtime.Runtime { return openReal(t, cfg) },
		NoSocketDir: "a pod on a cluster node does not see the test's socket directory",
	})
}

// TestRealClusterStop: Stop lets a container that handles SIGTERM exit
// with its own code, kills one that does not after the timeout, keeps the
// exit code for Inspect until Destroy, and works from a second instance
// of the adapter (a restarted agent). Readiness comes from the pod's log.
func TestRealClusterStop(t *testing.T) {
	cfg, image := realCluster(t)
	rt := openReal(t, cfg)
	cases := []struct {
		name    string
		script  string
		timeout time.Duration
		want    int
		reopen  bool
	}{
		{"graceful", `trap 'exit 3' TERM; echo ready; sleep 300 & wait`, time.Minute, 3, false},
		{"killed after timeout", `echo ready; exec sleep 300`, 300 * time.Millisecond, 137, false},
		{"from a new instance", `trap 'exit 3' TERM; echo ready; sleep 300 & wait`, time.Minute, 3, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			id := "rtt-stop-" + randomHex(4)
			spec := runtime.Spec{
				ID: id, Image: image, Limits: testSpec(id).Limits,
				Labels:  map[string]string{runtime.LabelSession: id},
				Args:    []string{"/bin/sh", "-c", c.script},
				LogPath: filepath.Join(t.TempDir(), "executor.log"),
			}
			if _, err := rt.Start(t.Context(), spec); err != nil {
				t.Fatalf("Start: %v", err)
			}
			t.Cleanup(func() {
				if err := rt.Destroy(context.Background(), id); err != nil {
					t.Errorf("Destroy: %v", err)
				}
			})
			deadline := time.Now().Add(time.Minute)
			for b, _ := os.ReadFile(spec.LogPath); !strings.Contains(string(b), "ready"); b, _ = os.ReadFile(spec.LogPath) {
				if time.Now().After(deadline) {
					t.Fatalf("the probe did not log ready within a minute (log: %q)", b)
				}
				time.Sleep(100 * time.Millisecond)
			}
			stopper := runtime.Runtime(rt)
			if c.reopen {
				stopper = openReal(t, cfg)
			}
			ch, err := stopper.Wait(t.Context(), id)
			if err != nil {
				t.Fatalf("Wait: %v", err)
			}
			if err := stopper.Stop(t.Context(), id, c.timeout); err != nil {
				t.Fatalf("Stop: %v", err)
			}
			select {
			case res := <-ch:
				if res.Err != nil || res.ExitCode != c.want {
					t.Errorf("Wait = %+v, want exit code %d", res, c.want)
				}
			case <-time.After(time.Minute):
				t.Fatal("no exit within a minute of Stop")
			}
			st, err := rt.Inspect(t.Context(), id)
			if err != nil || st.Running || st.ExitCode != c.want {
				t.Errorf("Inspect after Stop = %+v, %v; want stopped with %d", st, err, c.want)
			}
			if err := stopper.Stop(t.Context(), id, time.Second); err != nil {
				t.Errorf("Stop of a stopped container: %v", err)
			}
		})
	}
}

package kubernetes

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"github.com/sandboxhq/sandbox/agent/runtime"
)

// fakeCluster is client-go's fake clientset made to behave, where the
// adapter depends on it, as an API server and the kubelet of one node do.
//
// The API server part (reactors on pods): a new pod gets a UID and a
// creation time; the scheduler's binding sets its node; deletion is
// graceful (a deletionTimestamp after the request's or the pod's grace
// period; at once for a pod not bound or already ended) and waits for the
// pod's finalizers; the UID precondition of a delete holds; the status and
// resize subresources change only the status and the containers' resources.
// What the tracker underneath does not do: resource versions (watches
// always start with the current objects), field selectors on watches, and
// validation.
//
// The kubelet part is kubelet.
type fakeCluster struct {
	*fake.Clientset
	ns      string
	kubelet *kubelet
}

// newFakeCluster starts a fake cluster whose kubelet knows images; with
// no images, it has no kubelet (its pods stay Pending, unscheduled).
func newFakeCluster(t *testing.T, ns string, images ...string) *fakeCluster {
	t.Helper()
	cs := fake.NewClientset()
	tracker := cs.Tracker()
	cs.PrependReactor("*", "pods", apiServerPods(tracker))
	fc := &fakeCluster{Clientset: cs, ns: ns}
	if len(images) == 0 {
		return fc
	}
	k := &kubelet{
		client:      cs,
		ns:          ns,
		node:        "fake-node",
		images:      map[string]bool{},
		capacityMiB: 4096,
		socketDirs:  map[string]string{},
		runs:        map[types.UID]*run{},
		done:        make(chan struct{}),
	}
	for _, img := range images {
		k.images[img] = true
	}
	ctx, cancel := context.WithCancel(context.Background())
	w, err := cs.CoreV1().Pods(ns).Watch(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatalf("kubelet double: watch pods: %v", err)
	}
	go k.loop(ctx, w)
	t.Cleanup(func() {
		cancel()
		<-k.done
	})
	fc.kubelet = k
	return fc
}

// leftovers reports a pod the API still holds for id.
func (fc *fakeCluster) leftovers(ctx context.Context, id string) error {
	p, err := fc.CoreV1().Pods(fc.ns).Get(ctx, id, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return err
	}
	return fmt.Errorf("pod %s is still there (finalizers %v, deleting since %v)", id, p.Finalizers, p.DeletionTimestamp)
}

var podsResource = corev1.SchemeGroupVersion.WithResource("pods")

// apiServerPods is the API server's handling of pods, on top of tracker.
// The fake clientset runs one reaction at a time, so each is atomic.
func apiServerPods(tracker k8stesting.ObjectTracker) k8stesting.ReactionFunc {
	get := func(ns, name string) (*corev1.Pod, error) {
		obj, err := tracker.Get(podsResource, ns, name)
		if err != nil {
			return nil, err
		}
		return obj.(*corev1.Pod), nil
	}
	// store writes p, or drops it once it is deleted, without a grace
	// period left or a finalizer.
	store := func(ns string, p *corev1.Pod) error {
		if p.DeletionTimestamp != nil && *p.DeletionGracePeriodSeconds == 0 && len(p.Finalizers) == 0 {
			return tracker.Delete(podsResource, ns, p.Name)
		}
		return tracker.Update(podsResource, p, ns)
	}
	return func(action k8stesting.Action) (bool, kruntime.Object, error) {
		ns := action.GetNamespace()
		switch a := action.(type) {
		case k8stesting.CreateActionImpl:
			switch a.GetSubresource() {
			case "":
				p := a.GetObject().(*corev1.Pod).DeepCopy()
				p.UID = types.UID(randomHex(8))
				p.CreationTimestamp = metav1.Now()
				p.Generation = 1
				return true, p, tracker.Create(podsResource, p, ns)
			case "binding":
				b := a.GetObject().(*corev1.Binding)
				p, err := get(ns, b.Name)
				if err != nil {
					return true, nil, err
				}
				if p.Spec.NodeName != "" {
					return true, nil, apierrors.NewConflict(podsResource.GroupResource(), b.Name, fmt.Errorf("pod is already bound to %s", p.Spec.NodeName))
				}
				p.Spec.NodeName = b.Target.Name
				return true, b, store(ns, p)
			}
		case k8stesting.UpdateActionImpl:
			sent := a.GetObject().(*corev1.Pod)
			p, err := get(ns, sent.Name)
			if err != nil {
				return true, nil, err
			}
			switch a.GetSubresource() {
			case "status":
				p.Status = *sent.Status.DeepCopy()
			case "resize":
				for i := range p.Spec.Containers {
					p.Spec.Containers[i].Resources = *sent.Spec.Containers[i].Resources.DeepCopy()
				}
				p.Generation++
			default:
				return true, nil, fmt.Errorf("fake API server: update of pods/%s not supported", a.GetSubresource())
			}
			return true, p, store(ns, p)
		case k8stesting.PatchActionImpl:
			if a.GetSubresource() != "" {
				return true, nil, fmt.Errorf("fake API server: patch of pods/%s not supported", a.GetSubresource())
			}
			_, obj, err := k8stesting.ObjectReaction(tracker)(a)
			if err != nil {
				return true, nil, err
			}
			p := obj.(*corev1.Pod)
			return true, p, store(ns, p)
		case k8stesting.DeleteActionImpl:
			p, err := get(ns, a.GetName())
			if err != nil {
				return true, nil, err
			}
			opts := a.DeleteOptions
			if pre := opts.Preconditions; pre != nil && pre.UID != nil && *pre.UID != p.UID {
				return true, nil, apierrors.NewConflict(podsResource.GroupResource(), p.Name,
					fmt.Errorf("precondition failed: UID in precondition: %s, UID in object meta: %s", *pre.UID, p.UID))
			}
			grace := int64(30)
			if p.Spec.TerminationGracePeriodSeconds != nil {
				grace = *p.Spec.TerminationGracePeriodSeconds
			}
			if opts.GracePeriodSeconds != nil {
				grace = *opts.GracePeriodSeconds
			}
			if p.Spec.NodeName == "" || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
				grace = 0
			}
			if p.DeletionGracePeriodSeconds != nil && *p.DeletionGracePeriodSeconds <= grace {
				return true, nil, nil // a deletion at least as quick is under way
			}
			at := metav1.NewTime(time.Now().Add(time.Duration(grace) * time.Second))
			p.DeletionTimestamp, p.DeletionGracePeriodSeconds = &at, &grace
			return true, nil, store(ns, p)
		}
		return false, nil, nil
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// kubelet stands in for the scheduler and the kubelet of one node: it
// watches the fake cluster's pods, binds new ones to its node and moves
// them through their lifecycle as their command would. It runs no process;
// it knows the few command shapes of the conformance suite's lifecycle
// cases (see interpret), and fails the start of any other, as a runtime
// fails a missing program. An image it does not know cannot be pulled.
type kubelet struct {
	client *fake.Clientset
	ns     string
	node   string
	images map[string]bool
	// capacityMiB is the node's memory: a resize beyond it is infeasible.
	capacityMiB int64

	mu sync.Mutex
	// socketDirs holds the host directory of each pod's Spec, which a real
	// kubelet never sees: the double writes the probes' ready files there.
	socketDirs map[string]string

	// executor, when set, runs an executor for a pod of the image's own
	// entrypoint and returns the IP it serves on (the pod's IP), and how
	// to stop it; nil: such pods run nothing.
	executor func(p *corev1.Pod) (ip string, stop func())

	// Owned by loop.
	runs   map[types.UID]*run
	nextIP int
	done   chan struct{}
}

// run is the double's record of one pod's container.
type run struct {
	// pod is its latest state seen.
	pod     *corev1.Pod
	prog    program
	state   runState
	started time.Time
	// killAt is when the container gets SIGKILL (zero: not being stopped).
	killAt       time.Time
	finalDeleted bool
	// stopExecutor stops the executor the double runs for it, if any.
	stopExecutor func()
}

type runState int

const (
	pulling runState = iota
	runningState
	exitedState
)

// program is what the double makes of a container's command.
type program struct {
	// exit, when set, is the exit code of a command that ends at once.
	exit *int32
	// termExit, when set, is the exit code on SIGTERM; nil: the process
	// ignores SIGTERM (PID 1 without a handler) and dies at SIGKILL.
	termExit *int32
	// ready: it touches /run/sandbox/ready once it runs.
	ready bool
	// startErr, when set, is why the runtime cannot start it.
	startErr string
}

var (
	exitScript = regexp.MustCompile(`^exit (\d+)$`)
	trapPrefix = regexp.MustCompile(`^trap 'exit (\d+)' TERM; `)
)

// interpret reads the command shapes of the suite's lifecycle cases:
//
//	(none: the image's executor)   runs; exits 0 on SIGTERM
//	sleep N                        runs; ignores SIGTERM (PID 1)
//	sh -c 'exit N'                 exits N at once
//	sh -c '[trap 'exit N' TERM; ][touch /run/sandbox/ready; ](sleep 300 & wait|exec sleep 300)'
//	                               runs; exits N on SIGTERM when trapped,
//	                               else ignores it; writes the ready file
//	anything else                  cannot start (StartError, as a missing
//	                               program: /nonexistent/program)
func interpret(cmd []string) program {
	switch {
	case len(cmd) == 0:
		return program{termExit: ptr(int32(0))}
	case len(cmd) == 2 && cmd[0] == "sleep":
		return program{}
	case len(cmd) == 3 && (cmd[0] == "/bin/sh" || cmd[0] == "sh") && cmd[1] == "-c":
		s := cmd[2]
		if m := exitScript.FindStringSubmatch(s); m != nil {
			return program{exit: exitCode(m[1])}
		}
		var p program
		if m := trapPrefix.FindStringSubmatch(s); m != nil {
			p.termExit = exitCode(m[1])
			s = s[len(m[0]):]
		}
		s, p.ready = strings.CutPrefix(s, "touch /run/sandbox/ready; ")
		if s == "sleep 300 & wait" || s == "exec sleep 300" {
			return p
		}
		return program{startErr: fmt.Sprintf("the kubelet double cannot run the script %q", cmd[2])}
	}
	return program{startErr: fmt.Sprintf("exec: %q: stat %s: no such file or directory", cmd[0], cmd[0])}
}

func exitCode(s string) *int32 {
	n, _ := strconv.ParseInt(s, 10, 32)
	return ptr(int32(n))
}

// bindSocketDir records the host directory of pod id's Spec.
func (k *kubelet) bindSocketDir(id, dir string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.socketDirs[id] = dir
}

func (k *kubelet) socketDir(id string) string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.socketDirs[id]
}

func (k *kubelet) loop(ctx context.Context, w watch.Interface) {
	defer close(k.done)
	defer w.Stop()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case ev, ok := <-w.ResultChan():
			if !ok {
				return
			}
			k.handle(ctx, ev)
		case <-timer.C:
			k.kill(ctx)
		}
		next := time.Hour
		for _, r := range k.runs {
			if !r.killAt.IsZero() {
				next = min(next, time.Until(r.killAt))
			}
		}
		timer.Reset(max(next, 0))
	}
}

func (k *kubelet) handle(ctx context.Context, ev watch.Event) {
	p, ok := ev.Object.(*corev1.Pod)
	if !ok {
		return
	}
	if ev.Type == watch.Deleted {
		delete(k.runs, p.UID)
		k.mu.Lock()
		delete(k.socketDirs, p.Name)
		k.mu.Unlock()
		return
	}
	r := k.runs[p.UID]
	if r == nil {
		if p.Spec.NodeName == "" {
			if p.DeletionTimestamp == nil {
				k.bind(ctx, p)
			}
			return
		}
		if p.Spec.NodeName != k.node || p.DeletionTimestamp != nil {
			return
		}
		r = &run{pod: p, prog: interpret(p.Spec.Containers[0].Command)}
		k.runs[p.UID] = r
		k.start(ctx, p, r)
	}
	r.pod = p
	if p.DeletionTimestamp != nil {
		k.terminate(ctx, p, r)
		return
	}
	if r.state == runningState && running(p) {
		k.resize(ctx, p)
	}
}

// bind is the scheduler's part.
func (k *kubelet) bind(ctx context.Context, p *corev1.Pod) {
	err := k.client.CoreV1().Pods(k.ns).Bind(ctx, &corev1.Binding{
		ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: k.ns, UID: p.UID},
		Target:     corev1.ObjectReference{Kind: "Node", Name: k.node},
	}, metav1.CreateOptions{})
	k.check("bind", p, err)
}

// check ignores the errors of a pod that changed or went meanwhile.
func (k *kubelet) check(op string, p *corev1.Pod, err error) {
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		panic(fmt.Sprintf("kubelet double: %s pod %s: %v", op, p.Name, err))
	}
}

// setStatus writes the status change makes to pod p's current one.
func (k *kubelet) setStatus(ctx context.Context, p *corev1.Pod, change func(*corev1.Pod)) {
	cur, err := k.client.CoreV1().Pods(k.ns).Get(ctx, p.Name, metav1.GetOptions{})
	if err != nil || cur.UID != p.UID {
		return
	}
	change(cur)
	_, err = k.client.CoreV1().Pods(k.ns).UpdateStatus(ctx, cur, metav1.UpdateOptions{})
	k.check("update status of", cur, err)
}

func (k *kubelet) start(ctx context.Context, p *corev1.Pod, r *run) {
	c := p.Spec.Containers[0]
	now := metav1.Now()
	base := func(st *corev1.PodStatus) {
		k.nextIP++
		st.HostIP = "192.0.2.1"
		st.PodIP = fmt.Sprintf("10.244.%d.%d", k.nextIP/250, k.nextIP%250+2)
		st.PodIPs = []corev1.PodIP{{IP: st.PodIP}}
		st.StartTime = &now
		st.QOSClass = corev1.PodQOSGuaranteed
		st.Conditions = []corev1.PodCondition{{Type: corev1.PodScheduled, Status: corev1.ConditionTrue}}
	}
	cs := corev1.ContainerStatus{Name: c.Name, Image: c.Image, ImageID: c.Image + "@sha256:" + strings.Repeat("0", 64)}
	switch {
	case !k.images[c.Image]:
		r.state = pulling
		k.setStatus(ctx, p, func(cur *corev1.Pod) {
			base(&cur.Status)
			cur.Status.Phase = corev1.PodPending
			cs.State.Waiting = &corev1.ContainerStateWaiting{Reason: "ErrImagePull",
				Message: fmt.Sprintf("failed to pull and unpack image %q: %s: not found", c.Image, c.Image)}
			cur.Status.ContainerStatuses = []corev1.ContainerStatus{cs}
		})
	case r.prog.startErr != "":
		r.state = exitedState
		k.setStatus(ctx, p, func(cur *corev1.Pod) {
			base(&cur.Status)
			cur.Status.Phase = corev1.PodFailed
			cs.State.Terminated = &corev1.ContainerStateTerminated{ExitCode: 128, Reason: "StartError",
				Message:   "failed to create containerd task: failed to create shim task: OCI runtime create failed: " + r.prog.startErr,
				StartedAt: metav1.NewTime(time.Unix(0, 0)), FinishedAt: now}
			cur.Status.ContainerStatuses = []corev1.ContainerStatus{cs}
		})
	default:
		r.state, r.started = runningState, now.Time
		var ip string
		if len(c.Command) == 0 && k.executor != nil {
			ip, r.stopExecutor = k.executor(p)
		}
		k.setStatus(ctx, p, func(cur *corev1.Pod) {
			base(&cur.Status)
			if ip != "" {
				cur.Status.PodIP, cur.Status.PodIPs = ip, []corev1.PodIP{{IP: ip}}
			}
			cur.Status.Phase = corev1.PodRunning
			cur.Status.Conditions = append(cur.Status.Conditions, corev1.PodCondition{Type: corev1.PodReady, Status: corev1.ConditionTrue})
			cs.ContainerID = "containerd://" + randomHex(32)
			cs.Ready, cs.Started = true, ptr(true)
			cs.State.Running = &corev1.ContainerStateRunning{StartedAt: now}
			cs.Resources = c.Resources.DeepCopy()
			cs.AllocatedResources = c.Resources.Requests.DeepCopy()
			cur.Status.ContainerStatuses = []corev1.ContainerStatus{cs}
		})
		if dir := k.socketDir(p.Name); r.prog.ready && dir != "" {
			if err := os.WriteFile(filepath.Join(dir, "ready"), nil, 0o644); err != nil {
				panic(fmt.Sprintf("kubelet double: write the ready file of pod %s: %v", p.Name, err))
			}
		}
		if r.prog.exit != nil {
			k.exit(ctx, p, r, *r.prog.exit)
		}
	}
}

// terminate is the kubelet's part of a deletion: SIGTERM, SIGKILL at the
// end of the grace period, the final status, the final delete.
func (k *kubelet) terminate(ctx context.Context, p *corev1.Pod, r *run) {
	switch r.state {
	case runningState:
		switch {
		case r.prog.termExit != nil:
			k.exit(ctx, p, r, *r.prog.termExit)
		case *p.DeletionGracePeriodSeconds == 0:
			k.exit(ctx, p, r, killedExit)
		case r.killAt.IsZero() || p.DeletionTimestamp.Time.Before(r.killAt):
			r.killAt = p.DeletionTimestamp.Time
		}
	case pulling:
		r.state = exitedState
		k.setStatus(ctx, p, func(cur *corev1.Pod) { cur.Status.Phase = corev1.PodFailed })
		k.finalDelete(ctx, p, r)
	case exitedState:
		k.finalDelete(ctx, p, r)
	}
}

// kill sends SIGKILL to the containers whose grace period is over.
func (k *kubelet) kill(ctx context.Context) {
	for _, r := range k.runs {
		if r.state == runningState && !r.killAt.IsZero() && !time.Now().Before(r.killAt) {
			k.exit(ctx, r.pod, r, killedExit)
		}
	}
}

func (k *kubelet) exit(ctx context.Context, p *corev1.Pod, r *run, code int32) {
	r.state, r.killAt = exitedState, time.Time{}
	if r.stopExecutor != nil {
		r.stopExecutor()
		r.stopExecutor = nil
	}
	k.setStatus(ctx, p, func(cur *corev1.Pod) {
		cur.Status.Phase = corev1.PodSucceeded
		reason := "Completed"
		if code != 0 {
			cur.Status.Phase, reason = corev1.PodFailed, "Error"
		}
		for i := range cur.Status.Conditions {
			if cur.Status.Conditions[i].Type == corev1.PodReady {
				cur.Status.Conditions[i].Status = corev1.ConditionFalse
			}
		}
		cs := &cur.Status.ContainerStatuses[0]
		cs.Ready, cs.Started = false, ptr(false)
		cs.State = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
			ExitCode: code, Reason: reason, StartedAt: metav1.NewTime(r.started), FinishedAt: metav1.Now(), ContainerID: cs.ContainerID,
		}}
	})
	if p.DeletionTimestamp != nil {
		k.finalDelete(ctx, p, r)
	}
}

// finalDelete is the kubelet's delete, without a grace period, of a pod
// whose containers are gone; the API server keeps it while it has
// finalizers.
func (k *kubelet) finalDelete(ctx context.Context, p *corev1.Pod, r *run) {
	if r.finalDeleted {
		return
	}
	r.finalDeleted = true
	err := k.client.CoreV1().Pods(k.ns).Delete(ctx, p.Name, metav1.DeleteOptions{
		GracePeriodSeconds: ptr(int64(0)), Preconditions: metav1.NewUIDPreconditions(string(p.UID)),
	})
	k.check("delete", p, err)
}

// resize applies the container's resources, when they changed and the
// node has the memory; else the resize is infeasible.
func (k *kubelet) resize(ctx context.Context, p *corev1.Pod) {
	c := p.Spec.Containers[0]
	cs := p.Status.ContainerStatuses[0]
	if cs.Resources != nil && sameLimits(cs.Resources.Limits, c.Resources.Limits) {
		return
	}
	mem := c.Resources.Limits[corev1.ResourceMemory]
	k.setStatus(ctx, p, func(cur *corev1.Pod) {
		conds := cur.Status.Conditions[:0]
		for _, cond := range cur.Status.Conditions {
			if cond.Type != corev1.PodResizePending {
				conds = append(conds, cond)
			}
		}
		cur.Status.Conditions = conds
		if mem.Value() > k.capacityMiB*mib {
			cur.Status.Conditions = append(cur.Status.Conditions, corev1.PodCondition{
				Type: corev1.PodResizePending, Status: corev1.ConditionTrue, Reason: corev1.PodReasonInfeasible,
				Message: fmt.Sprintf("Node didn't have enough capacity: memory, requested: %d, capacity: %d", mem.Value(), k.capacityMiB*mib),
			})
			return
		}
		cur.Status.ContainerStatuses[0].Resources = c.Resources.DeepCopy()
		cur.Status.ContainerStatuses[0].AllocatedResources = c.Resources.Requests.DeepCopy()
	})
}

// hostDirs hands the kubelet double each Spec's socket directory before
// the adapter starts it.
type hostDirs struct {
	runtime.Runtime
	k *kubelet
}

func (h hostDirs) Start(ctx context.Context, spec runtime.Spec) (runtime.Status, error) {
	h.k.bindSocketDir(spec.ID, spec.SocketDir)
	return h.Runtime.Start(ctx, spec)
}

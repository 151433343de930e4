// Package kubernetes is the agent's runtime adapter for Kubernetes: each
// sandbox container is a Pod (named by Spec.ID, restartPolicy Never, one
// container), created through client-go in one namespace. buildPod writes
// down every permission the pod has; in short:
//
//   - uid/gid 1000, runAsNonRoot, no capabilities (drop ALL),
//     allowPrivilegeEscalation false (no_new_privs), a read-only root;
//   - seccomp: the Localhost profile Config.SeccompProfile names, or the
//     runtime's default when it is empty. bubblewrap needs the widened
//     profile (isolation.SeccompProfile, written as JSON into the kubelet's
//     seccomp directory on every node): the default one refuses the
//     namespaces and mounts bubblewrap makes, so executions fail under it;
//   - a user namespace (hostUsers false) with an unmasked /proc, which
//     bubblewrap needs to mount its own; Config.HostUsers turns both off for
//     clusters without user namespaces (and bubblewrap with them). Pod
//     Security: the "restricted" level refuses an unmasked /proc in any
//     version; "baseline" of Kubernetes 1.35 or later allows it in a user
//     namespace. So the sandbox namespace must enforce baseline (1.35+),
//     or the pods run with HostUsers, which restricted accepts;
//   - /workspace (Limits.DiskMiB), /tmp (Config.TmpMiB) and /run/sandbox
//     are emptyDir volumes in memory (tmpfs) with a size limit; nothing from
//     the host is mounted, and no service account token;
//   - cpu and memory requests equal to the limits (no swap: Kubernetes
//     gives none to Guaranteed pods). Kubernetes has no per-pod pids limit:
//     Limits.Pids is validated but the node's pod pids limit
//     (podPidsLimit in the kubelet's configuration) is what applies. Nor
//     does it set rlimits: the runtime's defaults apply;
//   - the executor serves TCP on the pod's IP (EXECUTOR_HOST=0.0.0.0,
//     EXECUTOR_PORT=Config.ExecutorPort; Status.Endpoint is where), and one
//     NetworkPolicy per namespace (PolicyName) lets only the agents' pods
//     (Config.AgentSelector) in, on that port, and nothing out. It holds
//     only where the cluster's network plugin enforces NetworkPolicy.
//
// Status.Pid is 1 for a running container, its pid in its own pid
// namespace: Kubernetes tells no other. Status.Endpoint is the pod's IP and
// ExecutorPort.
//
// Spec.SocketDir is not used: the pod runs on a cluster node, where the
// agent's directory is not. Spec.Group is ignored: every pod has its own
// kubelet-managed supervision. Spec.LogPath receives the container's log
// (stdout and stderr together), streamed by the adapter, best effort.
package kubernetes

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	k8s "k8s.io/client-go/kubernetes"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/util/retry"

	"github.com/sandboxhq/sandbox"
	"github.com/sandboxhq/sandbox/agent/runtime"
	"github.com/sandboxhq/sandbox/agent/runtime/isolation"
)

// Config configures the adapter.
type Config struct {
	// Clientset talks to the cluster (NewClientset makes one).
	Clientset k8s.Interface
	// Namespace holds the sandbox pods and their NetworkPolicy.
	Namespace string
	// NodeName, when set, pins the pods to that node (the agent's own), past
	// the scheduler. Optional.
	NodeName string
	// RuntimeClassName, when set, runs the pods under that RuntimeClass
	// (gvisor, kata...). Optional.
	RuntimeClassName string
	// AgentSelector are the labels of the agents' pods: the only pods the
	// NetworkPolicy lets reach the executors. Must not be empty.
	AgentSelector map[string]string
	// AgentNamespace is the namespace of the agents' pods; empty: Namespace.
	AgentNamespace string
	// ExecutorPort is the executor's TCP port in every pod.
	ExecutorPort int32
	// CallbackPort, when set, is the agents' port the executors may reach
	// (their callbacks); zero: the pods may reach nothing at all.
	CallbackPort int32
	// ImagePullPolicy of the pods' container.
	ImagePullPolicy corev1.PullPolicy
	// SeccompProfile is the Localhost seccomp profile of the pods, a path
	// relative to the kubelet's seccomp directory (e.g.
	// "profiles/sandbox.json"); empty: the runtime's default profile, under
	// which bubblewrap cannot work.
	SeccompProfile string
	// HostUsers runs the pods in the host's user namespace with a masked
	// /proc, for clusters without user namespaces; bubblewrap cannot mount
	// its /proc there. The default (false) gives each pod a user namespace.
	HostUsers bool
	// TmpMiB is the size of each pod's /tmp.
	TmpMiB int64
	// TerminationGracePeriod is the pods' terminationGracePeriodSeconds,
	// which applies when a pod is deleted other than by Stop or Destroy.
	TerminationGracePeriod time.Duration
	// StartTimeout bounds a Start: scheduling, image pull, container start.
	StartTimeout time.Duration
	// ErrorGrace is how long a Start lets the pod report a container error
	// the kubelet retries (ErrImagePull, ImagePullBackOff,
	// CreateContainerError) before it gives up.
	ErrorGrace time.Duration
	// ResizeTimeout bounds how long Update waits for the kubelet to apply
	// new limits.
	ResizeTimeout time.Duration
	// Logger receives one line per pod event; nil means slog.Default().
	Logger *slog.Logger
}

// DefaultConfig is the configuration of an agent running in the cluster as
// deploy/kubernetes has it; Clientset must still be set.
func DefaultConfig() Config {
	return Config{
		Namespace:              "sandboxes",
		AgentSelector:          map[string]string{"app.kubernetes.io/name": "sandbox-agent"},
		AgentNamespace:         "sandbox-system",
		ExecutorPort:           8080,
		ImagePullPolicy:        corev1.PullIfNotPresent,
		TmpMiB:                 isolation.DefaultTmpMiB,
		TerminationGracePeriod: 10 * time.Second,
		StartTimeout:           5 * time.Minute,
		ErrorGrace:             30 * time.Second,
		ResizeTimeout:          30 * time.Second,
	}
}

// NewClientset connects to the cluster of the kubeconfig file, or, when
// kubeconfig is empty, to the one the agent's pod runs in.
func NewClientset(kubeconfig string) (k8s.Interface, error) {
	var cfg *rest.Config
	var err error
	if kubeconfig == "" {
		cfg, err = rest.InClusterConfig()
	} else {
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	}
	if err != nil {
		return nil, fmt.Errorf("kubernetes client configuration (kubeconfig %q): %w", kubeconfig, err)
	}
	cfg.UserAgent = "sandbox-agent"
	// client-go's default (5/s, bursts of 10) would queue a warm pool's refill.
	cfg.QPS, cfg.Burst = 50, 100
	cs, err := k8s.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	return cs, nil
}

// Runtime runs sandbox containers as pods. It is safe for concurrent use.
type Runtime struct {
	cfg  Config
	pods typedcorev1.PodInterface
	log  *slog.Logger

	// ctx bounds the log streams, which wg counts; Close ends them.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex
	// logs ends the log stream of a pod, by name.
	logs map[string]*logStream
}

type logStream struct{ cancel context.CancelFunc }

var _ runtime.Runtime = (*Runtime)(nil)

// New checks cfg and makes sure the namespace's NetworkPolicy is the one
// cfg describes (which also proves the cluster answers). Zero fields of cfg
// take DefaultConfig's values, but for the optional ones.
func New(ctx context.Context, cfg Config) (*Runtime, error) {
	def := DefaultConfig()
	if cfg.Clientset == nil {
		return nil, fmt.Errorf("%w: kubernetes runtime: no clientset", sandbox.ErrInvalidArgument)
	}
	if cfg.Namespace == "" {
		cfg.Namespace = def.Namespace
	}
	if len(cfg.AgentSelector) == 0 {
		cfg.AgentSelector = def.AgentSelector
	}
	if cfg.ExecutorPort == 0 {
		cfg.ExecutorPort = def.ExecutorPort
	}
	if cfg.ImagePullPolicy == "" {
		cfg.ImagePullPolicy = def.ImagePullPolicy
	}
	if cfg.TmpMiB <= 0 {
		cfg.TmpMiB = def.TmpMiB
	}
	if cfg.TerminationGracePeriod <= 0 {
		cfg.TerminationGracePeriod = def.TerminationGracePeriod
	}
	if cfg.StartTimeout <= 0 {
		cfg.StartTimeout = def.StartTimeout
	}
	if cfg.ErrorGrace <= 0 {
		cfg.ErrorGrace = def.ErrorGrace
	}
	if cfg.ResizeTimeout <= 0 {
		cfg.ResizeTimeout = def.ResizeTimeout
	}
	if err := validateLabels(cfg.AgentSelector); err != nil {
		return nil, fmt.Errorf("kubernetes runtime: agent selector: %w", err)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	r := &Runtime{
		cfg:  cfg,
		pods: cfg.Clientset.CoreV1().Pods(cfg.Namespace),
		log:  log.With("namespace", cfg.Namespace),
		logs: map[string]*logStream{},
	}
	if err := r.ensurePolicy(ctx); err != nil {
		return nil, err
	}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	return r, nil
}

// Close ends the log streams; the pods keep running.
func (r *Runtime) Close() error {
	r.cancel()
	r.wg.Wait()
	return nil
}

// Namespace is the namespace of the sandbox pods.
func (r *Runtime) Namespace() string { return r.cfg.Namespace }

// ensurePolicy creates the namespace's NetworkPolicy, or updates it to
// what cfg describes. Agents sharing a namespace must agree on it.
func (r *Runtime) ensurePolicy(ctx context.Context) error {
	want := networkPolicy(r.cfg)
	api := r.cfg.Clientset.NetworkingV1().NetworkPolicies(r.cfg.Namespace)
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cur, err := api.Get(ctx, want.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			_, err = api.Create(ctx, want, metav1.CreateOptions{})
			if apierrors.IsAlreadyExists(err) {
				// Another agent made it meanwhile: compare again.
				return apierrors.NewConflict(networkingGroupResource, want.Name, err)
			}
			if err == nil {
				r.log.Info("network policy created", "policy", want.Name)
			}
			return err
		}
		if err != nil {
			return err
		}
		if equality.Semantic.DeepEqual(cur.Spec, want.Spec) && cur.Labels[LabelManagedBy] == ManagedBy {
			return nil
		}
		cur.Spec = want.Spec
		if cur.Labels == nil {
			cur.Labels = map[string]string{}
		}
		maps.Copy(cur.Labels, want.Labels)
		if _, err := api.Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
			return err
		}
		r.log.Info("network policy updated", "policy", want.Name)
		return nil
	})
	if err != nil {
		return fmt.Errorf("network policy %s/%s: %w", r.cfg.Namespace, want.Name, err)
	}
	return nil
}

var networkingGroupResource = networkingv1.Resource("networkpolicies")

// cleanupCtx outlives a cancelled caller so that undoing a half-made start
// or a destroy is not cut short.
func cleanupCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
}

// mapErr turns the API's answers into the port's and the domain's errors.
func mapErr(op, id string, err error) error {
	switch {
	case apierrors.IsNotFound(err):
		return fmt.Errorf("%s container %s: %w (%v)", op, id, runtime.ErrNotFound, err)
	case apierrors.IsAlreadyExists(err):
		return fmt.Errorf("%s container %s: %w (%v)", op, id, sandbox.ErrAlreadyExists, err)
	case apierrors.IsInvalid(err), apierrors.IsBadRequest(err):
		return fmt.Errorf("%s container %s: %w (%v)", op, id, sandbox.ErrInvalidArgument, err)
	}
	return fmt.Errorf("%s container %s: %w", op, id, err)
}

func (r *Runtime) get(ctx context.Context, op, id string) (*corev1.Pod, error) {
	p, err := r.pods.Get(ctx, id, metav1.GetOptions{})
	if err != nil {
		return nil, mapErr(op, id, err)
	}
	return p, nil
}

// Start creates the pod and waits until its container runs (or has run
// and exited already). It fails when the kubelet cannot start the
// container (an image it cannot pull for longer than ErrorGrace, a program
// that is not there) or StartTimeout passes; then it deletes the pod. A pod
// that already exists under the same name is left alone.
func (r *Runtime) Start(ctx context.Context, spec runtime.Spec) (runtime.Status, error) {
	begin := time.Now()
	if err := validateSpec(spec); err != nil {
		return runtime.Status{}, err
	}
	pod := buildPod(r.cfg, spec)
	// From here on the pod's name stands for the container.
	spec.ID = pod.Name
	created, err := r.pods.Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		return runtime.Status{}, mapErr("start", spec.ID, err)
	}
	p, err := r.awaitStart(ctx, created)
	if err != nil {
		cctx, cancel := cleanupCtx(ctx)
		defer cancel()
		if derr := r.remove(cctx, spec.ID, created.UID); derr != nil {
			r.log.Error("cannot delete pod after failed start", "container", spec.ID, "err", derr)
		}
		return runtime.Status{}, fmt.Errorf("start container %s: %w", spec.ID, err)
	}
	if spec.LogPath != "" {
		r.streamLogs(spec.ID, spec.LogPath)
	}
	r.log.Debug("container started", "container", spec.ID, "image", spec.Image, "node", p.Spec.NodeName,
		"ip", p.Status.PodIP, "duration", time.Since(begin))
	return status(p, r.cfg.ExecutorPort), nil
}

// Reasons of a waiting container that the kubelet retries, and of one it
// does not.
var (
	retriedWaiting = []string{"ErrImagePull", "ImagePullBackOff", "CreateContainerError"}
	fatalWaiting   = []string{"InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError"}
)

var errStartTimeout = errors.New("start timeout")

// awaitStart follows a new pod until its container runs or has run.
func (r *Runtime) awaitStart(ctx context.Context, created *corev1.Pod) (*corev1.Pod, error) {
	ctx, cancel := context.WithTimeoutCause(ctx, r.cfg.StartTimeout, errStartTimeout)
	defer cancel()
	states := r.follow(ctx, created)
	var grace <-chan time.Time
	last := created
	for {
		select {
		case <-ctx.Done():
			if context.Cause(ctx) == errStartTimeout {
				return nil, fmt.Errorf("%w: pod did not start within %s: %s", sandbox.ErrUnavailable, r.cfg.StartTimeout, describe(last))
			}
			return nil, ctx.Err()
		case <-grace:
			return nil, fmt.Errorf("%w: %s", sandbox.ErrFailedPrecondition, describe(last))
		case s, ok := <-states:
			if !ok {
				states = nil // ctx is done
				continue
			}
			p := s.pod
			last = p
			if s.deleted || p.DeletionTimestamp != nil {
				return nil, fmt.Errorf("%w: pod deleted while starting: %s", sandbox.ErrUnavailable, describe(p))
			}
			_, cs := container(p)
			switch {
			case cs != nil && cs.State.Running != nil:
				return p, nil
			case cs != nil && cs.State.Terminated != nil:
				t := cs.State.Terminated
				// A container the runtime could not start reports a
				// StartError, exit code 128 and no start time.
				if t.Reason == "StartError" || t.Reason == "ContainerCannotRun" || t.StartedAt.Unix() <= 0 {
					return nil, fmt.Errorf("%w: container could not run: %s", sandbox.ErrFailedPrecondition, describe(p))
				}
				return p, nil
			case p.Status.Phase == corev1.PodFailed || p.Status.Phase == corev1.PodSucceeded:
				return nil, fmt.Errorf("%w: pod ended before its container ran: %s", sandbox.ErrUnavailable, describe(p))
			case cs != nil && cs.State.Waiting != nil && slices.Contains(fatalWaiting, cs.State.Waiting.Reason):
				return nil, fmt.Errorf("%w: %s", sandbox.ErrFailedPrecondition, describe(p))
			case cs != nil && cs.State.Waiting != nil && slices.Contains(retriedWaiting, cs.State.Waiting.Reason):
				if grace == nil {
					grace = time.After(r.cfg.ErrorGrace)
				}
			default:
				grace = nil
			}
		}
	}
}

// describe says where a pod stands, for errors: its phase, its container's
// state and why, and why it is not scheduled.
func describe(p *corev1.Pod) string {
	phase := p.Status.Phase
	if phase == "" {
		phase = corev1.PodPending
	}
	parts := []string{fmt.Sprintf("pod %s is %s", p.Name, phase)}
	if p.Status.Reason != "" {
		parts = append(parts, fmt.Sprintf("%s: %s", p.Status.Reason, p.Status.Message))
	}
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodScheduled && c.Status == corev1.ConditionFalse {
			parts = append(parts, fmt.Sprintf("not scheduled: %s: %s", c.Reason, c.Message))
		}
	}
	if _, cs := container(p); cs != nil {
		switch {
		case cs.State.Waiting != nil:
			parts = append(parts, fmt.Sprintf("container waiting: %s: %s", cs.State.Waiting.Reason, cs.State.Waiting.Message))
		case cs.State.Terminated != nil:
			t := cs.State.Terminated
			parts = append(parts, fmt.Sprintf("container terminated with exit code %d: %s: %s", t.ExitCode, t.Reason, strings.TrimSpace(t.Message)))
		}
	}
	return strings.Join(parts, "; ")
}

// podState is one state of a followed pod; deleted marks its last.
type podState struct {
	pod     *corev1.Pod
	deleted bool
}

// follow sends the states of the pod first is a state of (same name and
// UID), beginning with first, until ctx ends or the pod is gone; then it
// closes the channel. A pod gone while no watch was open is sent as its
// last known state, marked deleted. Failures of the API are retried (and
// logged) until ctx ends.
func (r *Runtime) follow(ctx context.Context, first *corev1.Pod) <-chan podState {
	out := make(chan podState)
	// Owned by ctx: it ends when ctx does, or after the pod's last state.
	go func() {
		defer close(out)
		send := func(s podState) bool {
			select {
			case out <- s:
				return true
			case <-ctx.Done():
				return false
			}
		}
		last := first
		if !send(podState{pod: first}) {
			return
		}
		for {
			w, err := r.pods.Watch(ctx, metav1.ListOptions{
				FieldSelector:   fields.OneTermEqualSelector("metadata.name", first.Name).String(),
				ResourceVersion: last.ResourceVersion,
			})
			if err == nil {
				var done bool
				last, done = r.drain(ctx, w, last, send)
				w.Stop()
				if done {
					return
				}
			} else {
				r.log.Warn("cannot watch pod, retrying", "container", first.Name, "err", err)
				if !pause(ctx) {
					return
				}
			}
			// The watch ended (API servers close them after a while) or
			// failed: read the pod again before the next one.
			p, gone, err := r.reread(ctx, last)
			switch {
			case ctx.Err() != nil:
				return
			case gone:
				send(podState{pod: last, deleted: true})
				return
			case err != nil:
				r.log.Warn("cannot read pod, retrying", "container", first.Name, "err", err)
				if !pause(ctx) {
					return
				}
				continue
			}
			last = p
			if !send(podState{pod: p}) {
				return
			}
		}
	}()
	return out
}

// pause waits a second before a retry; false: ctx ended first.
func pause(ctx context.Context) bool {
	select {
	case <-time.After(time.Second):
		return true
	case <-ctx.Done():
		return false
	}
}

// reread gets the followed pod again; gone reports it deleted, or
// replaced by another of the same name.
func (r *Runtime) reread(ctx context.Context, last *corev1.Pod) (p *corev1.Pod, gone bool, err error) {
	p, err = r.pods.Get(ctx, last.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) || (err == nil && p.UID != last.UID) {
		return last, true, nil
	}
	return p, false, err
}

// drain sends the states w delivers of the followed pod. It returns the
// last state and whether following is over (the pod was deleted, or ctx
// ended).
func (r *Runtime) drain(ctx context.Context, w watch.Interface, last *corev1.Pod, send func(podState) bool) (*corev1.Pod, bool) {
	if last.ResourceVersion == "" {
		// A watch without a resource version to start from begins now:
		// it misses a deletion from before it opened, so read the pod.
		p, gone, err := r.reread(ctx, last)
		switch {
		case gone:
			send(podState{pod: last, deleted: true})
			return last, true
		case err == nil:
			last = p
			if !send(podState{pod: p}) {
				return last, true
			}
		}
	}
	for {
		select {
		case <-ctx.Done():
			return last, true
		case ev, ok := <-w.ResultChan():
			if !ok {
				return last, false
			}
			switch ev.Type {
			case watch.Added, watch.Modified, watch.Deleted:
				p, ok := ev.Object.(*corev1.Pod)
				if !ok || p.Name != last.Name {
					continue
				}
				if p.UID != last.UID {
					// Another pod under the same name: ours is gone.
					send(podState{pod: last, deleted: true})
					return last, true
				}
				if ev.Type == watch.Deleted {
					send(podState{pod: p, deleted: true})
					return p, true
				}
				if !send(podState{pod: p}) {
					return p, true
				}
				last = p
			case watch.Error:
				// An expired resource version, say: start over from a Get.
				r.log.Debug("pod watch error", "container", last.Name, "err", apierrors.FromObject(ev.Object))
				return last, false
			}
		}
	}
}

// Wait returns a channel that receives the container's exit once. The
// channel is bound to ctx: cancelling it delivers an ExitResult carrying
// ctx's error. A pod deleted (Destroy) before its container's exit was
// reported counts as killed: exit code 137.
func (r *Runtime) Wait(ctx context.Context, id string) (<-chan runtime.ExitResult, error) {
	id = PodName(id)
	p, err := r.get(ctx, "wait for", id)
	if err != nil {
		return nil, err
	}
	out := make(chan runtime.ExitResult, 1)
	if exited(p) {
		out <- exitResult(p)
		close(out)
		return out, nil
	}
	fctx, cancel := context.WithCancel(ctx)
	states := r.follow(fctx, p)
	// Ends at the exit, or when ctx does.
	go func() {
		defer close(out)
		defer cancel()
		for s := range states {
			switch {
			case exited(s.pod):
				out <- exitResult(s.pod)
				return
			case s.deleted:
				out <- runtime.ExitResult{ExitCode: killedExit}
				return
			}
		}
		out <- runtime.ExitResult{ExitCode: unknownExit, Err: fmt.Errorf("wait for container %s: %w", id, ctx.Err())}
	}()
	return out, nil
}

// Stop deletes the pod with a grace period of timeout (whole seconds, at
// least one): the kubelet sends the container SIGTERM, and SIGKILL when it
// has not exited after the grace period. The pod's finalizer keeps its
// object, with the container's exit code, for Inspect, Wait and List until
// Destroy, as a stopped container stays on containerd. Stop returns once
// the container has exited. Stopping a stopped container is not an error.
//
// (A pod's containers cannot be stopped otherwise: activeDeadlineSeconds
// would kill them with the grace period fixed at the pod's creation, not
// with timeout.)
func (r *Runtime) Stop(ctx context.Context, id string, timeout time.Duration) error {
	id = PodName(id)
	p, err := r.get(ctx, "stop", id)
	if err != nil {
		return err
	}
	if exited(p) {
		return nil
	}
	grace := max(1, int64(math.Ceil(timeout.Seconds())))
	err = r.pods.Delete(ctx, id, metav1.DeleteOptions{GracePeriodSeconds: &grace, Preconditions: metav1.NewUIDPreconditions(string(p.UID))})
	if apierrors.IsConflict(err) {
		// The UID precondition failed: another pod holds the name now.
		return fmt.Errorf("stop container %s: %w (%v)", id, runtime.ErrNotFound, err)
	}
	if err != nil {
		return mapErr("stop", id, err)
	}
	fctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for s := range r.follow(fctx, p) {
		switch {
		case exited(s.pod), s.deleted:
			r.log.Debug("container stopped", "container", id, "exit_code", exitResult(s.pod).ExitCode)
			return nil
		case s.pod.DeletionTimestamp != nil && s.pod.Spec.NodeName == "":
			// Never scheduled: the API server deleted it at once, and no
			// kubelet will report it ended.
			return nil
		}
	}
	return fmt.Errorf("stop container %s: %w", id, ctx.Err())
}

// Destroy deletes the pod at once (grace period 0) and removes its
// finalizer, which lets the API server drop its object. An unknown id is
// not an error, so a Destroy cut short can simply be called again.
func (r *Runtime) Destroy(ctx context.Context, id string) error {
	id = PodName(id)
	r.stopLogs(id)
	if err := r.remove(ctx, id, ""); err != nil {
		return fmt.Errorf("destroy container %s: %w", id, err)
	}
	r.log.Debug("container destroyed", "container", id)
	return nil
}

// remove deletes pod id (only if its UID is uid, when uid is set) and
// removes the adapter's finalizer.
func (r *Runtime) remove(ctx context.Context, id string, uid types.UID) error {
	opts := metav1.DeleteOptions{GracePeriodSeconds: ptr(int64(0))}
	if uid != "" {
		opts.Preconditions = metav1.NewUIDPreconditions(string(uid))
	}
	err := r.pods.Delete(ctx, id, opts)
	if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
		return nil
	}
	if err != nil {
		return err
	}
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		p, err := r.pods.Get(ctx, id, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return nil
		}
		if err != nil {
			return err
		}
		if uid != "" && p.UID != uid {
			return nil
		}
		rest := make([]string, 0, len(p.Finalizers))
		for _, f := range p.Finalizers {
			if f != Finalizer {
				rest = append(rest, f)
			}
		}
		if len(rest) == len(p.Finalizers) {
			return nil
		}
		// A merge patch replaces the list; the resource version makes it
		// fail (and retry) if the list changed meanwhile.
		meta := map[string]any{"finalizers": rest}
		if p.ResourceVersion != "" {
			meta["resourceVersion"] = p.ResourceVersion
		}
		patch, err := json.Marshal(map[string]any{"metadata": meta})
		if err != nil {
			return err
		}
		_, err = r.pods.Patch(ctx, id, types.MergePatchType, patch, metav1.PatchOptions{})
		if apierrors.IsNotFound(err) {
			return nil
		}
		return err
	})
}

// Inspect reports a pod's labels and its container's state.
func (r *Runtime) Inspect(ctx context.Context, id string) (runtime.Status, error) {
	id = PodName(id)
	p, err := r.get(ctx, "inspect", id)
	if err != nil {
		return runtime.Status{}, err
	}
	return status(p, r.cfg.ExecutorPort), nil
}

// List returns the adapter's pods carrying every label in match.
func (r *Runtime) List(ctx context.Context, match map[string]string) ([]runtime.Status, error) {
	set := labels.Set(maps.Clone(match))
	if set == nil {
		set = labels.Set{}
	}
	set[LabelManagedBy] = ManagedBy
	sel, err := labels.ValidatedSelectorFromSet(set)
	if err != nil {
		return nil, fmt.Errorf("%w: list containers: %v", sandbox.ErrInvalidArgument, err)
	}
	l, err := r.pods.List(ctx, metav1.ListOptions{LabelSelector: sel.String()})
	if err != nil {
		return nil, fmt.Errorf("list containers: %w", err)
	}
	out := make([]runtime.Status, 0, len(l.Items))
	for i := range l.Items {
		out = append(out, status(&l.Items[i], r.cfg.ExecutorPort))
	}
	return out, nil
}

// Update applies new limits, then new labels, to a running pod: the limits
// by an in-place resize (the pods' resize subresource, Kubernetes 1.33 or
// later), waiting until the kubelet has applied them; the labels by a
// merge patch. Limits are checked before anything changes: cpu, memory and
// pids must be positive and the disk size the pod's. Limits.Pids is not
// applied (see the package comment). A pod whose container does not run
// cannot take limits: sandbox.ErrFailedPrecondition; a node that cannot
// give them: sandbox.ErrResourceExhausted.
func (r *Runtime) Update(ctx context.Context, id string, u runtime.Update) error {
	id = PodName(id)
	if u.Limits != nil {
		// Positive limits first, before asking the API anything.
		if err := isolation.ValidateUpdate(id, *u.Limits, u.Limits.DiskMiB); err != nil {
			return err
		}
	}
	if err := validateLabels(u.Labels); err != nil {
		return fmt.Errorf("update container %s: %w", id, err)
	}
	if u.Limits != nil {
		if err := r.resize(ctx, id, *u.Limits); err != nil {
			return err
		}
	}
	if len(u.Labels) == 0 {
		return nil
	}
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{"labels": u.Labels}})
	if err != nil {
		return fmt.Errorf("update labels of container %s: %w", id, err)
	}
	if _, err := r.pods.Patch(ctx, id, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		return mapErr("update labels of", id, err)
	}
	return nil
}

// resize writes l to the pod's container, unless it holds l already, and
// waits until the kubelet reports them applied.
func (r *Runtime) resize(ctx context.Context, id string, l sandbox.Limits) error {
	want := resources(l)
	var p *corev1.Pod
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cur, err := r.get(ctx, "update", id)
		if err != nil {
			return err
		}
		disk, err := workspaceMiB(cur)
		if err != nil {
			return fmt.Errorf("update container %s: %w", id, err)
		}
		if err := isolation.ValidateUpdate(id, l, disk); err != nil {
			return err
		}
		if !running(cur) {
			return fmt.Errorf("%w: update container %s: it does not run: %s", sandbox.ErrFailedPrecondition, id, describe(cur))
		}
		c, _ := container(cur)
		if c == nil {
			return fmt.Errorf("update container %s: pod has no %s container", id, ContainerName)
		}
		if sameLimits(c.Resources.Limits, want.Limits) && sameLimits(c.Resources.Requests, want.Requests) {
			p = cur
			return nil
		}
		c.Resources = want
		p, err = r.pods.UpdateResize(ctx, id, cur, metav1.UpdateOptions{})
		if apierrors.IsConflict(err) {
			return err
		}
		if err != nil {
			return mapErr("resize", id, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	return r.awaitResize(ctx, p, want.Limits)
}

// awaitResize follows the pod until its container's status reports limits
// want and no resize is pending or in progress.
func (r *Runtime) awaitResize(ctx context.Context, p *corev1.Pod, want corev1.ResourceList) error {
	ctx, cancel := context.WithTimeout(ctx, r.cfg.ResizeTimeout)
	defer cancel()
	last := p
	for s := range r.follow(ctx, p) {
		last = s.pod
		if s.deleted || exited(s.pod) {
			return fmt.Errorf("%w: resize container %s: it ended: %s", sandbox.ErrFailedPrecondition, p.Name, describe(s.pod))
		}
		pending := false
		for _, c := range s.pod.Status.Conditions {
			if c.Type == corev1.PodResizePending && c.Reason == corev1.PodReasonInfeasible {
				return fmt.Errorf("%w: resize container %s: %s", sandbox.ErrResourceExhausted, p.Name, c.Message)
			}
			if (c.Type == corev1.PodResizePending || c.Type == corev1.PodResizeInProgress) && c.Status == corev1.ConditionTrue {
				pending = true
			}
		}
		if _, cs := container(s.pod); !pending && cs != nil && cs.Resources != nil && sameLimits(cs.Resources.Limits, want) {
			return nil
		}
	}
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("%w: resize container %s: the kubelet did not apply the new limits within %s: %s",
			sandbox.ErrUnavailable, p.Name, r.cfg.ResizeTimeout, describe(last))
	}
	return fmt.Errorf("resize container %s: %w", p.Name, ctx.Err())
}

// streamLogs copies the pod's log into path until the container ends, the
// pod is destroyed or the Runtime closed. Best effort: a stream that breaks
// is logged, not resumed.
func (r *Runtime) streamLogs(id, path string) {
	ctx, cancel := context.WithCancel(r.ctx)
	ls := &logStream{cancel: cancel}
	r.mu.Lock()
	if old := r.logs[id]; old != nil {
		old.cancel()
	}
	r.logs[id] = ls
	r.mu.Unlock()
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		defer func() {
			cancel()
			r.mu.Lock()
			if r.logs[id] == ls {
				delete(r.logs, id)
			}
			r.mu.Unlock()
		}()
		if err := r.copyLogs(ctx, id, path); err != nil && ctx.Err() == nil {
			r.log.Warn("container log stream ended", "container", id, "path", path, "err", err)
		}
	}()
}

func (r *Runtime) copyLogs(ctx context.Context, id, path string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return err
	}
	defer f.Close()
	stream, err := r.pods.GetLogs(id, &corev1.PodLogOptions{Container: ContainerName, Follow: true}).Stream(ctx)
	if err != nil {
		return err
	}
	defer stream.Close()
	if _, err := io.Copy(f, stream); err != nil {
		return err
	}
	return f.Close()
}

// stopLogs ends the log stream of pod id, if any.
func (r *Runtime) stopLogs(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if ls := r.logs[id]; ls != nil {
		ls.cancel()
		delete(r.logs, id)
	}
}

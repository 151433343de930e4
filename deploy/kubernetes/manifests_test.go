package kubernetes_test

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"go/types"
	"maps"
	"net"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/tools/go/packages"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/yaml"

	"github.com/sandboxhq/sandbox/agent/runtime/isolation"
	adapter "github.com/sandboxhq/sandbox/agent/runtime/kubernetes"
)

// pendingFlags are flags the manifests give that their binary does not define
// yet (none now); a flag listed here that exists is reported.
var pendingFlags = map[string][]string{}

// agentRules bounds what the agent's Role may grant: resource -> verbs.
// Within it, the Role grants exactly what the adapter calls
// (TestAgentRoleMatchesAdapter). pods/resize allows update as well as patch:
// client-go's UpdateResize is a PUT of the subresource, which RBAC calls
// update.
var agentRules = map[string][]string{
	"pods":                              {"get", "list", "watch", "create", "delete", "patch"},
	"pods/log":                          {"get"},
	"pods/resize":                       {"patch", "update"},
	"networking.k8s.io/networkpolicies": {"get", "create", "update", "patch"},
}

const (
	systemNamespace  = "sandbox-system"
	sandboxNamespace = "sandboxes"
	serverReplicas   = 3
)

var update = flag.Bool("update", false, "rewrite seccomp/bubblewrap.json from isolation.SeccompProfileJSON")

// object is one decoded YAML document.
type object struct {
	file string
	doc  int
	obj  k8sruntime.Object
}

func (o object) String() string { return fmt.Sprintf("%s document %d", o.file, o.doc) }

// manifests is every object of every YAML file beside this test, by kind.
type manifests struct {
	all             []object
	namespaces      map[string]*corev1.Namespace
	serviceAccounts map[string]*corev1.ServiceAccount // by namespace/name
	services        map[string]*corev1.Service        // by namespace/name
	statefulSets    []*appsv1.StatefulSet
	daemonSets      []*appsv1.DaemonSet
	pdbs            []*policyv1.PodDisruptionBudget
	roles           []*rbacv1.Role
	roleBindings    []*rbacv1.RoleBinding
	networkPolicies []*networkingv1.NetworkPolicy
}

var docSeparator = regexp.MustCompile(`(?m)^---[ \t]*$`)

// yamlFiles lists the YAML files of this directory but the kustomization.
func yamlFiles(t *testing.T) []string {
	t.Helper()
	var files []string
	for _, pattern := range []string{"*.yaml", "*.yml"} {
		m, err := filepath.Glob(pattern)
		if err != nil {
			t.Fatal(err)
		}
		files = append(files, m...)
	}
	files = slices.DeleteFunc(files, func(f string) bool { return f == "kustomization.yaml" })
	slices.Sort(files)
	if len(files) == 0 {
		t.Fatal("no manifests found")
	}
	return files
}

// load decodes every document strictly (unknown or duplicate fields fail)
// into its type from k8s.io/api; a kind the scheme does not know fails.
func load(t *testing.T) *manifests {
	t.Helper()
	decoder := serializer.NewCodecFactory(scheme.Scheme, serializer.EnableStrict).UniversalDeserializer()
	m := &manifests{
		namespaces:      map[string]*corev1.Namespace{},
		serviceAccounts: map[string]*corev1.ServiceAccount{},
		services:        map[string]*corev1.Service{},
	}
	for _, file := range yamlFiles(t) {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range docSeparator.Split(string(data), -1) {
			if isEmptyDoc(doc) {
				continue
			}
			o := object{file: file, doc: i + 1}
			obj, gvk, err := decoder.Decode([]byte(doc), nil, nil)
			if err != nil {
				t.Errorf("%s: %v", o, err)
				continue
			}
			o.obj = obj
			m.all = append(m.all, o)
			switch v := obj.(type) {
			case *corev1.Namespace:
				m.namespaces[v.Name] = v
			case *corev1.ServiceAccount:
				m.serviceAccounts[v.Namespace+"/"+v.Name] = v
			case *corev1.Service:
				m.services[v.Namespace+"/"+v.Name] = v
			case *appsv1.StatefulSet:
				m.statefulSets = append(m.statefulSets, v)
			case *appsv1.DaemonSet:
				m.daemonSets = append(m.daemonSets, v)
			case *policyv1.PodDisruptionBudget:
				m.pdbs = append(m.pdbs, v)
			case *rbacv1.Role:
				m.roles = append(m.roles, v)
			case *rbacv1.RoleBinding:
				m.roleBindings = append(m.roleBindings, v)
			case *networkingv1.NetworkPolicy:
				m.networkPolicies = append(m.networkPolicies, v)
			case *rbacv1.ClusterRole, *rbacv1.ClusterRoleBinding:
				t.Errorf("%s: a %s: the agent's access must stay within the %s namespace (a Role)", o, gvk.Kind, sandboxNamespace)
			default:
				t.Errorf("%s: kind %s is not checked by this test: add its invariants here", o, gvk.Kind)
			}
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	return m
}

func isEmptyDoc(doc string) bool {
	for _, line := range strings.Split(doc, "\n") {
		if l := strings.TrimSpace(line); l != "" && !strings.HasPrefix(l, "#") {
			return false
		}
	}
	return true
}

// workload is a pod template with the object that owns it.
type workload struct {
	name      string
	namespace string
	template  *corev1.PodTemplateSpec
}

func (m *manifests) workloads() []workload {
	var out []workload
	for _, s := range m.statefulSets {
		out = append(out, workload{"StatefulSet " + s.Name, s.Namespace, &s.Spec.Template})
	}
	for _, d := range m.daemonSets {
		out = append(out, workload{"DaemonSet " + d.Name, d.Namespace, &d.Spec.Template})
	}
	return out
}

func (m *manifests) statefulSet(t *testing.T, name string) *appsv1.StatefulSet {
	t.Helper()
	for _, s := range m.statefulSets {
		if s.Name == name {
			return s
		}
	}
	t.Fatalf("no StatefulSet %s", name)
	return nil
}

func (m *manifests) daemonSet(t *testing.T, name string) *appsv1.DaemonSet {
	t.Helper()
	for _, d := range m.daemonSets {
		if d.Name == name {
			return d
		}
	}
	t.Fatalf("no DaemonSet %s", name)
	return nil
}

func TestKustomizationListsEveryManifest(t *testing.T) {
	data, err := os.ReadFile("kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var k struct {
		APIVersion string   `json:"apiVersion"`
		Kind       string   `json:"kind"`
		Resources  []string `json:"resources"`
		Images     []struct {
			Name    string `json:"name"`
			NewName string `json:"newName,omitempty"`
			NewTag  string `json:"newTag,omitempty"`
			Digest  string `json:"digest,omitempty"`
		} `json:"images"`
	}
	if err := yaml.UnmarshalStrict(data, &k); err != nil {
		t.Fatalf("kustomization.yaml: %v", err)
	}
	if k.APIVersion != "kustomize.config.k8s.io/v1beta1" || k.Kind != "Kustomization" {
		t.Errorf("kustomization.yaml is a %s %s", k.APIVersion, k.Kind)
	}
	listed := slices.Sorted(slices.Values(k.Resources))
	if files := yamlFiles(t); !slices.Equal(listed, files) {
		t.Errorf("kustomization.yaml lists %v; the directory holds %v", listed, files)
	}
	if n := len(slices.Compact(slices.Clone(listed))); n != len(listed) {
		t.Errorf("kustomization.yaml lists a file twice: %v", listed)
	}

	images := map[string]bool{}
	for _, img := range k.Images {
		images[img.Name] = true
	}
	want := []string{"sandbox/agent", "sandbox/scheduler"}
	if got := slices.Sorted(maps.Keys(images)); !slices.Equal(got, want) {
		t.Errorf("kustomization.yaml sets images %v, want %v", got, want)
	}
	for _, w := range load(t).workloads() {
		for _, c := range allContainers(&w.template.Spec) {
			if !images[c.Image] {
				t.Errorf("%s container %s: image %q is not one kustomization.yaml sets (give it without tag or registry)", w.name, c.Name, c.Image)
			}
		}
	}
}

func TestNamespaces(t *testing.T) {
	m := load(t)
	for _, ns := range []string{systemNamespace, sandboxNamespace} {
		n, ok := m.namespaces[ns]
		if !ok {
			t.Errorf("no Namespace %s", ns)
			continue
		}
		// The sandbox Pods' procMount: Unmasked (in a user namespace)
		// is beyond "restricted"; "baseline" admits it from 1.35 on.
		want := "restricted"
		if ns == sandboxNamespace {
			want = "baseline"
		}
		if got := n.Labels["pod-security.kubernetes.io/enforce"]; got != want {
			t.Errorf("Namespace %s enforces Pod Security level %q, want %s", ns, got, want)
		}
		if got := n.Labels["pod-security.kubernetes.io/warn"]; got != "restricted" {
			t.Errorf("Namespace %s warns at Pod Security level %q, want restricted", ns, got)
		}
	}
	for _, o := range m.all {
		obj := o.obj.(interface {
			GetNamespace() string
			GetName() string
		})
		if _, isNS := o.obj.(*corev1.Namespace); isNS {
			continue
		}
		switch ns := obj.GetNamespace(); ns {
		case systemNamespace:
		case sandboxNamespace:
			// Only what governs the sandbox Pods: the agent's access, the
			// network policy and the default ServiceAccount's token. The Pods
			// themselves are the agents' to create.
			switch v := o.obj.(type) {
			case *rbacv1.Role, *rbacv1.RoleBinding, *networkingv1.NetworkPolicy:
			case *corev1.ServiceAccount:
				if v.Name != "default" || v.AutomountServiceAccountToken == nil || *v.AutomountServiceAccountToken {
					t.Errorf("%s: the only ServiceAccount of %s is its default one, with automountServiceAccountToken: false", o, sandboxNamespace)
				}
			default:
				t.Errorf("%s: %s belongs in %s, not in %s where sandboxes run", o, obj.GetName(), systemNamespace, sandboxNamespace)
			}
		default:
			t.Errorf("%s: %s has namespace %q; every object names %s or %s (the kustomization sets none)", o, obj.GetName(), ns, systemNamespace, sandboxNamespace)
		}
	}
	var deny bool
	for _, p := range m.networkPolicies {
		if p.Namespace == sandboxNamespace && len(p.Spec.PodSelector.MatchLabels) == 0 && len(p.Spec.PodSelector.MatchExpressions) == 0 &&
			len(p.Spec.Ingress) == 0 && len(p.Spec.Egress) == 0 &&
			slices.Contains(p.Spec.PolicyTypes, networkingv1.PolicyTypeIngress) && slices.Contains(p.Spec.PolicyTypes, networkingv1.PolicyTypeEgress) {
			deny = true
		}
	}
	if !deny {
		t.Errorf("no NetworkPolicy in %s denies all ingress and egress by default", sandboxNamespace)
	}
}

func TestAgentRBAC(t *testing.T) {
	m := load(t)
	agent := m.daemonSet(t, "sandbox-agent")
	sa := agent.Spec.Template.Spec.ServiceAccountName
	if _, ok := m.serviceAccounts[agent.Namespace+"/"+sa]; !ok || sa == "" {
		t.Errorf("the agent's ServiceAccount %q does not exist in %s", sa, agent.Namespace)
	}
	if a := args(containerNamed(t, &agent.Spec.Template.Spec, "agent")); a["kubernetes-namespace"] != sandboxNamespace {
		t.Errorf("agent --kubernetes-namespace=%q, want %s (where its Role is)", a["kubernetes-namespace"], sandboxNamespace)
	}

	if len(m.roles) != 1 {
		t.Fatalf("%d Roles, want the agent's only", len(m.roles))
	}
	role := m.roles[0]
	if role.Namespace != sandboxNamespace {
		t.Errorf("Role %s is in %s, want %s", role.Name, role.Namespace, sandboxNamespace)
	}
	granted := map[string][]string{}
	for i, r := range role.Rules {
		if len(r.NonResourceURLs) > 0 || len(r.ResourceNames) > 0 {
			t.Errorf("Role %s rule %d: nonResourceURLs or resourceNames are not expected", role.Name, i)
		}
		for _, v := range r.Verbs {
			if v == "*" {
				t.Errorf("Role %s rule %d grants every verb", role.Name, i)
			}
		}
		for _, g := range r.APIGroups {
			for _, res := range r.Resources {
				if g == "*" || res == "*" {
					t.Errorf("Role %s rule %d: wildcard group or resource", role.Name, i)
					continue
				}
				key := path.Join(g, res)
				allowed, ok := agentRules[key]
				if !ok {
					t.Errorf("Role %s rule %d grants %q, which the agent does not need", role.Name, i, key)
					continue
				}
				for _, v := range r.Verbs {
					if !slices.Contains(allowed, v) {
						t.Errorf("Role %s rule %d grants %s on %q; allowed: %v", role.Name, i, v, key, allowed)
					}
				}
				granted[key] = append(granted[key], r.Verbs...)
			}
		}
	}

	if len(m.roleBindings) != 1 {
		t.Fatalf("%d RoleBindings, want the agent's only", len(m.roleBindings))
	}
	rb := m.roleBindings[0]
	if rb.Namespace != role.Namespace || rb.RoleRef.Kind != "Role" || rb.RoleRef.Name != role.Name || rb.RoleRef.APIGroup != rbacv1.GroupName {
		t.Errorf("RoleBinding %s/%s refers to %+v, want Role %s/%s", rb.Namespace, rb.Name, rb.RoleRef, role.Namespace, role.Name)
	}
	want := []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: sa, Namespace: agent.Namespace}}
	if !slices.Equal(rb.Subjects, want) {
		t.Errorf("RoleBinding %s binds %+v, want only %+v", rb.Name, rb.Subjects, want)
	}
}

func TestServers(t *testing.T) {
	m := load(t)
	sts := m.statefulSet(t, "sandbox-server")
	spec := &sts.Spec.Template.Spec
	if r := sts.Spec.Replicas; r == nil || *r != serverReplicas {
		t.Errorf("StatefulSet %s: replicas not %d", sts.Name, serverReplicas)
	}
	if sts.Spec.PodManagementPolicy != appsv1.ParallelPodManagement {
		t.Errorf("StatefulSet %s: podManagementPolicy %q, want Parallel (the servers bootstrap together)", sts.Name, sts.Spec.PodManagementPolicy)
	}
	svc, ok := m.services[sts.Namespace+"/"+sts.Spec.ServiceName]
	switch {
	case !ok:
		t.Errorf("StatefulSet %s: serviceName %q is no Service in %s", sts.Name, sts.Spec.ServiceName, sts.Namespace)
	case svc.Spec.ClusterIP != corev1.ClusterIPNone:
		t.Errorf("Service %s must be headless (clusterIP None) to give each server a DNS name", svc.Name)
	case !svc.Spec.PublishNotReadyAddresses:
		t.Errorf("Service %s must publish not-ready addresses: the servers find each other before any is ready", svc.Name)
	}
	if len(sts.Spec.VolumeClaimTemplates) == 0 {
		t.Fatalf("StatefulSet %s has no volumeClaimTemplates", sts.Name)
	}
	if spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
		t.Errorf("StatefulSet %s mounts a service account token; the servers never call the Kubernetes API", sts.Name)
	}
	if sa, ok := m.serviceAccounts[sts.Namespace+"/"+spec.ServiceAccountName]; !ok {
		t.Errorf("StatefulSet %s: ServiceAccount %q does not exist", sts.Name, spec.ServiceAccountName)
	} else if sa.AutomountServiceAccountToken == nil || *sa.AutomountServiceAccountToken {
		t.Errorf("ServiceAccount %s must set automountServiceAccountToken: false", sa.Name)
	}

	c := containerNamed(t, spec, "scheduler")
	a := args(c)
	if a["bootstrap-expect"] != strconv.Itoa(serverReplicas) {
		t.Errorf("--bootstrap-expect=%q, want %d (the replicas)", a["bootstrap-expect"], serverReplicas)
	}
	// The data directory is on the claim.
	claims := map[string]bool{}
	for _, pvc := range sts.Spec.VolumeClaimTemplates {
		claims[pvc.Name] = true
	}
	if mount := mountOf(c, a["data-dir"]); mount == nil || !claims[mount.Name] {
		t.Errorf("--data-dir=%s is not on a volumeClaimTemplate's volume", a["data-dir"])
	}
	// Each server binds and advertises its own stable name, and names every
	// server in --join and --gossip-join.
	self := "$(POD_NAME)." + sts.Spec.ServiceName + ".$(POD_NAMESPACE).svc"
	ports := map[string]int32{}
	for _, p := range c.Ports {
		ports[p.Name] = p.ContainerPort
	}
	for flagName, port := range map[string]string{"api-addr": "api", "internal-addr": "internal", "raft-addr": "raft"} {
		host, p := splitHostPort(t, a[flagName])
		if host != self && !strings.HasPrefix(host, self+".") {
			t.Errorf("--%s=%s: want the Pod's stable name %s[.<cluster domain>]", flagName, a[flagName], self)
		}
		if p != ports[port] {
			t.Errorf("--%s=%s: port %d, the container's %s port is %d", flagName, a[flagName], p, port, ports[port])
		}
	}
	ownDomain, _ := strings.CutPrefix(hostOf(t, a["raft-addr"]), self)
	for flagName, port := range map[string]string{"join": "internal", "gossip-join": "gossip-tcp"} {
		var want []string
		for i := range serverReplicas {
			want = append(want, fmt.Sprintf("%s-%d.%s.$(POD_NAMESPACE).svc%s:%d", sts.Name, i, sts.Spec.ServiceName, ownDomain, ports[port]))
		}
		if got := strings.Split(a[flagName], ","); !slices.Equal(got, want) {
			t.Errorf("--%s=%s, want %s", flagName, a[flagName], strings.Join(want, ","))
		}
	}
	if host, p := splitHostPort(t, a["gossip-addr"]); host != "$(POD_IP)" || p != ports["gossip-tcp"] || ports["gossip-udp"] != p {
		t.Errorf("--gossip-addr=%s: want $(POD_IP) and the gossip port on TCP and UDP (memberlist advertises what it binds, an IP)", a["gossip-addr"])
	}

	var pdb *policyv1.PodDisruptionBudget
	for _, p := range m.pdbs {
		if p.Namespace == sts.Namespace && selects(t, p.Spec.Selector, sts.Spec.Template.Labels) {
			pdb = p
		}
	}
	if pdb == nil {
		t.Fatalf("no PodDisruptionBudget selects the servers")
	}
	if pdb.Spec.MinAvailable == nil || pdb.Spec.MinAvailable.IntValue() != serverReplicas/2+1 {
		t.Errorf("PodDisruptionBudget %s: minAvailable %v, want %d (a Raft quorum)", pdb.Name, pdb.Spec.MinAvailable, serverReplicas/2+1)
	}
}

func TestAgents(t *testing.T) {
	m := load(t)
	ds := m.daemonSet(t, "sandbox-agent")
	a := args(containerNamed(t, &ds.Spec.Template.Spec, "agent"))
	if a["runtime"] != "kubernetes" {
		t.Errorf("agent --runtime=%q, want kubernetes", a["runtime"])
	}
	if a["kubernetes-node"] != "$(NODE_NAME)" || a["id"] != "$(NODE_NAME)" {
		t.Errorf("agent --kubernetes-node=%q --id=%q: want both $(NODE_NAME) (one agent per node, known by the node)", a["kubernetes-node"], a["id"])
	}
	if _, ok := a["kubeconfig"]; ok {
		t.Error("agent --kubeconfig is set: in a Pod the in-cluster configuration is the one to use")
	}
	// --server names the servers' internal Service, on its port.
	u, err := url.Parse(a["server"])
	if err != nil {
		t.Fatalf("agent --server=%s: %v", a["server"], err)
	}
	name, rest, _ := strings.Cut(u.Hostname(), ".")
	svc, ok := m.services[ds.Namespace+"/"+name]
	if !ok || (rest != "" && !strings.HasPrefix(rest, "$(POD_NAMESPACE).svc")) {
		t.Fatalf("agent --server=%s does not name a Service of %s", a["server"], ds.Namespace)
	}
	port, _ := strconv.Atoi(u.Port())
	if !slices.ContainsFunc(svc.Spec.Ports, func(p corev1.ServicePort) bool { return p.Port == int32(port) && p.TargetPort.String() == "internal" }) {
		t.Errorf("agent --server=%s: Service %s has no port %d to the servers' internal port", a["server"], svc.Name, port)
	}
	sts := m.statefulSet(t, "sandbox-server")
	for i, g := range strings.Split(a["gossip-join"], ",") {
		want := fmt.Sprintf("%s-%d.%s.$(POD_NAMESPACE).svc", sts.Name, i, sts.Spec.ServiceName)
		if h := hostOf(t, g); h != want && !strings.HasPrefix(h, want+".") {
			t.Errorf("agent --gossip-join entry %d is %s, want server %s", i, g, want)
		}
	}
}

// TestPodSecurity: every container of every workload passes the restricted
// Pod Security Standard and has resource limits.
func TestPodSecurity(t *testing.T) {
	m := load(t)
	for _, w := range m.workloads() {
		spec := &w.template.Spec
		psc := spec.SecurityContext
		if psc == nil {
			psc = &corev1.PodSecurityContext{}
		}
		if spec.HostNetwork || spec.HostPID || spec.HostIPC {
			t.Errorf("%s shares a host namespace", w.name)
		}
		for _, v := range spec.Volumes {
			if v.HostPath != nil {
				t.Errorf("%s volume %s is a hostPath", w.name, v.Name)
			}
		}
		for _, c := range allContainers(spec) {
			sc := c.SecurityContext
			if sc == nil {
				t.Errorf("%s container %s has no securityContext", w.name, c.Name)
				continue
			}
			where := fmt.Sprintf("%s container %s", w.name, c.Name)
			if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
				t.Errorf("%s: allowPrivilegeEscalation must be false", where)
			}
			if sc.Privileged != nil && *sc.Privileged {
				t.Errorf("%s is privileged", where)
			}
			if !isTrue(sc.RunAsNonRoot) && !(sc.RunAsNonRoot == nil && isTrue(psc.RunAsNonRoot)) {
				t.Errorf("%s: runAsNonRoot must be true", where)
			}
			if uid := firstSet(sc.RunAsUser, psc.RunAsUser); uid == nil || *uid == 0 {
				t.Errorf("%s: give runAsUser a non-zero uid (an image's USER may be a name, which runAsNonRoot cannot check)", where)
			}
			if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
				t.Errorf("%s: readOnlyRootFilesystem must be true", where)
			}
			if sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") || len(sc.Capabilities.Add) > 0 {
				t.Errorf("%s: capabilities must drop ALL and add none", where)
			}
			seccomp := sc.SeccompProfile
			if seccomp == nil {
				seccomp = psc.SeccompProfile
			}
			if seccomp == nil || (seccomp.Type != corev1.SeccompProfileTypeRuntimeDefault && seccomp.Type != corev1.SeccompProfileTypeLocalhost) {
				t.Errorf("%s: seccomp profile must be RuntimeDefault or Localhost", where)
			}
			for _, r := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
				if _, ok := c.Resources.Limits[r]; !ok {
					t.Errorf("%s: no %s limit", where, r)
				}
				if _, ok := c.Resources.Requests[r]; !ok {
					t.Errorf("%s: no %s request", where, r)
				}
			}
		}
	}
}

// TestFlagsExist: every flag given to a binary is one its main package
// defines, every $(VAR) in the arguments is an environment variable of the
// container, and every file flag names a file of a mounted Secret.
func TestFlagsExist(t *testing.T) {
	m := load(t)
	for _, w := range m.workloads() {
		vols := map[string]corev1.Volume{}
		for _, v := range w.template.Spec.Volumes {
			vols[v.Name] = v
		}
		for _, c := range allContainers(&w.template.Spec) {
			where := fmt.Sprintf("%s container %s", w.name, c.Name)
			if len(c.Command) != 1 {
				t.Errorf("%s: command %q: want the binary alone, flags in args", where, c.Command)
				continue
			}
			bin := path.Base(c.Command[0])
			defined := definedFlags(t, filepath.Join("..", "..", "cmd", bin))
			env := map[string]bool{}
			for _, e := range c.Env {
				env[e.Name] = true
			}
			for _, arg := range c.Args {
				name, value, ok := strings.Cut(strings.TrimPrefix(arg, "--"), "=")
				if !strings.HasPrefix(arg, "--") || !ok {
					t.Errorf("%s: argument %q: write flags as --name=value", where, arg)
					continue
				}
				if !defined[name] && !slices.Contains(pendingFlags[bin], name) {
					t.Errorf("%s: %s defines no flag --%s", where, bin, name)
				}
				for _, ref := range envRef.FindAllStringSubmatch(value, -1) {
					if !env[ref[1]] {
						t.Errorf("%s: --%s refers to $(%s), which the container's env does not define", where, name, ref[1])
					}
				}
				if strings.HasSuffix(name, "-file") {
					if !secretFile(c, vols, value) {
						t.Errorf("%s: --%s=%s is no file of a mounted Secret", where, name, value)
					}
				}
			}
		}
	}
	for bin, flags := range pendingFlags {
		defined := definedFlags(t, filepath.Join("..", "..", "cmd", bin))
		for _, f := range flags {
			if defined[f] {
				t.Logf("%s now defines --%s: remove it from pendingFlags", bin, f)
			}
		}
	}
}

// TestServicesSelectPods: every Service selects the Pods of a workload and
// targets ports those Pods declare.
func TestServicesSelectPods(t *testing.T) {
	m := load(t)
	for _, svc := range m.services {
		var found bool
		for _, w := range m.workloads() {
			if w.namespace != svc.Namespace || !labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(w.template.Labels)) {
				continue
			}
			found = true
			for _, p := range svc.Spec.Ports {
				if !slices.ContainsFunc(allContainers(&w.template.Spec), func(c *corev1.Container) bool {
					return slices.ContainsFunc(c.Ports, func(cp corev1.ContainerPort) bool {
						return cp.Name == p.TargetPort.String() && cp.Protocol == p.Protocol && cp.ContainerPort == p.Port
					})
				}) {
					t.Errorf("Service %s port %s: %s has no container port %s/%s %d", svc.Name, p.Name, w.name, p.TargetPort.String(), p.Protocol, p.Port)
				}
			}
		}
		if len(svc.Spec.Selector) == 0 || !found {
			t.Errorf("Service %s selects no workload's Pods", svc.Name)
		}
	}
}

// TestAgentRoleMatchesAdapter: the Role grants exactly the API calls the
// Kubernetes runtime adapter makes, found by type-checking it: a call added
// there without its permission, or a permission left behind by a call that
// went, fails here instead of in a cluster.
func TestAgentRoleMatchesAdapter(t *testing.T) {
	calls := adapterCalls(t)
	m := load(t)
	if len(m.roles) != 1 {
		t.Fatalf("%d Roles, want the agent's only", len(m.roles))
	}
	granted := map[string]bool{}
	for _, r := range m.roles[0].Rules {
		for _, g := range r.APIGroups {
			for _, res := range r.Resources {
				for _, v := range r.Verbs {
					granted[path.Join(g, res)+" "+v] = true
				}
			}
		}
	}
	for call, where := range calls {
		if !granted[call] {
			t.Errorf("the adapter needs %s (%s), which the Role does not grant", call, where)
		}
	}
	for g := range granted {
		if _, ok := calls[g]; !ok {
			t.Errorf("the Role grants %s, which the adapter never uses", g)
		}
	}
}

// TestAgentMatchesAdapterDefaults: the adapter's defaults describe these
// manifests: the sandbox namespace, and the agents' namespace and labels its
// NetworkPolicy lets reach the executors.
func TestAgentMatchesAdapterDefaults(t *testing.T) {
	m := load(t)
	ds := m.daemonSet(t, "sandbox-agent")
	def := adapter.DefaultConfig()
	if def.Namespace != sandboxNamespace {
		t.Errorf("the adapter's default namespace is %s, the manifests' %s", def.Namespace, sandboxNamespace)
	}
	if def.AgentNamespace != ds.Namespace {
		t.Errorf("the adapter lets agents of namespace %s reach executors; the agents run in %s", def.AgentNamespace, ds.Namespace)
	}
	if !labels.SelectorFromSet(def.AgentSelector).Matches(labels.Set(ds.Spec.Template.Labels)) || len(def.AgentSelector) == 0 {
		t.Errorf("the adapter lets pods labelled %v reach executors; the agents' pods are labelled %v", def.AgentSelector, ds.Spec.Template.Labels)
	}
}

// TestServerNetworkPolicy: the servers' Raft port, which authenticates
// nothing, takes connections from servers only; every port a policy opens is
// one the servers listen on.
func TestServerNetworkPolicy(t *testing.T) {
	m := load(t)
	sts := m.statefulSet(t, "sandbox-server")
	c := containerNamed(t, &sts.Spec.Template.Spec, "scheduler")
	_, raftPort := splitHostPort(t, args(c)["raft-addr"])
	var found bool
	for _, p := range m.networkPolicies {
		if p.Namespace != sts.Namespace || !selects(t, &p.Spec.PodSelector, sts.Spec.Template.Labels) {
			continue
		}
		found = true
		if !slices.Contains(p.Spec.PolicyTypes, networkingv1.PolicyTypeIngress) {
			t.Errorf("NetworkPolicy %s selects the servers but does not restrict ingress", p.Name)
		}
		for i, rule := range p.Spec.Ingress {
			if len(rule.Ports) == 0 {
				t.Errorf("NetworkPolicy %s ingress rule %d opens every port", p.Name, i)
			}
			for _, port := range rule.Ports {
				if port.Port == nil || !slices.ContainsFunc(c.Ports, func(cp corev1.ContainerPort) bool {
					return cp.ContainerPort == int32(port.Port.IntValue()) && port.Protocol != nil && cp.Protocol == *port.Protocol
				}) {
					t.Errorf("NetworkPolicy %s ingress rule %d opens %v, which the servers do not listen on", p.Name, i, port.Port)
					continue
				}
				if int32(port.Port.IntValue()) != raftPort {
					continue
				}
				for _, peer := range rule.From {
					if peer.PodSelector == nil || peer.NamespaceSelector != nil || peer.IPBlock != nil ||
						!selects(t, peer.PodSelector, sts.Spec.Template.Labels) ||
						selects(t, peer.PodSelector, m.daemonSet(t, "sandbox-agent").Spec.Template.Labels) {
						t.Errorf("NetworkPolicy %s ingress rule %d lets more than the servers reach the Raft port", p.Name, i)
					}
				}
				if len(rule.From) == 0 {
					t.Errorf("NetworkPolicy %s ingress rule %d lets anyone reach the Raft port", p.Name, i)
				}
			}
		}
	}
	if !found {
		t.Error("no NetworkPolicy restricts who reaches the servers")
	}
}

// TestSeccompProfile: seccomp/bubblewrap.json, the Localhost profile nodes
// need for sandbox Pods, is the one the other runtimes use. go test -update
// rewrites it.
func TestSeccompProfile(t *testing.T) {
	if runtime.GOARCH != "amd64" {
		t.Skipf("the profile lists the architectures of the machine that generates it; it is kept for amd64 (the images' platform), this is %s", runtime.GOARCH)
	}
	raw, err := isolation.SeccompProfileJSON()
	if err != nil {
		t.Fatal(err)
	}
	var want bytes.Buffer
	if err := json.Indent(&want, raw, "", "  "); err != nil {
		t.Fatal(err)
	}
	want.WriteByte('\n')
	file := filepath.Join("seccomp", "bubblewrap.json")
	if *update {
		if err := os.MkdirAll(filepath.Dir(file), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(file, want.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got, err := os.ReadFile(file)
	if err != nil {
		t.Fatalf("%v (go test ./deploy/kubernetes -run TestSeccompProfile -update writes it)", err)
	}
	if !bytes.Equal(got, want.Bytes()) {
		t.Errorf("%s differs from isolation.SeccompProfileJSON: go test ./deploy/kubernetes -run TestSeccompProfile -update", file)
	}
}

var envRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

// definedFlags parses the non-test Go files of a main package and returns the
// names of the flags they define (flag.String("name", ...),
// flag.DurationVar(&v, "name", ...) and the like, on flag or a FlagSet).
func definedFlags(t *testing.T, dir string) map[string]bool {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*.go"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no Go files in %s: %v", dir, err)
	}
	nameArg := map[string]int{}
	for _, f := range []string{"String", "Int", "Int64", "Uint", "Uint64", "Bool", "Duration", "Float64", "Func", "BoolFunc"} {
		nameArg[f] = 0
		nameArg[f+"Var"] = 1
	}
	nameArg["Var"] = 1
	nameArg["TextVar"] = 1
	flags := map[string]bool{}
	fset := token.NewFileSet()
	for _, file := range files {
		if strings.HasSuffix(file, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, file, nil, parser.SkipObjectResolution)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(f, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok {
				return true
			}
			sel, ok := call.Fun.(*ast.SelectorExpr)
			if !ok {
				return true
			}
			i, ok := nameArg[sel.Sel.Name]
			if !ok || len(call.Args) <= i {
				return true
			}
			if lit, ok := call.Args[i].(*ast.BasicLit); ok && lit.Kind == token.STRING {
				if name, err := strconv.Unquote(lit.Value); err == nil {
					flags[name] = true
				}
			}
			return true
		})
	}
	if len(flags) == 0 {
		t.Fatalf("found no flag definitions in %s", dir)
	}
	return flags
}

// clientResources are the typed clients the adapter may use and the RBAC
// resource each one's calls act on.
var clientResources = map[string]string{
	"k8s.io/client-go/kubernetes/typed/core/v1.PodInterface":                 "pods",
	"k8s.io/client-go/kubernetes/typed/networking/v1.NetworkPolicyInterface": "networking.k8s.io/networkpolicies",
}

// clientVerbs maps a typed client's method to the subresource and the RBAC
// verb of the request it makes.
var clientVerbs = map[string][2]string{
	"Create":                    {"", "create"},
	"Update":                    {"", "update"},
	"Delete":                    {"", "delete"},
	"DeleteCollection":          {"", "deletecollection"},
	"Get":                       {"", "get"},
	"List":                      {"", "list"},
	"Watch":                     {"", "watch"},
	"Patch":                     {"", "patch"},
	"Apply":                     {"", "patch"},
	"UpdateStatus":              {"status", "update"},
	"ApplyStatus":               {"status", "patch"},
	"UpdateEphemeralContainers": {"ephemeralcontainers", "update"},
	"UpdateResize":              {"resize", "update"},
	"GetLogs":                   {"log", "get"},
	"Bind":                      {"binding", "create"},
	"Evict":                     {"eviction", "create"},
	"EvictV1":                   {"eviction", "create"},
	"EvictV1beta1":              {"eviction", "create"},
	"ProxyGet":                  {"proxy", "get"},
}

// adapterCalls type-checks the Kubernetes runtime adapter and returns the
// "resource verb" of every Kubernetes API call it makes, with where.
func adapterCalls(t *testing.T) map[string]string {
	t.Helper()
	const pkgPath = "github.com/sandboxhq/sandbox/agent/runtime/kubernetes"
	cfg := &packages.Config{
		Mode: packages.NeedName | packages.NeedImports | packages.NeedTypes | packages.NeedSyntax | packages.NeedTypesInfo,
		Dir:  filepath.Join("..", ".."),
	}
	pkgs, err := packages.Load(cfg, pkgPath)
	if err != nil {
		t.Fatal(err)
	}
	if packages.PrintErrors(pkgs) > 0 || len(pkgs) != 1 {
		t.Fatalf("loading %s failed", pkgPath)
	}
	pkg := pkgs[0]
	calls := map[string]string{}
	for _, f := range pkg.Syntax {
		ast.Inspect(f, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok {
				return true
			}
			sel, ok := call.Fun.(*ast.SelectorExpr)
			if !ok {
				return true
			}
			s := pkg.TypesInfo.Selections[sel]
			if s == nil || s.Kind() != types.MethodVal {
				return true
			}
			fn := s.Obj().(*types.Func)
			if fn.Pkg() == nil || !strings.HasPrefix(fn.Pkg().Path(), "k8s.io/client-go/kubernetes") {
				return true
			}
			where := pkg.Fset.Position(call.Pos()).String()
			recv := types.TypeString(s.Recv(), nil)
			res, ok := clientResources[recv]
			if !ok {
				// The clientset and the group clients only hand out the
				// typed clients, without a request.
				if r := fn.Type().(*types.Signature).Results(); r.Len() == 1 && isTypedClient(r.At(0).Type()) {
					return true
				}
				t.Errorf("%s: the adapter calls %s.%s: add the resource it acts on to clientResources", where, recv, fn.Name())
				return true
			}
			v, ok := clientVerbs[fn.Name()]
			if !ok {
				t.Errorf("%s: the adapter calls %s.%s: add its verb to clientVerbs", where, recv, fn.Name())
				return true
			}
			sub := v[0]
			if fn.Name() == "Patch" && len(call.Args) > 5 {
				// Patch(ctx, name, type, data, opts, subresources...)
				lit, ok := call.Args[5].(*ast.BasicLit)
				if !ok || len(call.Args) > 6 {
					t.Errorf("%s: cannot tell the subresource this Patch acts on", where)
					return true
				}
				sub, _ = strconv.Unquote(lit.Value)
			}
			if sub != "" {
				res += "/" + sub
			}
			calls[res+" "+v[1]] = where
			return true
		})
	}
	if len(calls) == 0 {
		t.Fatalf("found no Kubernetes API call in %s", pkgPath)
	}
	return calls
}

func isTypedClient(typ types.Type) bool {
	named, ok := types.Unalias(typ).(*types.Named)
	return ok && named.Obj().Pkg() != nil && strings.HasPrefix(named.Obj().Pkg().Path(), "k8s.io/client-go/kubernetes/typed/")
}

// args returns a container's --name=value arguments by name.
func args(c *corev1.Container) map[string]string {
	out := map[string]string{}
	for _, a := range c.Args {
		if name, value, ok := strings.Cut(strings.TrimPrefix(a, "--"), "="); ok {
			out[name] = value
		}
	}
	return out
}

func allContainers(spec *corev1.PodSpec) []*corev1.Container {
	var out []*corev1.Container
	for i := range spec.InitContainers {
		out = append(out, &spec.InitContainers[i])
	}
	for i := range spec.Containers {
		out = append(out, &spec.Containers[i])
	}
	return out
}

func containerNamed(t *testing.T, spec *corev1.PodSpec, name string) *corev1.Container {
	t.Helper()
	for _, c := range allContainers(spec) {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no container %s", name)
	return nil
}

// mountOf returns the volume mount a path lies on (the longest mount path).
func mountOf(c *corev1.Container, p string) *corev1.VolumeMount {
	var best *corev1.VolumeMount
	for i, vm := range c.VolumeMounts {
		if (p == vm.MountPath || strings.HasPrefix(p, strings.TrimSuffix(vm.MountPath, "/")+"/")) &&
			(best == nil || len(vm.MountPath) > len(best.MountPath)) {
			best = &c.VolumeMounts[i]
		}
	}
	return best
}

// secretFile reports whether p is a key of a Secret volume mounted in c,
// readable by the container's group (fsGroup) and no one else.
func secretFile(c *corev1.Container, vols map[string]corev1.Volume, p string) bool {
	vm := mountOf(c, p)
	if vm == nil || vm.SubPath != "" {
		return false
	}
	v, ok := vols[vm.Name]
	if !ok || v.Secret == nil || v.Secret.DefaultMode == nil || *v.Secret.DefaultMode&0o007 != 0 {
		return false
	}
	rel := strings.TrimPrefix(p, strings.TrimSuffix(vm.MountPath, "/")+"/")
	return slices.ContainsFunc(v.Secret.Items, func(k corev1.KeyToPath) bool { return k.Path == rel })
}

func selects(t *testing.T, sel *metav1.LabelSelector, podLabels map[string]string) bool {
	t.Helper()
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil {
		t.Fatalf("selector %s: %v", sel, err)
	}
	return !s.Empty() && s.Matches(labels.Set(podLabels))
}

func splitHostPort(t *testing.T, addr string) (string, int32) {
	t.Helper()
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("address %q: %v", addr, err)
	}
	p, err := strconv.ParseInt(port, 10, 32)
	if err != nil {
		t.Fatalf("address %q: %v", addr, err)
	}
	return host, int32(p)
}

func hostOf(t *testing.T, addr string) string {
	t.Helper()
	h, _ := splitHostPort(t, addr)
	return h
}

func isTrue(b *bool) bool { return b != nil && *b }

func firstSet(vs ...*int64) *int64 {
	for _, v := range vs {
		if v != nil {
			return v
		}
	}
	return nil
}

// Package kubernetes holds the Kubernetes manifests of the platform (a
// kustomization: servers as a StatefulSet, agents as a DaemonSet with the
// kubernetes runtime, their Services, RBAC and namespaces) and the seccomp
// profile sandbox Pods need on their nodes. It has no Go code: its test
// decodes every manifest into its Kubernetes type, strictly, and checks the
// invariants the manifests must keep. See docs/kubernetes.md.
package kubernetes

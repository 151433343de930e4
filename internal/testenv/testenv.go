// Package testenv lets tests that need real system pieces (root, containerd,
// bubblewrap, built images) say so. On a laptop such a test skips with a
// message; with CI=true the same condition fails the test, so the real path
// is exercised on every submission.
package testenv

import (
	"context"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// CI reports whether the tests run in CI (CI=true).
func CI() bool { return os.Getenv("CI") == "true" }

// Unavailable skips the test, or fails it in CI, explaining what is missing.
func Unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	if CI() {
		t.Fatalf("required in CI: "+format, args...)
	}
	t.Skipf("skipping: "+format, args...)
}

// RequireRoot needs uid 0.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Unavailable(t, "test needs root")
	}
}

// RequireBinary needs a program on PATH and returns its path.
func RequireBinary(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		Unavailable(t, "test needs %s on PATH", name)
	}
	return p
}

// ContainerdAddress is the containerd socket tests use: $CONTAINERD_ADDRESS
// or containerd's default.
func ContainerdAddress() string {
	if a := os.Getenv("CONTAINERD_ADDRESS"); a != "" {
		return a
	}
	return "/run/containerd/containerd.sock"
}

// RequireContainerd needs root and a containerd answering on ContainerdAddress.
func RequireContainerd(t testing.TB) string {
	t.Helper()
	RequireRoot(t)
	addr := ContainerdAddress()
	d := net.Dialer{Timeout: 2 * time.Second}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "unix", addr)
	if err != nil {
		Unavailable(t, "test needs containerd at %s: %v", addr, err)
	}
	c.Close()
	return addr
}

// DockerHost is dockerd's address for tests: SANDBOX_DOCKER_HOST, then
// DOCKER_HOST, then Docker's default socket.
func DockerHost() string {
	for _, v := range []string{os.Getenv("SANDBOX_DOCKER_HOST"), os.Getenv("DOCKER_HOST")} {
		if v != "" {
			return v
		}
	}
	return "unix:///var/run/docker.sock"
}

// RequireDocker skips (fails under CI) unless root and a dockerd answering
// on a unix socket at DockerHost; it returns that address.
func RequireDocker(t testing.TB) string {
	t.Helper()
	RequireRoot(t)
	host := DockerHost()
	path, ok := strings.CutPrefix(host, "unix://")
	if !ok {
		return host // a TCP daemon: the adapter's Ping says whether it answers
	}
	d := net.Dialer{Timeout: 2 * time.Second}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		Unavailable(t, "test needs dockerd at %s (start it: dockerd &): %v", host, err)
	}
	c.Close()
	return host
}

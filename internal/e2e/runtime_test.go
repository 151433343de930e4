package e2e

import (
	"context"
	"os"
	"sync"
	"testing"

	"github.com/docker/docker/client"

	"github.com/sandboxhq/sandbox/internal/testenv"
)

// The runtime the e2e agents drive: SANDBOX_TEST_RUNTIME=docker runs them
// with --runtime docker (make test-adversarial-docker), anything else on
// containerd.
func testRuntime() string {
	if os.Getenv("SANDBOX_TEST_RUNTIME") == "docker" {
		return "docker"
	}
	return "containerd"
}

// runtimeArgs are the agent's flags for the test runtime; for Docker it
// also checks that dockerd answers and holds the images.
func runtimeArgs(t *testing.T, containerdAddr string, images ...string) []string {
	t.Helper()
	if testRuntime() != "docker" {
		return []string{"--containerd-address", containerdAddr}
	}
	host := testenv.RequireDocker(t)
	cli, err := client.NewClientWithOpts(client.WithHost(host), client.WithAPIVersionNegotiation())
	if err != nil {
		testenv.Unavailable(t, "docker client: %v", err)
	}
	defer cli.Close()
	for _, n := range images {
		if _, err := cli.ImageInspect(context.Background(), "localhost/sandbox/"+n+":latest"); err != nil {
			testenv.Unavailable(t, "image %s is not in Docker (run make images with dockerd running): %v", n, err)
		}
	}
	return []string{"--runtime", "docker", "--docker-host", host}
}

// dockerIDs caches Docker's ids of containers by name: Docker names a
// container's cgroup by its id, and a destroyed container cannot be asked.
var dockerIDs sync.Map

// cgroupName is what the container's cgroup path ends with: its name on
// containerd, Docker's id on Docker.
func cgroupName(cid string) string {
	if testRuntime() != "docker" || cid == "" {
		return cid
	}
	if id, ok := dockerIDs.Load(cid); ok {
		return id.(string)
	}
	cli, err := client.NewClientWithOpts(client.WithHost(testenv.DockerHost()), client.WithAPIVersionNegotiation())
	if err != nil {
		return cid
	}
	defer cli.Close()
	c, err := cli.ContainerInspect(context.Background(), cid)
	if err != nil {
		return cid
	}
	dockerIDs.Store(cid, c.ID)
	return c.ID
}
